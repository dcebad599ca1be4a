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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from consumer.clock import Clock, pause
from consumer.codec import SchemaRegistry
from consumer.errors import KafkaRecordRefused, TransientError
from consumer.events import CampaignStatusEvent, DeliveryMetricsEvent, TemplateRecord
from consumer.kafka_io import OutboundRecord
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.store import CampaignStore, OutboxEntry

log = logging.getLogger("consumer.outbox")

STATUS, METRICS, TEMPLATES = "status", "metrics", "templates"
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
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._topics = dict(topics)
        self._metrics = metrics
        self._clock = clock
        self._owner = owner
        self._lease_ttl_ms = lease_ttl_ms
        self._batch_size = batch_size
        self._holding = False
        self._last_id = "0-0"
        self._refusals: dict[str, int] = {}  # entry id → refusals in a row

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                published = await self.publish_pending() if await self._hold_lease() else 0
            except TransientError as exc:
                log_event(log, "outbox.publish_failed", logging.WARNING, error=str(exc))
                await pause(stopping, 1.0)
                continue
            self._metrics.loop_last_iteration.labels("outbox").set(self._clock.now().timestamp())
            if published == 0:
                if self._holding:
                    await self._store.wait_for_outbox(self._last_id, timeout_ms=500)
                else:
                    await pause(stopping, self._lease_ttl_ms / 2000)
        await self.release()

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
        if not await self._hold_lease():
            return None
        try:
            return await self.publish_pending()
        finally:
            await self.release()

    async def release(self) -> None:
        if self._holding:
            await self._store.release_lease(self._store.keys.outbox_lease, self._owner)
            self._holding = False
            self._metrics.leases_held.labels("outbox").set(0)

    async def _hold_lease(self) -> bool:
        lease = self._store.keys.outbox_lease
        if self._holding:
            self._holding = await self._store.renew_lease(lease, self._owner, self._lease_ttl_ms)
        else:
            self._holding = await self._store.acquire_lease(lease, self._owner, self._lease_ttl_ms)
        self._metrics.leases_held.labels("outbox").set(1 if self._holding else 0)
        return self._holding
