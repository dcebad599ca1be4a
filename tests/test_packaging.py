"""The two distributions: the daemon's wheel holds the daemon only, the sandbox's the sandbox only.

The wheels are built here as the image builders build them (`pip wheel --no-deps
--no-build-isolation`, with the locked hatchling of the venv; no network), then opened.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SANDBOX_PROJECT = REPO / "sandbox"
SANDBOX_PACKAGE = SANDBOX_PROJECT / "textlocal_sandbox"

pytestmark = pytest.mark.slow


def build_wheel(project: Path, out: Path) -> zipfile.ZipFile:
    """The wheel of `project`, built into `out`."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(project),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    [wheel] = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def dist_info_text(wheel: zipfile.ZipFile, name: str) -> str:
    [path] = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def test_production_wheel_holds_no_sandbox(tmp_path: Path) -> None:
    """The daemon's wheel has the `consumer` package and every schema, no sandbox module, no
    sandbox command and no dependency on the sandbox."""
    with build_wheel(REPO, tmp_path) as wheel:
        names = wheel.namelist()
        entry_points = dist_info_text(wheel, "entry_points.txt")
        metadata = dist_info_text(wheel, "METADATA")
    packages = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert packages == {"consumer"}
    assert "consumer/__init__.py" in names
    sandbox = [name for name in names if "sandbox" in name.lower()]
    assert not sandbox, f"sandbox files in the daemon's wheel: {sandbox}"
    schemas = {f"consumer/schemas/{path.name}" for path in (REPO / "schemas").glob("*.avsc")}
    assert schemas <= set(names)
    assert "textlocal-consumer = consumer.cli:main" in entry_points
    assert "textlocal-sandbox" not in entry_points
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requires
    assert not [line for line in requires if "sandbox" in line]


def test_sandbox_wheel_is_the_sandbox_alone(tmp_path: Path) -> None:
    """The sandbox's wheel holds `textlocal_sandbox` (with ASSUMPTIONS.md) and its command,
    and depends on aiohttp, not on the daemon."""
    with build_wheel(SANDBOX_PROJECT, tmp_path) as wheel:
        names = wheel.namelist()
        entry_points = dist_info_text(wheel, "entry_points.txt")
        metadata = dist_info_text(wheel, "METADATA")
    packages = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert packages == {"textlocal_sandbox"}
    assert "textlocal_sandbox/ASSUMPTIONS.md" in names
    assert "textlocal_sandbox/__main__.py" in names
    assert "textlocal-sandbox = textlocal_sandbox.__main__:main" in entry_points
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any("aiohttp" in line for line in requires)
    assert not [line for line in requires if "consumer" in line]


def test_sandbox_imports_nothing_of_the_daemon() -> None:
    """No module of the sandbox imports `consumer`: it installs and runs without the daemon."""
    offenders = []
    for path in sorted(SANDBOX_PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            offenders += [
                f"{path.relative_to(REPO)}:{node.lineno} {module}"
                for module in modules
                if module.split(".")[0] == "consumer"
            ]
    assert not offenders, offenders
