"""Leased workers against a real Redis: one handler per member, fenced claims, bounded failures."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from consumer.clock import ManualClock, SystemClock
from consumer.errors import StoreUnavailable
from consumer.keys import RedisKeys
from consumer.leased_work import Lease, LeasedWorkers, holding
from consumer.metrics import Metrics
from consumer.store import CampaignStore, as_text
from consumer.workflow import CampaignState
from tests.helpers import REGISTRY, eventually

pytestmark = pytest.mark.integration

QUEUE = "work"


class Recorder:
    """Handlers that block until released, or raise; and a give_up that notes its calls."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []
        self.release = asyncio.Event()
        self.raise_error: Exception | None = None
        self.gave_up: list[tuple[str, str]] = []

    async def handle(self, member: str, lease: Lease) -> None:
        self.started.append((member, lease.token))
        if self.raise_error is not None:
            raise self.raise_error
        await self.release.wait()

    async def give_up(self, member: str, lease: Lease, error: Exception) -> None:
        self.gave_up.append((member, type(error).__name__))


def workers(
    store: CampaignStore, recorder: Recorder, ttl_s: float = 30.0, owner: str = "replica-a"
) -> LeasedWorkers:
    return LeasedWorkers(
        store,
        queue=store.keys.prefix + QUEUE,
        lease_prefix=store.keys.prefix + "lease:",
        handle=recorder.handle,
        give_up=recorder.give_up,
        kind="test",
        concurrency=4,
        lease_ttl=timedelta(seconds=ttl_s),
        clock=SystemClock(),
        metrics=Metrics(CollectorRegistry()),
        owner=owner,
        max_failures=3,
    )


@pytest.fixture
def store(redis_client: aioredis.Redis, key_prefix: str) -> CampaignStore:
    return CampaignStore(redis_client, RedisKeys(prefix=key_prefix), REGISTRY)


async def test_a_member_in_hand_is_never_started_twice_and_old_tokens_fail_the_fence(
    store: CampaignStore, redis_client: aioredis.Redis
) -> None:
    """A lease that expired under a running handler is claimed anew, never run twice here."""
    recorder = Recorder()
    pool = workers(store, recorder)
    queue = store.keys.prefix + QUEUE
    await redis_client.zadd(queue, {"m1": 0})
    await store.apply(store.transition("m1").set_state(CampaignState.READY), SystemClock().now())
    assert await pool.claim_and_start() == 1
    await eventually(lambda: _true(bool(recorder.started)))
    (_, first_token) = recorder.started[0]

    # The lease runs out under the running handler (a Redis blip, a stalled loop) ...
    await redis_client.delete(store.keys.prefix + "lease:m1")
    await redis_client.zadd(queue, {"m1": 0})
    # ... and this process claims again: the member in hand is not started a second time.
    assert await pool.claim_and_start() == 0
    assert len(recorder.started) == 1
    # Another replica may claim it, with a token of its own: the old holder's writes are fenced.
    other = workers(store, Recorder(), owner="replica-b")
    assert await other.claim_and_start() == 1
    lease_key = store.keys.prefix + "lease:m1"
    new_token = as_text(await redis_client.get(lease_key))
    assert new_token != first_token
    stale = store.transition("m1").fenced(lease_key, first_token).set(poll_error="stale")
    assert (await store.apply(stale, SystemClock().now())).reason == "lease-lost"
    recorder.release.set()
    await pool.drain(5)
    await other.drain(0.1)


async def test_claims_get_tokens_unique_to_each_claim(
    store: CampaignStore, redis_client: aioredis.Redis
) -> None:
    """Two claims of one member by one replica carry different tokens."""
    queue = store.keys.prefix + QUEUE
    now = SystemClock().now()
    await store.reschedule(queue, "m1", now)
    lease_prefix = store.keys.prefix + "lease:"
    ((_, first),) = await store.claim_due(queue, lease_prefix, now, 1, "replica-a:x", 50)
    await eventually(lambda: _lease_gone(redis_client, lease_prefix + "m1"))
    await store.reschedule(queue, "m1", now)
    ((_, second),) = await store.claim_due(queue, lease_prefix, now, 1, "replica-a:y", 50)
    assert first != second


async def test_a_handler_that_keeps_raising_is_given_up_after_k_failures(
    store: CampaignStore, redis_client: aioredis.Redis
) -> None:
    """Each failure is counted; the K-th hands the member to give_up; none goes unretrieved."""
    recorder = Recorder()
    recorder.raise_error = ZeroDivisionError("boom")
    pool = workers(store, recorder, ttl_s=0.05)
    queue = store.keys.prefix + QUEUE
    for _ in range(3):
        await redis_client.zadd(queue, {"m1": 0})
        assert await pool.claim_and_start() == 1
        await pool.wait_for_one()
        await eventually(lambda: _true(pool.running == 0))
    assert recorder.gave_up == [("m1", "ZeroDivisionError")]
    # The run of failures is cleared once given up: the next one starts counting afresh.
    assert await redis_client.hget(store.keys.handler_failures("test"), "m1") is None


async def test_transient_failures_are_not_counted(
    store: CampaignStore, redis_client: aioredis.Redis
) -> None:
    """An outage (a transient error) is waited out, never counted towards giving up."""
    recorder = Recorder()
    recorder.raise_error = StoreUnavailable("Redis away")
    pool = workers(store, recorder, ttl_s=0.05)
    queue = store.keys.prefix + QUEUE
    for _ in range(4):
        await redis_client.zadd(queue, {"m1": 0})
        assert await pool.claim_and_start() == 1
        await pool.wait_for_one()
        await eventually(lambda: _true(pool.running == 0))
    assert recorder.gave_up == []
    assert await redis_client.hget(store.keys.handler_failures("test"), "m1") is None


async def test_the_oldest_running_gauge_tells_how_long_the_longest_item_has_run(
    store: CampaignStore, redis_client: aioredis.Redis
) -> None:
    """work_oldest_running_seconds{kind} is 0 with nothing in hand, then the age of the
    longest-running member (what the step-running-too-long alert watches), 0 again after it."""
    clock = ManualClock(SystemClock().now())
    metrics = Metrics(CollectorRegistry())
    recorder = Recorder()
    pool = LeasedWorkers(
        store,
        queue=store.keys.prefix + QUEUE,
        lease_prefix=store.keys.prefix + "lease:",
        handle=recorder.handle,
        give_up=recorder.give_up,
        kind="campaign",
        concurrency=4,
        lease_ttl=timedelta(seconds=30),
        clock=clock,
        metrics=metrics,
        owner="replica-a",
    )

    def age_s() -> float | None:
        name = "textlocal_consumer_work_oldest_running_seconds"
        return metrics.registry.get_sample_value(name, {"kind": "campaign"})

    assert age_s() == 0
    for name in ("handler_failures_total", "handler_gave_up_total"):
        value = metrics.registry.get_sample_value(
            f"textlocal_consumer_{name}", {"role": "campaign"}
        )
        assert value == 0, name
    await redis_client.zadd(store.keys.prefix + QUEUE, {"m1": 0})
    assert await pool.claim_and_start() == 1
    clock.advance(timedelta(minutes=20))
    await redis_client.zadd(store.keys.prefix + QUEUE, {"m2": 0})
    assert await pool.claim_and_start() == 1
    clock.advance(timedelta(minutes=5))
    assert age_s() == pytest.approx(25 * 60, abs=5)  # the manual clock runs with real time
    recorder.release.set()
    await pool.drain(5)
    assert age_s() == 0


async def _true(value: bool) -> bool:
    return value


async def _lease_gone(redis_client: aioredis.Redis, key: str) -> bool:
    return not await redis_client.exists(key)


async def test_holding_claims_renews_and_releases_a_lease_for_a_block(
    store: CampaignStore, redis_client: aioredis.Redis
) -> None:
    """`holding` claims a lease for a block, keeps it past its TTL, and frees it after; a second
    holder meanwhile gets None."""
    key = store.keys.prefix + "lease:job"
    async with holding(store, key, "a#1", 300) as held:
        assert held is not None
        async with holding(store, key, "b#1", 300) as other:
            assert other is None
        await asyncio.sleep(0.5)  # longer than the TTL: renewed meanwhile
        assert as_text(await redis_client.get(key)) == "a#1"
        assert not held.lost.is_set()
    assert await redis_client.get(key) is None
