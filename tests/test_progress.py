"""Progress display: a line per few seconds in logs, the last one always shown."""

from __future__ import annotations

import io

from consumer.progress import ProgressLine


def test_non_terminal_progress_prints_first_and_last_lines() -> None:
    """Off a terminal, progress is throttled to occasional lines, and completion is always shown."""
    stream = io.StringIO()
    progress = ProgressLine("contacts", stream)
    for done in range(0, 100_001, 1000):
        progress(done, 100_000)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "contacts: 0 / 100,000 (0%)"
    assert lines[-1] == "contacts: 100,000 / 100,000 (100%)"
    assert len(lines) == 2
