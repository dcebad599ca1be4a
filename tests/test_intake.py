"""Intake against a real broker and Redis: events become campaign state; bad input is refused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from consumer.clock import SystemClock
from consumer.events import CampaignRef
from consumer.intake import Intake, IntakeSettings
from consumer.kafka_io import KafkaEventSource, KafkaPublisher
from consumer.keys import RedisKeys
from consumer.metrics import Metrics
from consumer.store import CampaignStore, as_text
from consumer.workflow import CampaignState, ContactGroup
from tests.helpers import (
    REGISTRY,
    cancelled,
    consume,
    eventually,
    new_ref,
    produce,
    recipients,
    scheduled,
)

pytestmark = pytest.mark.integration

GROUPS = (
    ContactGroup(
        group_id=100, name="Optimove customers", template_prefix="OPT_", customer_id_field="custom1"
    ),
)


@dataclass
class IntakeRig:
    bootstrap: str
    topic: str
    dlq_topic: str
    store: CampaignStore
    metrics: Metrics

    def publish(self, *items: object) -> None:
        produce(self.bootstrap, self.topic, list(items))  # type: ignore[arg-type]

    async def state(self, ref: CampaignRef) -> CampaignState | None:
        snapshot = await self.store.load(ref.key)
        return None if snapshot is None else snapshot.state

    async def wait_for_state(self, ref: CampaignRef, state: CampaignState) -> None:
        async def reached() -> bool:
            return await self.state(ref) == state

        reached.__name__ = f"{ref.key} reaches {state}"
        await eventually(reached)

    async def statuses(self, ref: CampaignRef) -> list[tuple[str, str | None]]:
        """(status, error code) of the campaign's status events waiting in the outbox."""
        found = []
        for entry in await self.store.outbox_read(10_000):
            fields = REGISTRY.decode(entry.value or b"").fields
            if entry.key == ref.key:
                error = fields["error"]
                found.append((fields["status"], error["code"] if error else None))
        return found


@pytest.fixture
async def rig(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    redis_client: aioredis.Redis,
    key_prefix: str,
) -> AsyncIterator[IntakeRig]:
    topic = new_topic("input", partitions=3)
    dlq_topic = new_topic("dlq")
    store = CampaignStore(redis_client, RedisKeys(prefix=key_prefix), REGISTRY)
    metrics = Metrics(CollectorRegistry())
    group = f"{topic}-group"
    source = KafkaEventSource({"bootstrap.servers": kafka_bootstrap, "group.id": group}, [topic])
    publisher = KafkaPublisher({"bootstrap.servers": kafka_bootstrap})
    intake = Intake(
        source,
        publisher,
        store,
        REGISTRY,
        GROUPS,
        IntakeSettings(dlq_topic=dlq_topic, consumer_group=group),
        SystemClock(),
        metrics,
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(intake.run(stopping))
    yield IntakeRig(kafka_bootstrap, topic, dlq_topic, store, metrics)
    stopping.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    await source.close()
    await publisher.close()


async def test_header_and_batches_make_a_ready_campaign(rig: IntakeRig) -> None:
    """A header and all its batches leave the campaign READY with every customer recorded."""
    ref = new_ref()
    rig.publish(
        scheduled(ref, recipient_count=5, batch_count=2),
        recipients(ref, 0, ["C1", "C2", "C3"]),
        recipients(ref, 1, ["C4", "C5"]),
    )
    await rig.wait_for_state(ref, CampaignState.READY)
    snapshot = await rig.store.load(ref.key)
    assert snapshot is not None
    assert snapshot.header is not None
    assert snapshot.header.metadata == {"journey": "welcome"}
    assert snapshot.requested == 5
    stored = await rig.store.redis.hvals(rig.store.keys.recipients(ref.key))
    customers = sorted(i for batch in stored for i in as_text(batch).split("\x1e"))
    assert customers == ["C1", "C2", "C3", "C4", "C5"]
    assert await rig.statuses(ref) == [("ACCEPTED", None)]
    assert ref.key in await rig.store.due_members(
        rig.store.keys.work_queue, datetime.now(UTC) + timedelta(seconds=1), 100
    )


async def test_batches_before_the_header_wait_for_it(rig: IntakeRig) -> None:
    """Batches that arrive first keep the campaign COLLECTING until the header completes it."""
    ref = new_ref()
    rig.publish(recipients(ref, 1, ["C3"]), recipients(ref, 0, ["C1", "C2"]))
    await rig.wait_for_state(ref, CampaignState.COLLECTING)
    rig.publish(scheduled(ref, recipient_count=3, batch_count=2))
    await rig.wait_for_state(ref, CampaignState.READY)


async def test_redelivered_events_change_nothing(rig: IntakeRig) -> None:
    """The same events published twice (and a batch re-sent under a new id) count once."""
    ref = new_ref()
    header = scheduled(ref, recipient_count=3, batch_count=2)
    first = recipients(ref, 0, ["C1", "C2"])
    resent_first = recipients(ref, 0, ["C1", "C2"])  # same batch index, new event id
    rig.publish(header, first, header, first, resent_first)
    await rig.wait_for_state(ref, CampaignState.COLLECTING)
    second = recipients(ref, 1, ["C3"])
    rig.publish(second, second)
    await rig.wait_for_state(ref, CampaignState.READY)
    await eventually(_metric_reaches(rig, "events_duplicate_total", 3))
    snapshot = await rig.store.load(ref.key)
    assert snapshot is not None
    assert snapshot.requested == 3
    assert await rig.statuses(ref) == [("ACCEPTED", None)]


async def test_garbage_goes_to_the_dead_letter_topic_and_nothing_after_it_is_lost(
    rig: IntakeRig,
) -> None:
    """Undecodable bytes and an unknown fingerprint are dead-lettered with the DLQ headers, and
    counted by reason (every reason's series exists at 0 before the first dead letter)."""

    def dead_lettered(reason: str) -> float | None:
        name = "textlocal_consumer_events_dead_lettered_total"
        return rig.metrics.registry.get_sample_value(name, {"reason": reason})

    assert dead_lettered("unknown_schema_fingerprint") == 0
    assert dead_lettered("invalid_identity") == 0
    ref = new_ref()
    unknown_fingerprint = b"\xc3\x01" + bytes.fromhex("0011223344556677") + b"\x02"
    rig.publish(
        (b"junk-key", b"\x00\xffnot avro at all"),
        (b"other-key", unknown_fingerprint),
        scheduled(ref, recipient_count=1, batch_count=1),
        recipients(ref, 0, ["C1"]),
    )
    await rig.wait_for_state(ref, CampaignState.READY)
    # The two records sit in different input partitions: their dead letters come in any order.
    dead = sorted(
        await asyncio.to_thread(consume, rig.bootstrap, rig.dlq_topic, expected=2),
        key=lambda m: m.key(),
    )
    assert [m.key() for m in dead] == [b"junk-key", b"other-key"]
    assert dead[0].value() == b"\x00\xffnot avro at all"
    headers = dict(dead[1].headers())
    assert headers["dlq.source.topic"] == rig.topic.encode()
    assert headers["dlq.error.class"] == b"CodecError"
    assert b"unknown schema fingerprint 0011223344556677" in headers["dlq.error.message"]
    assert headers["dlq.attempts"] == b"1"
    assert {
        "dlq.source.partition",
        "dlq.source.offset",
        "dlq.source.timestamp",
        "dlq.consumer.group",
    } <= set(headers)
    assert dead_lettered("unknown_schema_fingerprint") == 1
    assert dead_lettered("invalid_identity") == 0


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"message_type": "MMS"}, "MMS_NOT_SUPPORTED"),
        ({"template_name": "PROMO_Spring"}, "UNKNOWN_TEMPLATE_PREFIX"),
        ({"recipient_count": 0}, "EMPTY_TARGET"),
        ({"scheduled_at": datetime.now(UTC) - timedelta(days=1)}, "SEND_TIME_PASSED"),
        ({"sender": "Not a valid sender!"}, "INVALID_SENDER"),
    ],
)
async def test_invalid_headers_are_rejected_with_their_reason(
    rig: IntakeRig, overrides: dict[str, object], code: str
) -> None:
    """An invalid header yields a REJECTED status naming the reason; later events still flow."""
    ref, after = new_ref(), new_ref()
    count = overrides.pop("recipient_count", 1)
    rig.publish(
        scheduled(ref, recipient_count=count, batch_count=1, **overrides),  # type: ignore[arg-type]
        recipients(ref, 0, ["C1"]),
        scheduled(after, recipient_count=1, batch_count=1),
        recipients(after, 0, ["C1"]),
    )
    # The two campaigns may sit in different partitions: wait for each.
    await rig.wait_for_state(after, CampaignState.READY)
    await rig.wait_for_state(ref, CampaignState.REJECTED)
    assert await rig.statuses(ref) == [("REJECTED", code)]


async def test_oversized_batch_rejects_the_campaign(rig: IntakeRig) -> None:
    """A batch of more than 10,000 customers rejects its campaign with BATCH_TOO_LARGE."""
    ref = new_ref()
    rig.publish(
        scheduled(ref, recipient_count=10_001, batch_count=2),
        recipients(ref, 0, [f"C{i}" for i in range(10_001)]),
    )
    await rig.wait_for_state(ref, CampaignState.REJECTED)
    assert await rig.statuses(ref) == [("ACCEPTED", None), ("REJECTED", "BATCH_TOO_LARGE")]
    assert not await rig.store.redis.exists(rig.store.keys.recipients(ref.key))


async def test_batch_index_beyond_batch_count_rejects_the_campaign(rig: IntakeRig) -> None:
    """A batch index the header does not allow rejects the campaign, whichever came first."""
    ref = new_ref()
    rig.publish(recipients(ref, 5, ["C1"]), scheduled(ref, recipient_count=2, batch_count=2))
    await rig.wait_for_state(ref, CampaignState.REJECTED)
    assert await rig.statuses(ref) == [("REJECTED", "BATCH_INDEX_OUT_OF_RANGE")]


async def test_cancel_while_collecting_cancels_at_once(rig: IntakeRig) -> None:
    """Cancelling before all batches arrived ends the campaign; later batches are ignored."""
    ref = new_ref()
    rig.publish(scheduled(ref, recipient_count=2, batch_count=2), recipients(ref, 0, ["C1"]))
    await rig.wait_for_state(ref, CampaignState.COLLECTING)
    rig.publish(cancelled(ref), recipients(ref, 1, ["C2"]))
    await rig.wait_for_state(ref, CampaignState.CANCELLED)
    await eventually(_metric_reaches(rig, "events_consumed_total", 4))
    assert await rig.state(ref) == CampaignState.CANCELLED
    assert await rig.statuses(ref) == [("ACCEPTED", None), ("CANCELLED", "CANCELLED_BY_OPTIMOVE")]


async def test_cancel_before_the_header_blocks_the_campaign(rig: IntakeRig) -> None:
    """A cancellation for an unknown campaign is remembered; its later header is ignored."""
    ref = new_ref()
    rig.publish(
        cancelled(ref), scheduled(ref, recipient_count=1, batch_count=1), recipients(ref, 0, ["C1"])
    )
    await eventually(_metric_reaches(rig, "events_consumed_total", 3))
    assert await rig.state(ref) == CampaignState.CANCELLED
    assert await rig.statuses(ref) == [("CANCELLED", "CANCELLED_BY_OPTIMOVE")]


async def test_cancel_of_a_ready_campaign_is_handed_to_the_executor(rig: IntakeRig) -> None:
    """A cancellation after READY marks the campaign for the executor, which owns TextLocal work."""
    ref = new_ref()
    rig.publish(scheduled(ref, recipient_count=1, batch_count=1), recipients(ref, 0, ["C1"]))
    await rig.wait_for_state(ref, CampaignState.READY)
    rig.publish(cancelled(ref, reason="budget"))

    async def marked() -> bool:
        snapshot = await rig.store.load(ref.key)
        return snapshot is not None and snapshot.cancel_requested

    await eventually(marked)
    snapshot = await rig.store.load(ref.key)
    assert snapshot is not None
    assert snapshot.state == CampaignState.READY
    assert snapshot.cancel_reason == "budget"


def _metric_reaches(rig: IntakeRig, name: str, total: float) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        samples = [
            sample.value
            for metric in rig.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == f"textlocal_consumer_{name}"
        ]
        return sum(samples) >= total

    probe.__name__ = f"{name} reaches {total}"
    return probe
