"""Progress of a long operation on stderr: a rewritten line on a terminal, else a few log lines."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    """Call with (done, total) as work advances; the line is finished when done reaches total."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self._label = label
        self._stream = stream or sys.stderr
        self._interactive = self._stream.isatty()
        self._every_s = 0.2 if self._interactive else 5.0
        self._last_s = float("-inf")

    def __call__(self, done: int, total: int) -> None:
        now_s = time.monotonic()
        finished = done >= total
        if now_s - self._last_s < self._every_s and not finished:
            return
        self._last_s = now_s
        share = f" ({done / total:.0%})" if total else ""
        line = f"{self._label}: {done:,} / {total:,}{share}"
        if self._interactive:
            self._stream.write("\r" + line + ("\n" if finished else " " * 8))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
