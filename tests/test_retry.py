"""The retry arithmetic and loop, and the rate limiter, with plain values: nothing sleeps."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.errors import (
    ConfigError,
    TextLocalApiError,
    TextLocalHttpError,
    TextLocalOutcomeUnknown,
    TextLocalRateLimited,
    TextLocalUnavailable,
)
from consumer.rate_limit import RequestRateLimiter
from consumer.retry import (
    RetryPolicy,
    backoff_delay_s,
    call_with_retries,
    parse_retry_after_s,
    retry_delay_s,
)

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=5, max_total_s=60.0, backoff_base_s=0.5, backoff_cap_s=10.0)


class FakeTime:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now_s = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now_s += seconds


def test_backoff_doubles_from_the_base() -> None:
    """With the largest random draw, each retry waits twice the previous one."""
    delays = [backoff_delay_s(POLICY, n, 1.0) for n in range(1, 5)]
    assert delays == [0.5, 1.0, 2.0, 4.0]


def test_backoff_is_capped() -> None:
    """No retry waits longer than the cap, however many came before."""
    assert backoff_delay_s(POLICY, 10, 1.0) == 10.0
    assert backoff_delay_s(POLICY, 10_000, 0.999) <= 10.0


def test_backoff_jitter_keeps_half_the_delay() -> None:
    """The jitter draws from the upper half of the delay, so a retry is never immediate."""
    assert backoff_delay_s(POLICY, 3, 0.0) == 1.0
    assert backoff_delay_s(POLICY, 3, 0.5) == 1.5


@given(retry_number=st.integers(min_value=1, max_value=10_000), fraction=st.floats(0.0, 1.0))
def test_backoff_stays_within_bounds(retry_number: int, fraction: float) -> None:
    """Every delay lies between half the base and the cap."""
    delay_s = backoff_delay_s(POLICY, retry_number, fraction)
    assert POLICY.backoff_base_s / 2 <= delay_s <= POLICY.backoff_cap_s


def test_backoff_refuses_retry_zero() -> None:
    """Retries are numbered from 1."""
    with pytest.raises(ValueError, match="starts at 1"):
        backoff_delay_s(POLICY, 0, 0.5)


@pytest.mark.parametrize(
    ("header", "expected_s"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("Sat, 01 Mar 2025 12:00:30 GMT", 30.0),
        ("Sat, 01 Mar 2025 11:59:00 GMT", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_retry_after_parsing(header: str | None, expected_s: float | None) -> None:
    """Retry-After is read as seconds or an HTTP-date; past dates mean now; junk is ignored."""
    assert parse_retry_after_s(header, NOW) == expected_s


def test_retry_after_wins_over_backoff() -> None:
    """A 429 with Retry-After waits what the server asked, not the computed backoff."""
    assert retry_delay_s(POLICY, TextLocalRateLimited("send", 7.0), 1, 0.5) == 7.0
    assert retry_delay_s(POLICY, TextLocalRateLimited("send", None), 1, 1.0) == 0.5
    assert retry_delay_s(POLICY, TextLocalUnavailable("send", "HTTP 503", 503), 2, 1.0) == 1.0


@pytest.mark.parametrize(
    ("fields", "setting"),
    [
        ({"max_attempts": 0}, "textlocal.max_attempts"),
        ({"max_total_s": 0.0}, "textlocal.max_total_s"),
        ({"backoff_base_s": 0.0}, "textlocal.backoff_base_s"),
        ({"backoff_base_s": 2.0, "backoff_cap_s": 1.0}, "textlocal.backoff_cap_s"),
    ],
)
def test_policy_validation_names_the_setting(fields: dict[str, float], setting: str) -> None:
    """An impossible retry policy is refused with the setting's name."""
    with pytest.raises(ConfigError) as raised:
        RetryPolicy(**fields)  # type: ignore[arg-type]
    assert raised.value.setting == setting


class FlakyCall:
    """Raises the given errors in turn, then returns "done"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


async def test_transient_errors_are_retried_until_success() -> None:
    """Unavailable and rate-limited calls are retried, with the backoff and Retry-After waits."""
    time = FakeTime()
    call = FlakyCall(
        TextLocalUnavailable("balance", "HTTP 503", 503),
        TextLocalRateLimited("balance", 4.0),
        TextLocalUnavailable("balance", "cannot connect"),
    )
    retries: list[float] = []
    result = await call_with_retries(
        call,
        policy=POLICY,
        sleep=time.sleep,
        random=lambda: 1.0,
        monotonic=time.monotonic,
        on_retry=lambda error, delay_s: retries.append(delay_s),
    )
    assert result == "done"
    assert call.calls == 4
    assert time.sleeps == [0.5, 4.0, 2.0]
    assert retries == time.sleeps


@pytest.mark.parametrize(
    "error",
    [
        TextLocalApiError("send", 7, "Insufficient credits"),
        TextLocalHttpError("send", 401),
        TextLocalOutcomeUnknown("send", "x"),
    ],
)
async def test_other_errors_are_never_retried(error: Exception) -> None:
    """A permanent error or an unknown outcome goes straight to the caller."""
    time = FakeTime()
    call = FlakyCall(error)
    with pytest.raises(type(error)):
        await call_with_retries(
            call, policy=POLICY, sleep=time.sleep, random=lambda: 0.0, monotonic=time.monotonic
        )
    assert call.calls == 1
    assert time.sleeps == []


async def test_attempts_are_bounded() -> None:
    """After max_attempts failures the last error is raised, noting the attempts."""
    time = FakeTime()
    call = FlakyCall(*[TextLocalUnavailable("balance", f"HTTP 50{n}", 500) for n in range(9)])
    with pytest.raises(TextLocalUnavailable) as raised:
        await call_with_retries(
            call, policy=POLICY, sleep=time.sleep, random=lambda: 0.0, monotonic=time.monotonic
        )
    assert call.calls == 5
    assert raised.value.reason == "HTTP 504"
    assert "gave up after 5 attempts" in (raised.value.__notes__[0])


async def test_total_time_is_bounded() -> None:
    """A retry whose wait would end past max_total_s is not made."""
    time = FakeTime()
    policy = RetryPolicy(max_attempts=100, max_total_s=10.0, backoff_base_s=1.0, backoff_cap_s=8.0)
    call = FlakyCall(*[TextLocalUnavailable("balance", "HTTP 503", 503) for _ in range(100)])
    with pytest.raises(TextLocalUnavailable):
        await call_with_retries(
            call, policy=policy, sleep=time.sleep, random=lambda: 1.0, monotonic=time.monotonic
        )
    # Waits 1, 2, 4 (7 s in total); the next one, 8 s, would end at 15 s.
    assert time.sleeps == [1.0, 2.0, 4.0]
    assert call.calls == 4


async def test_a_retry_after_beyond_the_budget_ends_the_retries() -> None:
    """When the server asks for a longer wait than the budget allows, the 429 goes to the caller."""
    time = FakeTime()
    call = FlakyCall(TextLocalRateLimited("send", 3600.0))
    with pytest.raises(TextLocalRateLimited) as raised:
        await call_with_retries(
            call, policy=POLICY, sleep=time.sleep, random=lambda: 0.0, monotonic=time.monotonic
        )
    assert raised.value.retry_after_s == 3600.0
    assert time.sleeps == []


async def test_rate_limiter_spaces_calls() -> None:
    """Calls made together start 1/rate apart; a call after a pause starts at once."""
    time = FakeTime()
    limiter = RequestRateLimiter(4.0, monotonic=time.monotonic, sleep=time.sleep)
    for _ in range(3):
        await limiter.acquire()
    assert time.sleeps == [0.25, 0.25]
    time.now_s += 10
    await limiter.acquire()
    assert time.sleeps == [0.25, 0.25]


async def test_rate_limiter_reserves_turns_for_concurrent_callers() -> None:
    """Tasks that ask at the same instant get consecutive turns, not the same one."""
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    limiter = RequestRateLimiter(2.0, monotonic=lambda: 50.0, sleep=record)
    for _ in range(4):
        await limiter.acquire()
    assert waits == [0.5, 1.0, 1.5]


def test_rate_limiter_refuses_a_zero_rate() -> None:
    """A rate of zero would block forever, so it is a configuration error."""
    with pytest.raises(ConfigError, match=r"textlocal\.rate_limit_per_s"):
        RequestRateLimiter(0.0)
