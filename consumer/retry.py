"""Retrying transient failures: the one place where the TextLocal client decides to try again.

Modelled on stamina: only named exceptions are retried (`TextLocalUnavailable` and its child
`TextLocalRateLimited`; never the permanent `TextLocalApiError` and `TextLocalHttpError`, nor
`TextLocalOutcomeUnknown`), attempts are bounded by a count *and* by total time, the backoff is
capped exponential with jitter, and a Retry-After sent with HTTP 429 is honoured. Sleep,
randomness and time are injected, so the arithmetic is tested with plain values and no test
sleeps.
"""

from __future__ import annotations

import email.utils
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from consumer.errors import ConfigError, TextLocalRateLimited, TextLocalUnavailable

ResultT = TypeVar("ResultT")

# 2**60 times any sane base is far beyond any cap; bounding the exponent keeps the float finite.
_MAX_BACKOFF_EXPONENT = 60


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: at most `max_attempts` calls, no retry that would end after `max_total_s`.

    The delay before retry n (n = 1 for the first retry) is drawn uniformly from
    [d/2, d] with d = min(backoff_cap_s, backoff_base_s * 2**(n-1)): "equal jitter", which
    spreads replicas apart while keeping a floor, so a retry never fires immediately.
    """

    max_attempts: int = 5
    max_total_s: float = 60.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("textlocal.max_attempts", "must be at least 1")
        if self.max_total_s <= 0:
            raise ConfigError("textlocal.max_total_s", "must be positive")
        if self.backoff_base_s <= 0:
            raise ConfigError("textlocal.backoff_base_s", "must be positive")
        if self.backoff_cap_s < self.backoff_base_s:
            raise ConfigError("textlocal.backoff_cap_s", "must not be below backoff_base_s")


def backoff_delay_s(policy: RetryPolicy, retry_number: int, random_fraction: float) -> float:
    """Seconds to wait before retry `retry_number` (1-based), given a random number in [0, 1)."""
    if retry_number < 1:
        raise ValueError("retry_number starts at 1")
    exponent = min(retry_number - 1, _MAX_BACKOFF_EXPONENT)
    ceiling_s = min(policy.backoff_cap_s, policy.backoff_base_s * 2.0**exponent)
    return ceiling_s / 2 + ceiling_s / 2 * random_fraction


def parse_retry_after_s(value: str | None, now: datetime) -> float | None:
    """Seconds a Retry-After header asks for: delta-seconds or an HTTP-date; None if unusable.

    A date in the past means "now" (0 s). Anything else malformed is ignored rather than
    trusted, so the caller falls back to its own backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        # float() also accepts "nan", "inf" and "-1": none of them is a usable wait.
        if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
            return None
        return seconds
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        # RFC 9110: an HTTP-date is always GMT, even when written without a zone.
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - now).total_seconds())


def retry_delay_s(
    policy: RetryPolicy, error: TextLocalUnavailable, retry_number: int, random_fraction: float
) -> float:
    """The wait before the next attempt: the server's Retry-After when it gave one, else backoff."""
    if isinstance(error, TextLocalRateLimited) and error.retry_after_s is not None:
        return error.retry_after_s
    return backoff_delay_s(policy, retry_number, random_fraction)


RetryListener = Callable[[TextLocalUnavailable, float], None]


async def call_with_retries(
    attempt: Callable[[], Awaitable[ResultT]],
    *,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[object]],
    random: Callable[[], float],
    monotonic: Callable[[], float],
    on_retry: RetryListener | None = None,
) -> ResultT:
    """Run `attempt` until it returns, retrying only `TextLocalUnavailable` within the policy.

    Gives up by re-raising the last error when the attempts are used up, or when waiting for the
    next attempt would end after `max_total_s` from the first call (so a long Retry-After ends
    the retries at once instead of sleeping past the budget). An attempt already running is not
    interrupted by the budget: each one is bounded by the client's own request timeout.
    """
    started_s = monotonic()
    retry_number = 0
    while True:
        try:
            return await attempt()
        except TextLocalUnavailable as error:
            retry_number += 1
            elapsed_s = monotonic() - started_s
            if retry_number >= policy.max_attempts:
                error.add_note(f"gave up after {retry_number} attempts in {elapsed_s:.1f}s")
                raise
            delay_s = retry_delay_s(policy, error, retry_number, random())
            if elapsed_s + delay_s > policy.max_total_s:
                error.add_note(
                    f"gave up after {retry_number} attempts: waiting {delay_s:.1f}s more would "
                    f"exceed the {policy.max_total_s:.0f}s budget"
                )
                raise
            if on_retry is not None:
                on_retry(error, delay_s)
            await sleep(delay_s)
