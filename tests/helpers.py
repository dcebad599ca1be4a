"""Builders and probes shared by the integration tests (no test lives here)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from consumer.codec import SchemaRegistry
from consumer.events import (
    CampaignCancelled,
    CampaignRecipients,
    CampaignRef,
    CampaignScheduled,
    InputEvent,
)

REGISTRY = SchemaRegistry.from_directory()


def new_ref(tenant_id: int = 42, channel_id: int = 505) -> CampaignRef:
    return CampaignRef(
        tenant_id, f"{uuid.uuid4().int % 10_000}.{uuid.uuid4().int % 100}", channel_id
    )


def scheduled(
    ref: CampaignRef,
    *,
    recipient_count: int,
    batch_count: int,
    scheduled_at: datetime | None = None,
    template_id: int = 1,
    template_name: str = "OPT_Welcome",
    message_type: str = "SMS",
    promo_codes: Sequence[str] = (),
    event_id: str | None = None,
    metadata: dict[str, str] | None = None,
    **overrides: Any,
) -> CampaignScheduled:
    now = datetime.now(UTC)
    return CampaignScheduled(
        event_id=event_id or f"sched-{uuid.uuid4()}",
        occurred_at=now,
        ref=ref,
        template_id=template_id,
        template_name=template_name,
        scheduled_at=scheduled_at or now,
        message_type=message_type,
        recipient_count=recipient_count,
        batch_count=batch_count,
        promo_codes=tuple(promo_codes),
        metadata=metadata if metadata is not None else {"journey": "welcome"},
        **overrides,
    )


def recipients(
    ref: CampaignRef, batch_index: int, customer_ids: Iterable[str], event_id: str | None = None
) -> CampaignRecipients:
    return CampaignRecipients(
        event_id=event_id or f"batch-{uuid.uuid4()}",
        occurred_at=datetime.now(UTC),
        ref=ref,
        batch_index=batch_index,
        customer_ids=tuple(customer_ids),
    )


def cancelled(ref: CampaignRef, reason: str = "changed our mind") -> CampaignCancelled:
    return CampaignCancelled(
        event_id=f"cancel-{uuid.uuid4()}", occurred_at=datetime.now(UTC), ref=ref, reason=reason
    )


def encode(event: InputEvent) -> bytes:
    return REGISTRY.encode(type(event).__name__, event.to_fields())


def produce(bootstrap: str, topic: str, items: Sequence[InputEvent | tuple[bytes, bytes]]) -> None:
    """Publish events (encoded) or raw (key, value) pairs, in order, and wait for them."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for item in items:
        if isinstance(item, tuple):
            producer.produce(topic, key=item[0], value=item[1])
        else:
            producer.produce(topic, key=item.ref.key.encode(), value=encode(item))
    assert producer.flush(30) == 0


def consume(bootstrap: str, topic: str, *, expected: int, timeout_s: float = 60.0) -> list[Any]:
    """Read a topic from the start until `expected` records arrived (or the timeout passed)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"probe-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for message in consumer.consume(100, 0.5):
                if message.error() is None:
                    records.append(message)
    finally:
        consumer.close()
    return records


def read_all(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[Any]:
    """Every record the topic holds now, from the start: read until each partition's position
    reaches the high watermark it had when called (no waiting for a quiet spell)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"probe-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    records: list[Any] = []
    try:
        partitions = consumer.list_topics(topic, timeout=timeout_s).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        left = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + timeout_s
        while left and time.monotonic() < deadline:
            for message in consumer.consume(500, 0.5):
                if message.error() is not None:
                    continue
                records.append(message)
                if (message.offset() or 0) + 1 >= ends[message.partition() or 0]:
                    left.discard(message.partition())
        assert not left, f"{topic}: partitions {sorted(left)} not read to their end in {timeout_s}s"
    finally:
        consumer.close()
    return records


def decode_value(value: bytes | None) -> dict[str, Any]:
    assert value is not None
    return REGISTRY.decode(value).fields


async def eventually(
    probe: Callable[[], Awaitable[bool]], timeout_s: float = 30.0, interval_s: float = 0.1
) -> None:
    """Wait until `probe()` holds; fail with a clear message when it never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await probe():
            return
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s: {probe.__name__}")


def in_minutes(minutes: float) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)
