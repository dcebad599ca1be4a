"""Time, injected: production reads the system clock, tests and the sandbox move a manual one.

Pure workflow code never reads a clock; the edges pass `clock.now()` in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Something that tells the current time as a timezone-aware UTC datetime."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real wall clock, in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that runs with real time from a chosen start, and can be moved by hand.

    `offset` is added to the system time, so time still flows (timeouts and latencies stay
    realistic) while tests and the sandbox's admin API jump it forward by days.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._offset = timedelta(0)
        if start is not None:
            self.set(start)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def set(self, moment: datetime) -> None:
        if moment.tzinfo is None:
            raise ValueError("ManualClock.set needs a timezone-aware datetime")
        self._offset = moment - datetime.now(UTC)

    def advance(self, by: timedelta) -> None:
        self._offset += by


def to_unix_s(moment: datetime) -> int:
    """Whole Unix seconds of an aware datetime (TextLocal's time unit)."""
    return int(moment.timestamp())


def to_millis(moment: datetime) -> int:
    """Unix milliseconds of an aware datetime (the Avro contracts' time unit)."""
    return int(moment.timestamp() * 1000)


def monotonic_s() -> float:
    """Seconds on the monotonic clock, for durations and deadlines within one process."""
    return time.monotonic()


async def pause(stopping: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds`, or less if `stopping` is set; returns True when stopping."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), timeout=seconds)
    return stopping.is_set()
