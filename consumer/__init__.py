"""Optimove → TextLocal SMS campaign daemon over Kafka (see ../DESIGN.md in the shared design)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    # The installed distribution's version (pyproject.toml), so `--version`, the User-Agent
    # sent to TextLocal and the image label cannot disagree.
    __version__ = version("textlocal-consumer")
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
