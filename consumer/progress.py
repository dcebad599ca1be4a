"""Progress of a long operation on stderr: a rewritten line on a terminal, else a few log lines."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    """Call with (done, total) as work advances; `done(summary)` at the end."""

    def __init__(self, label: str, stream: TextIO | None = None, every_s: float = 0.2) -> None:
        self._label = label
        self._stream = stream or sys.stderr
        self._interactive = self._stream.isatty()
        self._every_s = every_s if self._interactive else 5.0
        self._last_s = float("-inf")
        self._started_s = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now_s = time.monotonic()
        if now_s - self._last_s < self._every_s and done < total:
            return
        self._last_s = now_s
        share = f" ({done / total:.0%})" if total else ""
        line = f"{self._label}: {done:,} / {total:,}{share}"
        if self._interactive:
            self._stream.write("\r" + line + " " * 8)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def done(self, summary: str) -> None:
        elapsed_s = time.monotonic() - self._started_s
        prefix = "\r" if self._interactive else ""
        self._stream.write(f"{prefix}{self._label}: {summary} in {elapsed_s:.1f}s" + " " * 8 + "\n")
        self._stream.flush()
