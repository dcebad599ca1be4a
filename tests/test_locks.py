"""The lock files (requirements/*.txt, written by `make lock`): complete, hashed, consistent with
each other and with the bounds in the two pyproject.toml files, and what the venv really holds.

Pure checks of files and of this interpreter's installed distributions; no network.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements"
LOCKS = ("dev", "runtime", "sandbox", "build")
# The projects of this repository, installed editable next to the locked packages.
OWN_PROJECTS = {canonicalize_name("textlocal-consumer"), canonicalize_name("textlocal-sandbox")}

_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:;\s*(?P<marker>[^\\]+?))?"
    r"\s*\\?$"
)


@dataclass(frozen=True)
class Pin:
    """One locked package: its exact version, the environments it is for, and its hashes."""

    name: NormalizedName
    version: Version
    marker: Marker | None
    hashes: tuple[str, ...]

    def applies(self) -> bool:
        """Whether pip installs this line here (its marker holds for this interpreter)."""
        return self.marker is None or self.marker.evaluate()


@cache
def read_lock(name: str) -> tuple[Pin, ...]:
    """The pins of requirements/<name>.txt, as uv writes them (`name==version ; marker \\`
    followed by `--hash=` lines)."""
    pins: list[Pin] = []
    for line in (REQUIREMENTS / f"{name}.txt").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("--hash="):
            assert pins, f"{name}.txt: a hash before any pin"
            last = pins[-1]
            digest = stripped.removeprefix("--hash=").rstrip(" \\")
            pins[-1] = Pin(last.name, last.version, last.marker, (*last.hashes, digest))
            continue
        match = _PIN.match(stripped)
        assert match, f"{name}.txt: not an exact pin: {line!r}"
        marker = match["marker"]
        pins.append(
            Pin(
                canonicalize_name(match["name"]),
                Version(match["version"]),
                Marker(marker) if marker else None,
                (),
            )
        )
    return tuple(pins)


def applicable(name: str) -> dict[NormalizedName, Version]:
    """The lock's pins that apply to this interpreter, by name."""
    return {pin.name: pin.version for pin in read_lock(name) if pin.applies()}


def pyproject(path: Path) -> dict[str, object]:
    with path.open("rb") as file:
        return tomllib.load(file)


def requirements(path: Path, *, extra: str | None = None) -> list[Requirement]:
    project = pyproject(path)["project"]
    assert isinstance(project, dict)
    specs = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return [Requirement(spec) for spec in specs]


def build_requirements() -> list[Requirement]:
    specs: list[str] = []
    for path in (REPO / "pyproject.toml", REPO / "sandbox" / "pyproject.toml"):
        system = pyproject(path)["build-system"]
        assert isinstance(system, dict)
        specs += system["requires"]
    build_in = (REQUIREMENTS / "build.in").read_text(encoding="utf-8").splitlines()
    specs += [line for line in build_in if line.strip() and not line.startswith("#")]
    return [Requirement(spec) for spec in specs]


def installed_versions() -> dict[NormalizedName, Version]:
    return {
        canonicalize_name(dist.metadata["Name"]): Version(dist.version)
        for dist in importlib.metadata.distributions()
    }


@pytest.mark.parametrize("lock", LOCKS)
def test_every_pin_is_exact_and_hashed(lock: str) -> None:
    """Each lock pins every package to one version with at least one sha256 hash, so
    `pip install --require-hashes` accepts it, and no package of this repository is in it."""
    pins = read_lock(lock)
    assert pins
    for pin in pins:
        assert pin.hashes, f"{lock}.txt: {pin.name} has no hash"
        assert all(h.startswith("sha256:") and len(h) == 7 + 64 for h in pin.hashes), pin.name
        assert pin.name not in OWN_PROJECTS
    # One version per package and environment: a package twice only under different markers.
    seen: dict[NormalizedName, list[Pin]] = {}
    for pin in pins:
        seen.setdefault(pin.name, []).append(pin)
    for name, same in seen.items():
        assert len(same) == 1 or all(p.marker is not None for p in same), name


@pytest.mark.parametrize("lock", ["runtime", "sandbox", "build"])
def test_image_locks_are_cut_from_the_dev_lock(lock: str) -> None:
    """The runtime, sandbox and build locks pin the very versions the dev lock pins (the tests
    run what the images run)."""
    dev: dict[NormalizedName, set[Version]] = {}
    for pin in read_lock("dev"):
        dev.setdefault(pin.name, set()).add(pin.version)
    for pin in read_lock(lock):  # markers may differ: dev may need a package more widely
        assert pin.version in dev.get(pin.name, set()), f"{pin.name}=={pin.version}"


def declared(lock: str) -> list[Requirement]:
    """What the lock must cover: the requirements of the projects (or files) it is made from."""
    daemon, sandbox = REPO / "pyproject.toml", REPO / "sandbox" / "pyproject.toml"
    if lock == "runtime":
        return requirements(daemon)
    if lock == "sandbox":
        return requirements(sandbox)
    if lock == "build":
        return build_requirements()
    assert lock == "dev"
    return [
        *requirements(daemon),
        *requirements(daemon, extra="dev"),
        *requirements(sandbox),
        *build_requirements(),
    ]


@pytest.mark.parametrize("lock", LOCKS)
def test_locks_satisfy_the_declared_bounds(lock: str) -> None:
    """Every dependency the pyproject files (and requirements/build.in) declare is locked at a
    version inside its bounds: a bound changed without `make lock` fails here."""
    pins = applicable(lock)
    for requirement in declared(lock):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {lock}.txt: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock}.txt pins {name}=={pins[name]}, outside {requirement}: run `make lock`"
        )


def test_venv_holds_exactly_the_dev_lock() -> None:
    """Every package the dev lock pins for this interpreter is installed at exactly the locked
    version (the two projects themselves are editable installs, not in the lock)."""
    installed = installed_versions()
    wrong = {
        name: (str(version), str(installed[name]) if name in installed else "missing")
        for name, version in applicable("dev").items()
        if installed.get(name) != version
    }
    assert not wrong, f"locked vs installed (run `make deps`): {wrong}"
    assert set(installed) >= OWN_PROJECTS, "the projects themselves are not installed"
