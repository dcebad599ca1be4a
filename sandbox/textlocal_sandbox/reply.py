"""Rendering replies as TextLocal writes them: JSON, `status` last, failures with `errors`.

Large arrays (a million `messages`) are built as ready JSON text (`RawJson`) instead of a million
dicts, which keeps a big send or status report within a second or two.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class RawJson:
    """JSON text to splice into a reply as it is."""

    text: str


def render_success(fields: dict[str, object]) -> str:
    return _render({**fields, "status": "success"})


def render_failure(code: int, message: str) -> str:
    return _render({"errors": [{"code": code, "message": message}], "status": "failure"})


def json_array(items: Iterable[str]) -> RawJson:
    """A JSON array from already-encoded items."""
    return RawJson("[" + ",".join(items) + "]")


def _render(fields: dict[str, object]) -> str:
    parts = [
        json.dumps(key) + ":" + (value.text if isinstance(value, RawJson) else _dumps(value))
        for key, value in fields.items()
    ]
    return "{" + ",".join(parts) + "}"


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
