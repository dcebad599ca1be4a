"""The outbox: output events recorded in Redis with their state change, then published to Kafka.

A state change and the events it causes are written in one atomic Redis call (see store.py), so
neither exists without the other. The publisher (one replica at a time, under a lease) reads the
stream in order, produces each event with the idempotent producer, waits for Kafka's
acknowledgement and only then deletes the entries. A crash between the two re-publishes: the
event ids are deterministic, so downstream sees an exact duplicate, never a different event.

An event Kafka refuses for good (too large, a topic that does not accept it, no authorisation)
must not hold up every event behind it: after `MAX_REFUSALS` refusals in a row it is set aside
in Redis (`keys.outbox_set_aside`, with Kafka's reason), counted and logged at ERROR, and the
others flow on. Transient errors (broker away) still wait and retry, in order.

The loop is the project's single-holder loop (`consumer.leased_work.SingleHolder`): the lease is
claimed with a token new at each claim and renewed while a batch is being published (a broker
taking its time must not let another replica publish beside this one). An unexpected error while
publishing (a bug, an entry that does not parse) is logged and counted there; after
`max_failures` in a row the entry at the head of the stream is set aside here with that error,
so one bad entry cannot stop every status of every campaign.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from consumer.clock import Clock
from consumer.codec import SchemaRegistry
from consumer.errors import KafkaRecordRefused
from consumer.events import (
    CampaignStatusEvent,
    CustomerOptOutEvent,
    DeliveryMetricsEvent,
    TemplateRecord,
)
from consumer.kafka_io import OutboundRecord
from consumer.leased_work import HolderLog, SingleHolder
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.store import CampaignStore, OutboxEntry

log = logging.getLogger("consumer.outbox")

STATUS, METRICS, TEMPLATES = "status", "metrics", "templates"
OPTOUTS = "optouts"
# Refusals of one event in a row before it is set aside (each is a produce Kafka answered "no").
MAX_REFUSALS = 3


def status_entry(registry: SchemaRegistry, event: CampaignStatusEvent) -> OutboxEntry:
    return OutboxEntry(
        topic=STATUS,
        key=event.ref.key,
        value=registry.encode("CampaignStatus", event.to_fields()),
        event_id=event.event_id,
    )


def metrics_entry(registry: SchemaRegistry, event: DeliveryMetricsEvent) -> OutboxEntry:
    return OutboxEntry(
        topic=METRICS,
        key=event.ref.key,
        value=registry.encode("DeliveryMetrics", event.to_fields()),
        event_id=event.event_id,
    )


def template_entry(registry: SchemaRegistry, record: TemplateRecord) -> OutboxEntry:
    return OutboxEntry(
        topic=TEMPLATES,
        key=str(record.id),
        value=registry.encode("Template", record.to_fields()),
        event_id=f"template:{record.id}:{int(record.imported_at.timestamp())}",
    )


def template_tombstone(template_id: int) -> OutboxEntry:
    return OutboxEntry(
        topic=TEMPLATES, key=str(template_id), value=None, event_id=f"template:{template_id}:gone"
    )


def optout_entry(registry: SchemaRegistry, event: CustomerOptOutEvent) -> OutboxEntry:
    return OutboxEntry(
        topic=OPTOUTS,
        key=event.key,
        value=registry.encode("CustomerOptOut", event.to_fields()),
        event_id=event.event_id,
    )


class RecordPublisher(Protocol):
    async def publish_many(self, records: Sequence[OutboundRecord]) -> None: ...


class OutboxPublisher:
    """Moves outbox entries to their Kafka topics, in order, one replica at a time."""

    def __init__(
        self,
        store: CampaignStore,
        publisher: RecordPublisher,
        topics: Mapping[str, str],
        metrics: Metrics,
        clock: Clock,
        owner: str,
        lease_ttl_ms: int = 10_000,
        batch_size: int = 500,
        max_failures: int = 5,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._topics = dict(topics)
        self._metrics = metrics
        self._batch_size = batch_size
        self._last_id = "0-0"
        self._refusals: dict[str, int] = {}  # entry id → refusals in a row
        # At 0 from the start, so the first one is an increase (see consumer.metrics).
        for kind in self._topics:
            metrics.outbox_set_aside.labels(kind)
        self._holder = SingleHolder(
            store,
            role="outbox",
            lease_key=store.keys.outbox_lease,
            work=self.publish_pending,
            wait_for_more=self._wait_for_more,
            give_up_head=self._set_aside_head,
            events=HolderLog(
                log,
                retrying="outbox.publish_failed",
                failed="outbox.failed",
                gave_up="outbox.head_set_aside",
                give_up_failed="outbox.set_aside_failed",
            ),
            metrics=metrics,
            clock=clock,
            owner=owner,
            lease_ttl_ms=lease_ttl_ms,
            max_failures=max_failures,
        )

    async def run(self, stopping: asyncio.Event) -> None:
        await self._holder.run(stopping)

    async def _wait_for_more(self) -> None:
        await self._store.wait_for_outbox(self._last_id, timeout_ms=500)

    async def _set_aside_head(self, error: Exception) -> str | None:
        """Set the head entry aside, as it is, after repeated unexpected errors."""
        head = await self._store.outbox_head_id()
        if head is not None:
            await self._store.outbox_set_aside_raw(head, f"{type(error).__name__}: {error}")
        return head

    async def publish_pending(self) -> int:
        """Publish every entry recorded so far (in batches); returns how many were published."""
        total = 0
        while True:
            entries = await self._store.outbox_read(self._batch_size)
            if not entries:
                self._metrics.outbox_pending.set(0)
                return total
            published = await self._publish(entries)
            self._last_id = entries[-1].entry_id
            for entry in published:
                self._metrics.events_published.labels(entry.topic).inc()
            total += len(published)
            self._metrics.outbox_pending.set(await self._store.outbox_length())

    async def _publish(self, entries: Sequence[OutboxEntry]) -> list[OutboxEntry]:
        """Publish a batch; delete what Kafka took, set aside what it keeps refusing."""
        try:
            await self._publisher.publish_many(
                [(self._topics[e.topic], e.key, e.value, ()) for e in entries]
            )
        except KafkaRecordRefused as exc:
            refused = exc.refused
        else:
            refused = {}
        published = [e for position, e in enumerate(entries) if position not in refused]
        await self._store.outbox_delete([e.entry_id for e in published])
        if self._refusals:
            for entry in published:
                self._refusals.pop(entry.entry_id, None)
        set_aside: list[tuple[OutboxEntry, str]] = []
        for position, reason in refused.items():
            entry = entries[position]
            count = self._refusals[entry.entry_id] = self._refusals.get(entry.entry_id, 0) + 1
            log_event(
                log,
                "outbox.event_refused",
                logging.WARNING,
                kind=entry.topic,
                campaign=entry.key,
                event_id=entry.event_id,
                reason=reason,
                refusals=count,
            )
            if count >= MAX_REFUSALS:
                set_aside.append((entry, reason))
        if set_aside:
            await self._store.outbox_set_aside(set_aside)
            for entry, reason in set_aside:
                self._refusals.pop(entry.entry_id, None)
                self._metrics.outbox_set_aside.labels(entry.topic).inc()
                log_event(
                    log,
                    "outbox.event_set_aside",
                    logging.ERROR,
                    kind=entry.topic,
                    campaign=entry.key,
                    event_id=entry.event_id,
                    reason=reason,
                    value_bytes=len(entry.value or b""),
                )
        return published

    async def publish_once(self) -> int | None:
        """Publish what is pending now (one-shot commands); None when a daemon holds the lease
        and will publish it itself."""
        return await self._holder.once()

    async def release(self) -> None:
        await self._holder.release()
