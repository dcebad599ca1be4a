"""The account's shared rate limit: GCRA in one Lua call on the real Redis, failing closed.

Time here is Redis' own clock, so these tests run in real time; they count turns within windows
with generous margins, and wait for conditions rather than for fixed times.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from consumer.config import load_settings
from consumer.errors import ConfigError, RateLimitUnavailable
from consumer.keys import RedisKeys
from consumer.rate_limit import AccountRateLimiter
from consumer.store import CampaignStore
from consumer.textlocal import TextLocalClient, TextLocalCredentials, TextLocalSettings
from tests.daemon import free_port
from tests.helpers import REGISTRY, eventually
from textlocal_sandbox import SandboxHandle

integration = pytest.mark.integration
ACCOUNT = "0123456789abcdef"


def busiest_second(times: list[float]) -> int:
    """The most of `times` (seconds) in any half-open window [t, t + 1 s)."""
    ordered = sorted(times)
    best, end = 0, 0
    for start_index, start in enumerate(ordered):
        while end < len(ordered) and ordered[end] < start + 1.0:
            end += 1
        best = max(best, end - start_index)
    return best


@dataclass
class SeenByLimiter:
    """A RateLimitObserver that keeps what it was told."""

    waits_s: list[float] = field(default_factory=list)
    unavailable: int = 0

    def rate_limit_waited(self, wait_s: float) -> None:
        self.waits_s.append(wait_s)

    def rate_limit_unavailable(self) -> None:
        self.unavailable += 1


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[str, str], CampaignStore]]:
    """Stores on connections of their own (as separate replicas have), at a Redis URL."""
    clients: list[aioredis.Redis] = []

    def store_at(url: str, prefix: str) -> CampaignStore:
        client: aioredis.Redis = aioredis.Redis.from_url(
            url, decode_responses=False, socket_timeout=5, socket_connect_timeout=1
        )
        clients.append(client)
        return CampaignStore(client, RedisKeys(prefix=prefix), REGISTRY)

    yield store_at
    for client in clients:
        await client.aclose()


class RedisThatComesBack:
    """A port with nothing listening, until `open()`: then it forwards to the real Redis."""

    def __init__(self, redis_url: str) -> None:
        target = urlsplit(redis_url)
        self._target = (target.hostname or "127.0.0.1", target.port or 6379)
        self._db = target.path or "/0"
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}{self._db}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        this = asyncio.current_task()
        assert this is not None
        self._pipes.add(this)
        up_reader, up_writer = await asyncio.open_connection(*self._target)

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            finally:
                sink.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


# --- the Lua script ------------------------------------------------------------------------------


@integration
async def test_a_turn_goes_at_once_and_the_next_is_told_to_wait_one_interval(
    connect: Callable[[str, str], CampaignStore], redis_url: str, key_prefix: str
) -> None:
    """At 10/s with burst 1: the first turn goes, the next is told to wait at most 100 ms."""
    store = connect(redis_url, key_prefix)
    assert await store.take_rate_limit_turn(ACCOUNT, 100_000, 1) == 0.0
    wait_s = await store.take_rate_limit_turn(ACCOUNT, 100_000, 1)
    assert 0.0 < wait_s <= 0.1


@integration
async def test_the_burst_goes_back_to_back_then_the_next_waits(
    connect: Callable[[str, str], CampaignStore], redis_url: str, key_prefix: str
) -> None:
    """At 5/s with burst 3: three turns go at once, the fourth is told to wait (≤ 200 ms)."""
    store = connect(redis_url, key_prefix)
    answers = [await store.take_rate_limit_turn(ACCOUNT, 200_000, 3) for _ in range(4)]
    assert answers[:3] == [0.0, 0.0, 0.0]
    assert 0.0 < answers[3] <= 0.2


@integration
async def test_a_wait_answer_takes_no_turn(
    connect: Callable[[str, str], CampaignStore], redis_url: str, key_prefix: str
) -> None:
    """Being told to wait uses nothing up: asking again and again names the same next turn."""
    store = connect(redis_url, key_prefix)
    assert await store.take_rate_limit_turn(ACCOUNT, 1_000_000, 1) == 0.0
    waits = [await store.take_rate_limit_turn(ACCOUNT, 1_000_000, 1) for _ in range(5)]
    # Each answer is the time left until the same moment, so they only shrink.
    assert waits == sorted(waits, reverse=True)
    assert waits[0] - waits[-1] < 0.5
    assert all(0.5 < wait <= 1.0 for wait in waits)


@integration
async def test_accounts_have_limits_of_their_own(
    connect: Callable[[str, str], CampaignStore], redis_url: str, key_prefix: str
) -> None:
    """A busy account does not hold back another one."""
    store = connect(redis_url, key_prefix)
    assert await store.take_rate_limit_turn("account-a", 1_000_000, 1) == 0.0
    assert await store.take_rate_limit_turn("account-a", 1_000_000, 1) > 0.0
    assert await store.take_rate_limit_turn("account-b", 1_000_000, 1) == 0.0


# --- the limiter ---------------------------------------------------------------------------------


@integration
async def test_the_limiter_sleeps_what_redis_says_then_takes_its_turn(
    connect: Callable[[str, str], CampaignStore], redis_url: str, key_prefix: str
) -> None:
    """At 4/s a second acquire sleeps about one interval (250 ms) in total, then returns."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(seconds)

    seen = SeenByLimiter()
    limiter = AccountRateLimiter(
        connect(redis_url, key_prefix), ACCOUNT, 4.0, observer=seen, sleep=sleep
    )
    await limiter.acquire()
    assert slept == []
    await limiter.acquire()
    assert slept
    assert 0.0 < slept[0] <= 0.25
    assert 0.2 < sum(slept) <= 0.26  # each answer is the time left until the same turn
    assert len(seen.waits_s) == 2
    assert seen.waits_s[1] >= 0.2


@integration
async def test_replicas_on_their_own_connections_share_one_limit(
    connect: Callable[[str, str], CampaignStore], redis_url: str, key_prefix: str
) -> None:
    """Three limiters (own connections, 3 callers each) at 20/s: ≤ 20 turns per second in all."""
    rate, burst, per_caller = 20.0, 1, 5
    limiters = [
        AccountRateLimiter(connect(redis_url, key_prefix), ACCOUNT, rate, burst=burst)
        for _ in range(3)
    ]
    granted: dict[int, list[float]] = {n: [] for n in range(len(limiters))}

    async def caller(replica: int) -> None:
        for _ in range(per_caller):
            await limiters[replica].acquire()
            granted[replica].append(time.monotonic())

    started = time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(*(caller(replica) for replica in granted for _ in range(3))), 30
    )
    times = [moment for moments in granted.values() for moment in moments]
    assert len(times) == 45
    # GCRA gives at most rate + burst - 1 turns in any second; one more for reply jitter.
    assert busiest_second(times) <= rate + burst
    # 45 turns at 20/s need 44 intervals (2.2 s): the replicas were not each given 20/s...
    span_s = max(times) - started
    assert span_s >= 44 / rate - 0.1
    # ...and none was starved or slowed beyond the shared rate.
    assert span_s <= 44 / rate + 2.0
    assert all(len(moments) == 3 * per_caller for moments in granted.values())


@integration
async def test_the_limit_is_keyed_by_a_hash_of_the_account_never_a_credential(
    connect: Callable[[str, str], CampaignStore],
    redis_url: str,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sandbox: SandboxHandle,
) -> None:
    """The only key a call leaves is the account's hash; neither key nor value holds the API key."""
    settings = TextLocalSettings(api_url=sandbox.url)
    credentials = TextLocalCredentials.from_api_key(sandbox.api_key)
    account = credentials.account_id(settings.api_url)
    limiter = AccountRateLimiter(connect(redis_url, key_prefix), account, 10.0)
    async with TextLocalClient(settings, credentials, rate_limiter=limiter) as client:
        await client.balance()
    keys = [key async for key in redis_client.scan_iter(match=f"{key_prefix}*")]
    assert keys == [f"{key_prefix}ratelimit:textlocal:{account}".encode()]
    value = await redis_client.get(keys[0])
    assert value is not None
    assert value.isdigit()
    assert sandbox.api_key.encode() not in keys[0] + value


# --- failing closed ------------------------------------------------------------------------------


@integration
async def test_no_call_goes_out_while_redis_is_away_and_it_resumes_when_redis_answers(
    connect: Callable[[str, str], CampaignStore],
    redis_url: str,
    key_prefix: str,
    sandbox: SandboxHandle,
) -> None:
    """Limiter on a closed port: the call waits, TextLocal sees nothing; Redis back: it goes."""
    redis = RedisThatComesBack(redis_url)
    seen = SeenByLimiter()
    settings = TextLocalSettings(api_url=sandbox.url)
    credentials = TextLocalCredentials.from_api_key(sandbox.api_key)
    limiter = AccountRateLimiter(
        connect(redis.url, key_prefix),
        credentials.account_id(settings.api_url),
        10.0,
        max_store_wait_s=60.0,
        observer=seen,
    )
    try:
        async with TextLocalClient(settings, credentials, rate_limiter=limiter) as client:
            call = asyncio.create_task(client.balance())

            async def redis_refused_several_times() -> bool:
                return seen.unavailable >= 4

            await eventually(redis_refused_several_times, timeout_s=20)
            assert not call.done()
            assert await sandbox.admin.call_log() == []

            await redis.open()
            balance = await asyncio.wait_for(call, timeout=15)
        assert balance.sms > 0
        assert [entry.command for entry in await sandbox.admin.call_log()] == ["balance"]
        assert len(seen.waits_s) == 1
        assert seen.waits_s[0] > 0.1  # the turn came only after the outage
    finally:
        await redis.close()


@integration
async def test_the_limiter_gives_up_with_a_transient_error_and_sends_nothing(
    connect: Callable[[str, str], CampaignStore], key_prefix: str, sandbox: SandboxHandle
) -> None:
    """Redis away for longer than the limiter waits: RateLimitUnavailable, and no request made."""
    closed = f"redis://127.0.0.1:{free_port()}/0"
    settings = TextLocalSettings(api_url=sandbox.url)
    credentials = TextLocalCredentials.from_api_key(sandbox.api_key)
    seen = SeenByLimiter()
    limiter = AccountRateLimiter(
        connect(closed, key_prefix), ACCOUNT, 10.0, max_store_wait_s=0.5, observer=seen
    )
    started = time.monotonic()
    async with TextLocalClient(settings, credentials, rate_limiter=limiter) as client:
        with pytest.raises(RateLimitUnavailable, match="no TextLocal call was made") as raised:
            await client.send(message="hello", numbers=["447700900123"])
    assert time.monotonic() - started < 5
    assert raised.value.waited_s <= 0.5
    assert seen.unavailable >= 2
    assert seen.waits_s == []
    assert await sandbox.admin.call_log() == []


# --- identity and settings -----------------------------------------------------------------------


def test_the_account_id_names_the_account_without_its_secret() -> None:
    """16 hex digits, stable; one per URL and key or username; password and hash log in alike."""
    url = "https://api.txtlocal.com/"
    by_key = TextLocalCredentials.from_api_key("SECRET-KEY-123")
    account = by_key.account_id(url)
    assert len(account) == 16
    assert int(account, 16) >= 0
    assert account == TextLocalCredentials.from_api_key("SECRET-KEY-123").account_id(url)
    assert "SECRET" not in account
    assert account != TextLocalCredentials.from_api_key("OTHER-KEY").account_id(url)
    assert account != by_key.account_id("https://api.textlocal.in/")
    by_password = TextLocalCredentials.from_password("shop@example.com", "pw1").account_id(url)
    by_hash = TextLocalCredentials.from_hash("shop@example.com", "h4sh").account_id(url)
    assert by_password == by_hash != account


def test_the_burst_is_a_setting_and_a_bad_one_is_named() -> None:
    """textlocal.rate_limit_burst defaults to 1, is read from the environment, must be ≥ 1."""
    base = {
        "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": "k3y",
        "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": '[{"id": 5, "template_prefix": "OPT_"}]',
    }
    assert load_settings(base).textlocal.rate_limit_burst == 1
    burst = {**base, "TEXTLOCAL_CONSUMER_TEXTLOCAL_RATE_LIMIT_BURST": "5"}
    assert load_settings(burst).textlocal.rate_limit_burst == 5
    with pytest.raises(ConfigError, match="TEXTLOCAL_CONSUMER_TEXTLOCAL_RATE_LIMIT_BURST"):
        load_settings({**base, "TEXTLOCAL_CONSUMER_TEXTLOCAL_RATE_LIMIT_BURST": "0"})
