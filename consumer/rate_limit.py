"""TextLocal's rate limit: one limit per TextLocal account, shared by every replica through Redis.

TextLocal limits an account, not a process, so the replicas (and any CLI command run beside them)
share one limit. `AccountRateLimiter.acquire` asks the store for a turn: one Lua call running
GCRA on Redis' own clock (`CampaignStore.take_rate_limit_turn`), answered with "go" or "wait N
µs"; on a wait it sleeps that long and asks again. `textlocal.rate_limit_per_s` is the rate of the
whole account; after a quiet spell `textlocal.rate_limit_burst` requests may go back to back (1,
the default, spaces every request 1/rate apart). So in any one second at most
rate + burst - 1 turns are given out, fleet-wide.

It fails closed: while Redis does not answer, no TextLocal call goes out. The limiter asks Redis
again after a capped backoff (50 ms doubling to 2 s, with jitter) for up to `max_store_wait_s`
(the client's retry budget, `textlocal.max_retry_s`), then raises `RateLimitUnavailable`, a
`TransientError`: the call was not made, and the caller tries it again later as it does after
any transient failure. Holding a call back without end would let the campaign lease of a step
run out while its send waits.

`RequestRateLimiter` is the limit of a `TextLocalClient` built without a shared one (tests,
benchmarks, library use without Redis): it spaces that process's calls 1/rate apart. The daemon
and every CLI command use `AccountRateLimiter` (wired in `consumer.app`).
"""

from __future__ import annotations

import asyncio
import logging
import random as random_module
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

from consumer.clock import monotonic_s
from consumer.errors import ConfigError, RateLimitUnavailable, StoreUnavailable
from consumer.logs import log_event
from consumer.retry import RetryPolicy, backoff_delay_s

log = logging.getLogger(__name__)

# How soon Redis is asked again while it does not answer: 50 ms doubling up to 2 s.
STORE_BACKOFF_BASE_S = 0.05
STORE_BACKOFF_CAP_S = 2.0


class RateLimiter(Protocol):
    """What the TextLocal client waits on before each HTTP attempt."""

    async def acquire(self) -> None: ...


class RateLimitStore(Protocol):
    """The store's side of the shared limit: `CampaignStore.take_rate_limit_turn`."""

    async def take_rate_limit_turn(self, account: str, interval_us: int, burst: int) -> float: ...


class RateLimitObserver(Protocol):
    """A metrics hook: `rate_limit_waited` once per turn taken, with the seconds spent getting it;
    `rate_limit_unavailable` each time Redis did not answer the limiter."""

    def rate_limit_waited(self, wait_s: float) -> None: ...

    def rate_limit_unavailable(self) -> None: ...


class _SilentObserver:
    def rate_limit_waited(self, wait_s: float) -> None:
        pass

    def rate_limit_unavailable(self) -> None:
        pass


class AccountRateLimiter:
    """Turns under one TextLocal account's limit, shared through Redis by every process using it.

    `account` is `TextLocalCredentials.account_id(api_url)`, a hash: no credential reaches Redis.
    `sleep`, `monotonic` and `random` are injected for tests.
    """

    def __init__(
        self,
        store: RateLimitStore,
        account: str,
        rate_per_s: float,
        *,
        burst: int = 1,
        max_store_wait_s: float = 60.0,
        observer: RateLimitObserver | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        monotonic: Callable[[], float] = monotonic_s,
        random: Callable[[], float] = random_module.random,
    ) -> None:
        if not rate_per_s > 0:
            raise ConfigError("textlocal.rate_limit_per_s", "must be positive")
        if burst < 1:
            raise ConfigError("textlocal.rate_limit_burst", "must be at least 1")
        if not max_store_wait_s > 0:
            raise ConfigError("textlocal.max_retry_s", "must be positive")
        self._store = store
        self._account = account
        self._interval_us = max(1, round(1_000_000 / rate_per_s))
        self._burst = burst
        self._max_store_wait_s = max_store_wait_s
        # Bounded by time only (the loop below checks it): Redis is asked again until then.
        self._store_backoff = RetryPolicy(
            max_attempts=sys.maxsize,
            max_total_s=max_store_wait_s,
            backoff_base_s=STORE_BACKOFF_BASE_S,
            backoff_cap_s=STORE_BACKOFF_CAP_S,
        )
        self._observer: RateLimitObserver = observer or _SilentObserver()
        self._sleep = sleep
        self._monotonic = monotonic
        self._random = random
        self._unavailable_since_s: float | None = None  # for one log line per outage

    def __repr__(self) -> str:
        return (
            f"AccountRateLimiter(account={self._account!r}, "
            f"rate_per_s={1_000_000 / self._interval_us:g}, burst={self._burst})"
        )

    async def acquire(self) -> None:
        """Return once this caller holds a turn; `RateLimitUnavailable` if Redis stays away."""
        started_s = self._monotonic()
        failing_since_s: float | None = None
        failures = 0
        while True:
            try:
                wait_s = await self._store.take_rate_limit_turn(
                    self._account, self._interval_us, self._burst
                )
            except StoreUnavailable as exc:
                now_s = self._monotonic()
                if failing_since_s is None:
                    failing_since_s = now_s
                failures += 1
                self._observer.rate_limit_unavailable()
                self._note_unavailable(now_s, exc)
                failing_s = now_s - failing_since_s
                delay_s = backoff_delay_s(self._store_backoff, failures, self._random())
                if failing_s + delay_s > self._max_store_wait_s:
                    log_event(
                        log,
                        "textlocal.rate_limit_gave_up",
                        logging.ERROR,
                        waited_s=round(failing_s, 3),
                        error=str(exc),
                    )
                    raise RateLimitUnavailable(failing_s, str(exc)) from exc
                await self._sleep(delay_s)
                continue
            failing_since_s, failures = None, 0
            self._note_available()
            if wait_s <= 0:
                self._observer.rate_limit_waited(self._monotonic() - started_s)
                return
            await self._sleep(wait_s)

    def _note_unavailable(self, now_s: float, error: StoreUnavailable) -> None:
        if self._unavailable_since_s is None:
            self._unavailable_since_s = now_s
            log_event(
                log,
                "textlocal.rate_limit_unavailable",
                logging.WARNING,
                error=str(error),
                max_wait_s=self._max_store_wait_s,
            )

    def _note_available(self) -> None:
        if self._unavailable_since_s is not None:
            down_s = self._monotonic() - self._unavailable_since_s
            self._unavailable_since_s = None
            log_event(log, "textlocal.rate_limit_recovered", down_s=round(down_s, 3))


class RequestRateLimiter:
    """In one process: start times no closer than 1/rate_per_s apart, for any number of tasks.

    For a `TextLocalClient` built without a shared limiter; the daemon uses `AccountRateLimiter`.
    """

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
