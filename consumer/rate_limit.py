"""A process-wide request rate limit: calls are spaced at least 1/rate seconds apart.

TextLocal does not publish its limits, so the rate is configuration. Spacing (rather than a
bucket that allows bursts) keeps the load on TextLocal smooth and makes the behaviour easy to
predict and to test with an injected clock and sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from consumer.clock import monotonic_s
from consumer.errors import ConfigError


class RequestRateLimiter:
    """Hands out start times no closer than 1/rate_per_s apart, to any number of waiting tasks."""

    def __init__(
        self,
        rate_per_s: float,
        *,
        monotonic: Callable[[], float] = monotonic_s,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if not rate_per_s > 0:
            raise ConfigError("textlocal.rate_limit_per_s", "must be positive")
        self._interval_s = 1.0 / rate_per_s
        self._monotonic = monotonic
        self._sleep = sleep
        self._next_start_s = float("-inf")

    async def acquire(self) -> None:
        """Wait until this caller's turn; turns are reserved in call order."""
        now_s = self._monotonic()
        # Reserving the slot before the first await makes this safe without a lock: the loop
        # cannot switch tasks between reading and moving `_next_start_s`.
        start_s = max(now_s, self._next_start_s)
        self._next_start_s = start_s + self._interval_s
        if start_s > now_s:
            await self._sleep(start_s - now_s)
