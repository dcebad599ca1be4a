"""Leased workers against a real Redis: one handler per member, fenced claims, bounded failures."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from consumer.clock import ManualClock, SystemClock
from consumer.errors import StoreUnavailable
from consumer.keys import RedisKeys
from consumer.leased_work import HolderLog, Lease, LeasedWorkers, SingleHolder, holding
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


# --- the single-holder loop (the outbox publisher, the receipt drain) -------------------------


class HeldRole:
    """A role's hooks: work that raises the errors it is given (in turn) or records a turn, a
    short wait for more, and a give_up_head that notes its calls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.turns = 0
        self.errors: list[Exception | None] = []  # raised by the next turns (None: a success)
        self.gave_up: list[Exception] = []

    async def work(self) -> int:
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        self.turns += 1
        return 0

    async def wait_for_more(self) -> None:
        await asyncio.sleep(0.01)  # stands in for a blocking stream read

    async def give_up_head(self, error: Exception) -> str | None:
        self.gave_up.append(error)
        return f"head-{len(self.gave_up)}"


HOLDER_LOG = HolderLog(
    logging.getLogger("tests.holder"),
    retrying="held.work_failed",
    failed="held.failed",
    gave_up="held.head_given_up",
    give_up_failed="held.give_up_failed",
)


def single_holder(
    store: CampaignStore, role: HeldRole, metrics: Metrics, ttl_ms: int = 300
) -> SingleHolder:
    return SingleHolder(
        store,
        role="held",
        lease_key=store.keys.prefix + "lease:held",
        work=role.work,
        wait_for_more=role.wait_for_more,
        give_up_head=role.give_up_head,
        events=HOLDER_LOG,
        metrics=metrics,
        clock=SystemClock(),
        owner=role.name,
        lease_ttl_ms=ttl_ms,
        retry_after_s=0.01,
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"textlocal_consumer_{name}", labels)


async def test_of_two_holders_only_the_one_holding_the_lease_works(
    store: CampaignStore, redis_client: aioredis.Redis
) -> None:
    """Two replicas run the loop on one lease: one works, the other waits; when the first stops
    it releases the lease and the other claims it and works."""
    roles = {name: HeldRole(name) for name in ("replica-a", "replica-b")}
    metrics = {name: Metrics(CollectorRegistry()) for name in roles}
    stopping = {name: asyncio.Event() for name in roles}
    tasks = {
        name: asyncio.create_task(single_holder(store, role, metrics[name]).run(stopping[name]))
        for name, role in roles.items()
    }
    lease_key = store.keys.prefix + "lease:held"
    await eventually(lambda: _true(any(role.turns >= 3 for role in roles.values())))
    first = next(name for name, role in roles.items() if role.turns >= 3)
    (second,) = set(roles) - {first}
    await asyncio.sleep(0.5)  # longer than the TTL: the holder keeps it, the other never works
    assert roles[second].turns == 0
    assert as_text(await redis_client.get(lease_key)).startswith(f"{first}:")
    assert sample(metrics[first], "leases_held", kind="held") == 1
    assert sample(metrics[second], "leases_held", kind="held") == 0
    assert sample(metrics[second], "loop_last_iteration_timestamp_seconds", role="held")

    stopping[first].set()
    await tasks[first]
    assert sample(metrics[first], "leases_held", kind="held") == 0
    await eventually(lambda: _true(roles[second].turns >= 1))
    assert as_text(await redis_client.get(lease_key)).startswith(f"{second}:")
    stopping[second].set()
    await tasks[second]
    assert await redis_client.get(lease_key) is None  # released on stop


async def test_a_hook_raising_max_failures_times_gives_up_the_head_once(
    store: CampaignStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Five unexpected errors in a row: each is counted and logged with its class, the fifth
    hands the head to give_up_head (with that error), counted once; the streak then starts
    afresh, and a success between failures resets it."""
    caplog.set_level(logging.INFO, logger="tests.holder")
    role = HeldRole("replica-a")
    role.errors = [ZeroDivisionError(f"boom {n}") for n in range(5)]
    role.errors += [ValueError("again")] * 4 + [None] + [ValueError("and again")] * 4
    metrics = Metrics(CollectorRegistry())
    assert sample(metrics, "handler_failures_total", role="held") is None
    holder = single_holder(store, role, metrics)
    assert sample(metrics, "handler_failures_total", role="held") == 0
    assert sample(metrics, "handler_gave_up_total", role="held") == 0
    stopping = asyncio.Event()
    task = asyncio.create_task(holder.run(stopping))
    await eventually(lambda: _true(not role.errors and role.turns >= 2))
    stopping.set()
    await task

    assert [str(error) for error in role.gave_up] == ["boom 4"]
    assert sample(metrics, "handler_failures_total", role="held") == 13
    assert sample(metrics, "handler_gave_up_total", role="held") == 1
    failed = [r for r in caplog.records if r.getMessage() == "held.failed"]
    assert [r.levelno for r in failed] == [logging.ERROR] * 13
    context = [r.__dict__["context"] for r in failed]
    assert [c["failures"] for c in context] == [1, 2, 3, 4, 5, 1, 2, 3, 4, 1, 2, 3, 4]
    assert context[0]["error_class"] == "ZeroDivisionError"
    assert context[0]["error"] == "boom 0"
    (given_up,) = [r for r in caplog.records if r.getMessage() == "held.head_given_up"]
    assert given_up.__dict__["context"] == {"entry_id": "head-1"}


async def test_unexpected_errors_can_be_logged_without_their_text(
    store: CampaignStore, caplog: pytest.LogCaptureFixture
) -> None:
    """With `with_error_text` off (an error that may carry a receipt), only the class is logged."""
    caplog.set_level(logging.INFO, logger="tests.holder.quiet")
    role = HeldRole("replica-a")
    role.errors = [ValueError("447700900123 said no")]
    holder = SingleHolder(
        store,
        role="held",
        lease_key=store.keys.prefix + "lease:held",
        work=role.work,
        wait_for_more=role.wait_for_more,
        give_up_head=role.give_up_head,
        events=HolderLog(
            logging.getLogger("tests.holder.quiet"),
            retrying="quiet.work_failed",
            failed="quiet.failed",
            gave_up="quiet.head_given_up",
            give_up_failed="quiet.give_up_failed",
            with_error_text=False,
        ),
        metrics=Metrics(CollectorRegistry()),
        clock=SystemClock(),
        owner="replica-a",
        lease_ttl_ms=300,
        retry_after_s=0.01,
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(holder.run(stopping))
    await eventually(lambda: _true(role.turns >= 1))
    stopping.set()
    await task
    (failed,) = [r for r in caplog.records if r.getMessage() == "quiet.failed"]
    assert failed.__dict__["context"] == {
        "error_class": "ValueError",
        "failures": 1,
        "max_failures": 5,
    }


async def test_transient_errors_are_waited_out_and_never_given_up(
    store: CampaignStore, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage (a transient error) in the work is logged once at WARNING, then at DEBUG, never
    counted as a failure nor given up; its end is logged when work resumes."""
    caplog.set_level(logging.DEBUG, logger="tests.holder")
    role = HeldRole("replica-a")
    role.errors = [StoreUnavailable("Redis away") for _ in range(7)]
    role.errors += [None, StoreUnavailable("Redis away again")]
    metrics = Metrics(CollectorRegistry())
    stopping = asyncio.Event()
    task = asyncio.create_task(single_holder(store, role, metrics).run(stopping))
    await eventually(lambda: _true(not role.errors and role.turns >= 2))
    stopping.set()
    await task
    assert role.gave_up == []
    assert sample(metrics, "handler_failures_total", role="held") == 0
    retries = [r.levelno for r in caplog.records if r.getMessage() == "held.work_failed"]
    assert retries == [logging.WARNING] + [logging.DEBUG] * 6 + [logging.WARNING]
    assert [r.getMessage() for r in caplog.records].count("held.resumed") == 2


async def test_a_lost_lease_stops_the_work_and_is_claimed_anew_with_a_new_token(
    store: CampaignStore, redis_client: aioredis.Redis
) -> None:
    """When another replica has the lease (this one's ran out), this one stops working at its
    next renewal; once the lease is free again it claims it, with a token new at this claim."""
    role = HeldRole("replica-a")
    metrics = Metrics(CollectorRegistry())
    stopping = asyncio.Event()
    task = asyncio.create_task(single_holder(store, role, metrics).run(stopping))
    lease_key = store.keys.prefix + "lease:held"
    await eventually(lambda: _true(role.turns >= 1))
    first_token = as_text(await redis_client.get(lease_key))

    # The lease runs out under this holder and another replica claims it.
    await redis_client.set(lease_key, "replica-b:other", px=60_000)
    await eventually(lambda: _true(sample(metrics, "leases_held", kind="held") == 0))
    turns = role.turns
    await asyncio.sleep(0.5)  # longer than the TTL: several claims, none succeeds
    assert role.turns == turns
    assert as_text(await redis_client.get(lease_key)) == "replica-b:other"

    # The other replica goes: this one claims the lease again and works.
    await redis_client.delete(lease_key)
    await eventually(lambda: _true(role.turns > turns))
    new_token = as_text(await redis_client.get(lease_key))
    assert new_token.startswith("replica-a:")
    assert new_token != first_token
    assert sample(metrics, "leases_held", kind="held") == 1
    stopping.set()
    await task


async def test_a_one_shot_turn_keeps_the_lease_while_it_works_and_frees_it_after(
    store: CampaignStore, redis_client: aioredis.Redis
) -> None:
    """`once` (the one-shot commands' publish): the lease is renewed while the work outlasts its
    TTL, so a daemon's holder cannot claim it meanwhile; it is freed at the end; and while
    another holds it, `once` does nothing and answers None."""
    lease_key = store.keys.prefix + "lease:held"
    daemon_role = HeldRole("daemon")
    daemon = single_holder(store, daemon_role, Metrics(CollectorRegistry()))
    claims_meanwhile: list[bool] = []

    class SlowRole(HeldRole):
        async def work(self) -> int:
            for _ in range(3):  # 0.6 s of work, twice the 300 ms TTL
                await asyncio.sleep(0.2)
                claims_meanwhile.append(await daemon.claim())
            return 7

    command = single_holder(store, SlowRole("command"), Metrics(CollectorRegistry()))
    assert await command.once() == 7
    assert claims_meanwhile == [False, False, False]
    assert await redis_client.get(lease_key) is None

    assert await daemon.claim()
    assert (
        await single_holder(store, HeldRole("other"), Metrics(CollectorRegistry())).once() is None
    )
    assert as_text(await redis_client.get(lease_key)).startswith("daemon:")
    await daemon.release()
