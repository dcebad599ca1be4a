"""The sandbox's clock: real time from a chosen start, moved by hand through the admin API.

Its own (the sandbox depends on nothing of the daemon's); it has the daemon's `Clock` shape
(`now()` returning an aware UTC datetime), so tests hand one clock to both.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


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
