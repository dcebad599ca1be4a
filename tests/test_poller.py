"""The poller against real Redis and the sandbox over HTTP, the two sharing one moved clock."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from consumer.events import CampaignRef
from consumer.poller import Poller, PollerSettings
from consumer.workflow import CampaignState, due_poll, poll_slot
from tests.helpers import REGISTRY, eventually, new_ref
from tests.rigs import WorkflowRig, customer_ids, workflow_rig
from textlocal_sandbox import (
    DeliveryModel,
    FaultRule,
    SandboxConfig,
    SandboxHandle,
    running_sandbox,
)

DAY = timedelta(days=1)
T0 = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)

# Messages settle between 12 hours and 6.5 days after the send (bucket by the number's hundreds),
# so each daily poll finds more of them settled. 6.5 days × 99 buckets never lands on a whole day.
SLOW_DELIVERY = DeliveryModel(settle_delay_s=12 * 3600, settle_spread=12.0)
# Numbers whose hundreds (settle bucket) and last two digits (outcome) both vary.
SPREAD_CONTACTS = [
    {"number": 447_700_000_000 + i * 101, "custom1": f"S{i:05d}", "first_name": "Spread"}
    for i in range(400)
]


# --- pure slot arithmetic ------------------------------------------------------------------


def test_no_poll_is_due_before_the_first_interval() -> None:
    """Nothing is due until one interval after the send."""
    assert due_poll(T0, DAY, 7 * DAY, 0, T0 + DAY - timedelta(seconds=1)) is None
    assert due_poll(T0, DAY, 7 * DAY, 0, T0 + DAY) == poll_slot(T0, DAY, 7 * DAY, 1)


def test_a_late_poller_takes_the_latest_due_slot() -> None:
    """After three and a half days without polls, the next poll is the third slot."""
    slot = due_poll(T0, DAY, 7 * DAY, 0, T0 + 3 * DAY + timedelta(hours=12))
    assert slot is not None
    assert (slot.number, slot.is_final) == (3, False)


def test_the_final_slot_is_the_window_end_even_past_it() -> None:
    """Long after the window, the one poll left is the final one, due at the window's end."""
    slot = due_poll(T0, DAY, 7 * DAY, 2, T0 + 30 * DAY)
    assert slot is not None
    assert (slot.number, slot.is_final, slot.due_at) == (7, True, T0 + 7 * DAY)


def test_an_interval_not_dividing_the_window_ends_on_the_window() -> None:
    """A 2-day interval over 7 days polls at days 2, 4, 6 and a final 7."""
    due = [poll_slot(T0, 2 * DAY, 7 * DAY, n) for n in range(1, 5)]
    assert [(s.due_at - T0).days for s in due] == [2, 4, 6, 7]
    assert [s.is_final for s in due] == [False, False, False, True]
    assert due_poll(T0, 2 * DAY, 7 * DAY, 3, T0 + 6 * DAY + timedelta(hours=23)) is None


def test_nothing_is_due_once_every_slot_is_made() -> None:
    """A window whose final poll is made asks for nothing more."""
    assert due_poll(T0, DAY, 7 * DAY, 7, T0 + 100 * DAY) is None


# --- against Redis and the sandbox ---------------------------------------------------------


@pytest.fixture
async def slow_sandbox() -> AsyncIterator[SandboxHandle]:
    """A sandbox whose messages settle over six days rather than two minutes."""
    config = SandboxConfig(delivery=SLOW_DELIVERY)
    async with running_sandbox(secrets.token_hex(16), config=config) as handle:
        yield handle


@pytest.fixture
async def rig(
    sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str
) -> AsyncIterator[WorkflowRig]:
    async with workflow_rig(sandbox, redis_client, key_prefix, contacts=400) as assembled:
        # As the daily template job does at start-up; also keeps concurrent sends clear of
        # TemplateCopy's refresh-on-miss race (a lookup during another's refresh sees a miss).
        await assembled.templates.refresh()
        await sandbox.admin.reset_call_counts()
        yield assembled


def poller_for(rig: WorkflowRig, owner: str = "poller-1", **settings: Any) -> Poller:
    return Poller(
        rig.store,
        rig.client,
        rig.steps,
        REGISTRY,
        PollerSettings(lease_ttl=timedelta(seconds=10), **settings),
        rig.clock,
        rig.metrics,
        owner,
    )


async def send_campaign(rig: WorkflowRig, ref: CampaignRef, ids: list[str], **header: Any) -> int:
    """Submit a campaign and let the executor send it; returns its batch id."""
    await rig.submit(ref, ids, **header)
    await rig.executor.run_until_idle()
    snapshot = await rig.snapshot(ref)
    assert snapshot.state == CampaignState.SENT
    assert snapshot.batch_id is not None
    return snapshot.batch_id


async def metrics_events(rig: WorkflowRig, ref: CampaignRef | None = None) -> list[dict[str, Any]]:
    """The DeliveryMetrics events in the outbox (of one campaign, or all), decoded, in order."""
    return [
        REGISTRY.decode(entry.value or b"").fields
        for entry in await rig.store.outbox_read(100_000)
        if entry.topic == "metrics" and (ref is None or entry.key == ref.key)
    ]


async def status_batch_calls(rig: WorkflowRig) -> int:
    return (await rig.sandbox.admin.call_counts()).get("status_batch", 0)


def sample(rig: WorkflowRig, name: str, **labels: str) -> float:
    value = rig.metrics.registry.get_sample_value(f"textlocal_consumer_{name}", labels)
    return value or 0.0


COUNT_FIELDS = ("num_messages", "delivered", "undelivered", "pending", "invalid", "expired")


@pytest.mark.integration
async def test_a_sent_campaign_is_polled_once_a_day_for_seven_days(
    slow_sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """Seven daily polls, each matching the sandbox's counts then; the last is final, then DONE."""
    async with workflow_rig(
        slow_sandbox, redis_client, key_prefix, contacts=1, extra_contacts=SPREAD_CONTACTS
    ) as rig:
        ref = new_ref()
        batch_id = await send_campaign(rig, ref, [str(c["custom1"]) for c in SPREAD_CONTACTS])
        group_id = (await rig.snapshot(ref)).group_id
        poller = poller_for(rig)
        assert await poller.run_due() == 0  # nothing due on the day of the send

        for day in range(1, 8):
            rig.clock.advance(DAY)
            await slow_sandbox.admin.reset_call_counts()
            assert await poller.run_due() == 1
            assert await status_batch_calls(rig) == 1
            truth = await rig.client.status_batch(batch_id)  # the sandbox, at that moment
            event = (await metrics_events(rig, ref))[-1]
            assert event["poll_number"] == day
            assert event["is_final"] is (day == 7)
            assert {name: event[name] for name in COUNT_FIELDS} == {
                "num_messages": truth.num_messages,
                "delivered": truth.delivered,
                "undelivered": truth.undelivered,
                "pending": truth.pending,
                "invalid": truth.invalid,
                "expired": truth.expired,
            }
            assert event["unknown"] == truth.unknown
            assert event["batch_id"] == batch_id
            assert event["metadata"] == {"journey": "welcome"}

        events = await metrics_events(rig, ref)
        assert [e["poll_number"] for e in events] == [1, 2, 3, 4, 5, 6, 7]
        assert len({e["event_id"] for e in events}) == 7
        pending = [e["pending"] for e in events]
        delivered = [e["delivered"] for e in events]
        assert pending == sorted(pending, reverse=True)
        assert delivered == sorted(delivered)
        assert len(set(pending)) == 7  # progress every day
        assert pending[0] > 300
        assert pending[-1] == 0
        assert events[-1]["delivery_rate"] == pytest.approx(events[-1]["delivered"] / 400)

        snapshot = await rig.snapshot(ref)
        assert snapshot.state == CampaignState.DONE
        assert group_id not in await slow_sandbox.admin.groups()  # retention 0: deleted
        assert await rig.store.queue_size(rig.store.keys.poll_queue) == 0
        outcomes = {
            name: sample(rig, "delivery_outcomes_total", status=name)
            for name in ("delivered", "undelivered", "invalid", "expired", "unknown", "pending")
        }
        assert sum(outcomes.values()) == 400
        assert outcomes["delivered"] == events[-1]["delivered"]

        rig.clock.advance(3 * DAY)
        await slow_sandbox.admin.reset_call_counts()
        assert await poller.run_due() == 0
        assert await status_batch_calls(rig) == 0


@pytest.mark.integration
async def test_the_event_window_overrides_the_default(rig: WorkflowRig) -> None:
    """metrics_window_days=3 gives three polls, the third final, and nothing after."""
    ref = new_ref()
    await send_campaign(rig, ref, customer_ids(1, 20), metrics_window_days=3)
    poller = poller_for(rig)
    for _ in range(6):
        rig.clock.advance(DAY)
        await poller.run_due()
    events = await metrics_events(rig, ref)
    assert [(e["poll_number"], e["is_final"]) for e in events] == [
        (1, False),
        (2, False),
        (3, True),
    ]
    assert events[0]["window_ends_at"] == events[0]["sent_at"] + timedelta(days=3)
    assert await rig.state(ref) == CampaignState.DONE


@pytest.mark.integration
async def test_a_cancelled_scheduled_send_is_never_polled(rig: WorkflowRig) -> None:
    """A scheduled send cancelled before it left leaves the poll queue: no status_batch ever."""
    ref = new_ref()
    await send_campaign(rig, ref, customer_ids(1, 10), scheduled_at=rig.clock.now() + DAY)
    await rig.request_cancel(ref)
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.CANCELLED
    poller = poller_for(rig)
    rig.clock.advance(9 * DAY)
    assert await poller.run_due() == 0
    assert await status_batch_calls(rig) == 0
    assert await metrics_events(rig, ref) == []


@pytest.mark.integration
async def test_a_campaign_cancelled_while_queued_is_dropped_without_a_call(
    rig: WorkflowRig,
) -> None:
    """A CANCELLED campaign still in the poll queue is removed from it, TextLocal untouched."""
    ref = new_ref()
    await send_campaign(rig, ref, customer_ids(1, 10))
    forced = rig.store.transition(ref.key).expect(CampaignState.SENT)
    await rig.store.apply(forced.set_state(CampaignState.CANCELLED), rig.clock.now())
    poller = poller_for(rig)
    rig.clock.advance(DAY)
    assert await poller.run_due() == 0
    assert await status_batch_calls(rig) == 0
    assert await rig.store.redis.zscore(rig.store.keys.poll_queue, ref.key) is None
    assert sample(rig, "polls_total", outcome="skipped") == 1


@pytest.mark.integration
async def test_two_pollers_make_each_poll_once(rig: WorkflowRig) -> None:
    """Two replicas sharing Redis over 24 campaigns × 7 days: 168 polls, each made once."""
    refs = [new_ref() for _ in range(24)]
    for number, ref in enumerate(refs):
        await rig.submit(ref, customer_ids(number * 10 + 1, 10))
    await rig.executor.run_until_idle()
    assert {await rig.state(ref) for ref in refs} == {CampaignState.SENT}
    first, second = poller_for(rig, "poller-1"), poller_for(rig, "poller-2")
    await rig.sandbox.admin.reset_call_counts()
    made_by = {"poller-1": 0, "poller-2": 0}
    for _ in range(7):
        rig.clock.advance(DAY)
        one, two = await asyncio.gather(first.run_due(), second.run_due())
        made_by["poller-1"] += one
        made_by["poller-2"] += two
        assert one + two == 24
    assert await status_batch_calls(rig) == 168
    assert min(made_by.values()) > 0  # both took part
    events = await metrics_events(rig)
    assert len(events) == 168
    assert len({e["event_id"] for e in events}) == 168
    for ref in refs:
        numbers = sorted(e["poll_number"] for e in events if e["campaign_id"] == ref.campaign_id)
        assert numbers == [1, 2, 3, 4, 5, 6, 7]
        assert await rig.state(ref) == CampaignState.DONE


@pytest.mark.integration
async def test_a_transient_failure_keeps_the_slot(rig: WorkflowRig) -> None:
    """status_batch failing with 503 (past the client's retries) is retried later, polled once."""
    ref = new_ref()
    await send_campaign(rig, ref, customer_ids(1, 10))
    await rig.sandbox.admin.set_faults([FaultRule("http_5xx", command="status_batch", limit=5)])
    poller = poller_for(rig)
    rig.clock.advance(DAY)
    assert await poller.run_due() == 0
    assert await status_batch_calls(rig) == 5  # the client's five attempts
    assert sample(rig, "polls_total", outcome="retry") == 1
    assert (await rig.snapshot(ref)).poll_failures == 1
    assert await metrics_events(rig, ref) == []

    rig.clock.advance(timedelta(seconds=3))  # past the 2 s backoff
    assert await poller.run_due() == 1
    assert await status_batch_calls(rig) == 6
    events = await metrics_events(rig, ref)
    assert [e["poll_number"] for e in events] == [1]
    snapshot = await rig.snapshot(ref)
    assert snapshot.state == CampaignState.POLLING
    assert "poll_failures" not in snapshot.fields


@pytest.mark.integration
async def test_a_permanent_error_consumes_the_slot_without_an_event(rig: WorkflowRig) -> None:
    """An unknown batch (error 901) is reported per slot; the window still closes."""
    ref = new_ref()
    await send_campaign(rig, ref, customer_ids(1, 10), metrics_window_days=2)
    tamper = rig.store.transition(ref.key).expect(CampaignState.SENT).set(batch_id=999_999)
    assert (await rig.store.apply(tamper, rig.clock.now())).ok
    poller = poller_for(rig)
    rig.clock.advance(DAY)
    assert await poller.run_due() == 1
    snapshot = await rig.snapshot(ref)
    assert (snapshot.state, snapshot.polls_done) == (CampaignState.POLLING, 1)
    assert snapshot.poll_error.startswith("TEXTLOCAL_901")
    rig.clock.advance(DAY)
    assert await poller.run_due() == 1
    assert await rig.state(ref) == CampaignState.DONE
    assert await metrics_events(rig, ref) == []
    assert sample(rig, "polls_total", outcome="failed") == 2


@pytest.mark.integration
async def test_a_crashed_replicas_claim_is_retried_after_its_lease(rig: WorkflowRig) -> None:
    """A poll claimed by a replica that died is made by another once the lease expired."""
    ref = new_ref()
    await send_campaign(rig, ref, customer_ids(1, 10))
    keys = rig.store.keys
    rig.clock.advance(DAY)
    claimed = await rig.store.claim_due(
        keys.poll_queue, keys.poll_lease_prefix, rig.clock.now(), 10, "crashed-replica", 300
    )
    assert [member for member, _ in claimed] == [ref.key]
    poller = poller_for(rig)
    assert await poller.run_due() == 0  # held by the crashed replica

    async def lease_expired() -> bool:
        return not await rig.store.redis.exists(keys.poll_lease(ref.key))

    await eventually(lease_expired, timeout_s=5)
    rig.clock.advance(timedelta(seconds=1))  # past the claim's requeue time
    assert await poller.run_due() == 1
    assert [e["poll_number"] for e in await metrics_events(rig, ref)] == [1]


@pytest.mark.integration
async def test_a_poller_back_after_days_makes_one_poll_for_the_latest_slot(
    rig: WorkflowRig,
) -> None:
    """Three days without a poller: the overdue gauge shows it, then one poll (number 3) is made."""
    ref = new_ref()
    await send_campaign(rig, ref, customer_ids(1, 10))
    poller = poller_for(rig)
    rig.clock.advance(3 * DAY + timedelta(hours=1))
    await poller.update_overdue()
    assert sample(rig, "polls_overdue") == 1
    assert await poller.run_due() == 1
    assert await status_batch_calls(rig) == 1
    assert [e["poll_number"] for e in await metrics_events(rig, ref)] == [3]
    assert sample(rig, "polls_overdue") == 0
    slot4 = poll_slot((await rig.snapshot(ref)).sent_at or T0, DAY, 7 * DAY, 4)
    score = await rig.store.redis.zscore(rig.store.keys.poll_queue, ref.key)
    assert score == int(slot4.due_at.timestamp() * 1000)


@pytest.mark.integration
async def test_the_segment_is_kept_for_the_retention_then_deleted(rig: WorkflowRig) -> None:
    """With a two-day retention the segment outlives the final poll by two days, then goes."""
    ref = new_ref()
    await send_campaign(rig, ref, customer_ids(1, 10), metrics_window_days=1)
    group_id = (await rig.snapshot(ref)).group_id
    poller = poller_for(rig, segment_retention=2 * DAY)
    rig.clock.advance(DAY)
    assert await poller.run_due() == 1
    snapshot = await rig.snapshot(ref)
    assert (snapshot.state, snapshot.segment_cleanup) == (CampaignState.DONE, True)
    rig.clock.advance(DAY)
    await poller.run_due()
    assert group_id in await rig.sandbox.admin.groups()
    rig.clock.advance(DAY + timedelta(minutes=1))
    await poller.run_due()
    assert group_id not in await rig.sandbox.admin.groups()
    assert await rig.store.queue_size(rig.store.keys.poll_queue) == 0
    assert "segment_cleanup" not in (await rig.snapshot(ref)).fields


@pytest.mark.integration
async def test_run_polls_until_stopped_and_drains(rig: WorkflowRig) -> None:
    """The loop makes a due poll on its own and returns promptly once told to stop."""
    ref = new_ref()
    await send_campaign(rig, ref, customer_ids(1, 10))
    poller = poller_for(rig, idle_wait_s=0.05)
    stopping = asyncio.Event()
    loop = asyncio.create_task(poller.run(stopping, drain_timeout_s=5))
    rig.clock.advance(DAY)

    async def polled() -> bool:
        return len(await metrics_events(rig, ref)) == 1

    await eventually(polled, timeout_s=10)
    stopping.set()
    await asyncio.wait_for(loop, timeout=5)
    assert poller.running == 0
    assert sample(rig, "loop_last_iteration_timestamp_seconds", role="poller") > 0
