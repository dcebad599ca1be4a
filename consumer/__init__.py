"""Optimove → TextLocal SMS campaign daemon over Kafka (see ../DESIGN.md in the shared design)."""

from __future__ import annotations

__version__ = "0.1.0"
