"""Intake: the input topic → validated campaign state in Redis (DESIGN §2, §4 steps 1, 2, 5).

Fast and TextLocal-free. For every record, in partition order:

    decode ──undecodable, or an unusable identity──► dead-letter topic (original key, value,
      │       headers + dlq.* headers; cut to fit Kafka's record limit, with dlq.truncated)
      ├─ an event id already seen for something else ─► REJECTED EVENT_ID_REUSED
      │
      ├─ CampaignScheduled  ─ invalid ─► REJECTED status;  valid ─► header recorded, ACCEPTED
      ├─ CampaignRecipients ─ invalid ─► REJECTED status;  valid ─► batch recorded (maybe READY)
      └─ CampaignCancelled  ─► cancelled now (nothing sent yet), or handed to the executor

and only then is the record's offset stored. When Redis or Kafka is unavailable the record is
retried (with backoff) until it is handled or the daemon stops; an unhandled record's offset is
never stored, so it is read again after a restart. Duplicates (redelivery) change nothing.

During such an outage intake pauses its partitions and keeps polling Kafka (as Sentry's arroyo
does under backpressure): the consumer stays in its group however long the outage lasts (no
`max.poll.interval.ms` expiry, no rebalance), its loop heartbeat stays fresh for `/healthz`, and
it resumes the partitions once the record is handled. Records the polls return meanwhile are
kept, in order, and handled next.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from consumer.clock import Clock, pause
from consumer.codec import SchemaRegistry
from consumer.dependencies import FailureStreak
from consumer.errors import CodecError, KafkaRecordRefused, KafkaUnavailable, TransientError
from consumer.events import (
    INPUT_EVENT_NAMES,
    CampaignCancelled,
    CampaignRecipients,
    CampaignScheduled,
    CampaignStatusEvent,
    InputEvent,
    RecipientCounts,
    StatusCode,
    StatusError,
    parse_input_event,
)
from consumer.kafka_io import Headers, InboundRecord, record_size
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.outbox import status_entry
from consumer.store import (
    LEGACY_SEEN_MARKER,
    CampaignSnapshot,
    CampaignStore,
    event_fingerprint,
)
from consumer.workflow import (
    CampaignState,
    ContactGroup,
    IntakeLimits,
    batch_index_problem,
    identity_problem,
    metadata_bytes,
    validate_recipients,
    validate_scheduled,
)

log = logging.getLogger("consumer.intake")

# Campaigns that ended are kept this long (to ignore late events for them), then expire.
FINISHED_CAMPAIGN_RETENTION_S = 30 * 24 * 3600
_RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0)
# Our headers on a dead letter. Input headers with this prefix are renamed (INPUT_HEADER_PREFIX
# put before them), so a producer can never pass a header off as ours.
DLQ_HEADER_PREFIX = "dlq."
INPUT_HEADER_PREFIX = "input."
# Room left under the record limit for Kafka's own framing of a record.
_RECORD_OVERHEAD_BYTES = 1024


class RecordSource(Protocol):
    async def start(self) -> None: ...

    async def poll(self, max_records: int, timeout_s: float) -> list[InboundRecord]: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def store_offset(self, record: InboundRecord) -> None: ...

    async def commit(self) -> None: ...


class DeadLetterPublisher(Protocol):
    max_record_bytes: int

    async def publish(
        self,
        topic: str,
        key: bytes | str | None,
        value: bytes | None,
        headers: Headers = (),
    ) -> None: ...


@dataclass(frozen=True)
class IntakeSettings:
    dlq_topic: str
    consumer_group: str
    collect_timeout: timedelta = timedelta(hours=6)
    limits: IntakeLimits = field(default_factory=IntakeLimits)
    poll_batch: int = 500


class Intake:
    """Consumes the input topic into Redis; see the module docstring."""

    def __init__(
        self,
        source: RecordSource,
        dead_letters: DeadLetterPublisher,
        store: CampaignStore,
        registry: SchemaRegistry,
        groups: Sequence[ContactGroup],
        settings: IntakeSettings,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self._source = source
        self._dead_letters = dead_letters
        self._store = store
        self._registry = registry
        self._groups = tuple(groups)
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake-decode")
        # At 0 from the start, so the first dead letter is an increase (see consumer.metrics).
        for reason in DEAD_LETTER_REASONS:
            metrics.events_dead_lettered.labels(reason)

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until `stopping` is set; then commit what was handled."""
        await self._source.start()
        backlog: list[InboundRecord] = []
        try:
            while not stopping.is_set():
                records = backlog or await self._source.poll(self._settings.poll_batch, 0.5)
                backlog = []
                if not await self._handle_in_order(records, stopping, backlog):
                    return  # stopping mid-retry: the record stays uncommitted, read again
                self._beat()
        finally:
            try:
                await self._source.commit()
            except KafkaUnavailable as exc:
                # What is not committed is read again by the next owner, and handling is
                # idempotent: a broker away at shutdown is no reason to exit with an error.
                log_event(log, "intake.commit_failed", logging.WARNING, error=str(exc))

    def _beat(self) -> None:
        self._metrics.loop_last_iteration.labels("intake").set(self._clock.now().timestamp())

    async def _handle_in_order(
        self,
        records: Sequence[InboundRecord],
        stopping: asyncio.Event,
        backlog: list[InboundRecord],
    ) -> bool:
        """Handle records one after the other, storing each offset once its record is handled.

        The next record is decoded on a worker thread while Redis records the current one
        (decoding a batch of 10,000 customers and recording it take about the same time).
        Records polled while waiting out an outage are appended to `backlog`.
        """
        loop = asyncio.get_running_loop()
        following = (
            loop.run_in_executor(self._decoder, self.decode, records[0]) if records else None
        )
        for position, record in enumerate(records):
            assert following is not None
            current = await following
            if position + 1 < len(records):
                following = loop.run_in_executor(self._decoder, self.decode, records[position + 1])
            if not await self._handle_until_done(record, current, stopping, backlog):
                return False
            await self._source.store_offset(record)
        return True

    async def _handle_until_done(
        self,
        record: InboundRecord,
        decoded: InputEvent | CodecError,
        stopping: asyncio.Event,
        backlog: list[InboundRecord],
    ) -> bool:
        """Handle one record, waiting out outages; False when stopping first.

        A record that makes our own code fail (a bug, a value nothing anticipated) is
        dead-lettered with that error's class: no record stops intake.
        """
        attempt = 0
        streak = FailureStreak(log, "intake.retry")
        paused = False
        failure: Exception | None = None
        try:
            while True:
                try:
                    if failure is None:
                        await self.apply(record, decoded)
                    else:
                        await self._dead_letter(
                            record, type(failure).__name__, str(failure), "handler_error"
                        )
                    return True
                except TransientError as exc:
                    delay = _RETRY_DELAYS_S[min(attempt, len(_RETRY_DELAYS_S) - 1)]
                    attempt += 1
                    streak.failed(
                        partition=record.partition,
                        offset=record.offset,
                        error=str(exc),
                        retry_in_s=delay,
                    )
                    paused = True
                    if await self._wait_polling(delay, stopping, backlog):
                        return False
                except Exception as exc:
                    if failure is not None:
                        raise  # dead-lettering itself fails: a fault of ours, not the record's
                    failure = exc
                    log_event(
                        log,
                        "intake.record_failed",
                        logging.ERROR,
                        partition=record.partition,
                        offset=record.offset,
                        error_class=type(exc).__name__,
                        error=str(exc)[:500],
                        traceback="".join(traceback.format_exception(exc))[-4000:],
                    )
        finally:
            if paused:
                await self._resume_quietly()
                streak.succeeded()

    async def _wait_polling(
        self, delay_s: float, stopping: asyncio.Event, backlog: list[InboundRecord]
    ) -> bool:
        """Wait `delay_s` with the partitions paused, polling to stay in the group.

        Returns True when stopping.
        """
        deadline = asyncio.get_running_loop().time() + delay_s
        while not stopping.is_set():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            try:
                await self._source.pause()  # again: partitions may have been assigned since
                backlog += await self._source.poll(self._settings.poll_batch, min(0.5, remaining))
            except KafkaUnavailable as exc:
                log_event(log, "intake.poll_failed", logging.DEBUG, error=str(exc))
                await pause(stopping, min(0.5, max(remaining, 0.0)))
            self._beat()  # waiting out an outage is not a stalled loop
        return True

    async def _resume_quietly(self) -> None:
        try:
            await self._source.resume()
        except KafkaUnavailable as exc:
            log_event(log, "intake.resume_failed", logging.WARNING, error=str(exc))

    async def handle(self, record: InboundRecord) -> str:
        """Decode and handle one record durably; returns what happened (for logs and tests)."""
        return await self.apply(record, self.decode(record))

    def decode(self, record: InboundRecord) -> InputEvent | CodecError:
        """The record's event, or the reason it cannot be decoded (pure CPU, no I/O)."""
        try:
            if record.value is None:
                raise CodecError("record has no value (null)")
            decoded = self._registry.decode(record.value, expected=INPUT_EVENT_NAMES)
        except CodecError as exc:
            return exc
        return parse_input_event(decoded.name, decoded.fields)

    async def apply(self, record: InboundRecord, decoded: InputEvent | CodecError) -> str:
        """Record a decoded event in Redis, or dead-letter an undecodable record."""
        if isinstance(decoded, CodecError):
            await self._dead_letter(
                record, "CodecError", str(decoded), _dead_letter_reason(decoded)
            )
            return "dead-lettered"
        event = decoded
        kind = type(event).__name__
        unusable = identity_problem(event.event_id, event.ref.campaign_id)
        if unusable is not None:
            # Its key would go into every Redis key and output record: not even a REJECTED
            # status can carry it.
            await self._dead_letter(record, "InvalidIdentity", unusable, "invalid_identity")
            return "dead-lettered"
        self._metrics.events_consumed.labels(kind).inc()
        fingerprint = event_fingerprint(kind, event.ref.key, record.value)
        if isinstance(event, CampaignScheduled):
            outcome = await self._on_scheduled(event, fingerprint)
        elif isinstance(event, CampaignRecipients):
            outcome = await self._on_recipients(event, fingerprint)
        else:
            outcome = await self._on_cancelled(event, fingerprint)
        if outcome.startswith("duplicate"):
            self._metrics.events_duplicate.labels(kind).inc()
        log_event(
            log,
            "intake.event",
            type=kind,
            campaign=event.ref.key,
            event_id=event.event_id,
            outcome=outcome,
            partition=record.partition,
            offset=record.offset,
        )
        return outcome

    # --- events -------------------------------------------------------------------------------

    async def _seen_before(self, event: InputEvent, fingerprint: str) -> str | None:
        """ "duplicate-event" for a redelivery, a rejection for a reused id, None when new."""
        seen_as = await self._store.seen_event(event.event_id)
        if seen_as is None:
            return None
        if seen_as in (fingerprint, LEGACY_SEEN_MARKER):
            return "duplicate-event"
        return await self._reject_reused_id(event)

    async def _reject_reused_id(self, event: InputEvent) -> str:
        return await self._reject(
            event,
            StatusError(
                "EVENT_ID_REUSED",
                f"event_id {event.event_id!r} was already used by another event "
                "(another campaign, type or content); event ids must be unique",
            ),
            fingerprint=None,
        )

    async def _on_scheduled(self, event: CampaignScheduled, fingerprint: str) -> str:
        if seen := await self._seen_before(event, fingerprint):
            return seen
        now = self._clock.now()
        problem = validate_scheduled(event, self._groups, now, self._settings.limits)
        if problem is not None:
            return await self._reject(event, problem, fingerprint, header=event)
        accepted = CampaignStatusEvent(
            ref=event.ref,
            status=StatusCode.ACCEPTED,
            occurred_at=now,
            counts=RecipientCounts(requested=event.recipient_count),
            send_at=event.scheduled_at,
            metadata=event.metadata,
        )
        outcome = await self._store.record_header(
            event,
            status_entry(self._registry, accepted),
            now,
            now + self._settings.collect_timeout,
            fingerprint,
        )
        if outcome.result == "event-id-reused":
            return await self._reject_reused_id(event)
        if outcome.result == "bad-index":
            indexes = await self._store.batch_indexes(event.ref.key)
            index_problem = batch_index_problem(indexes, event.batch_count)
            assert index_problem is not None
            return await self._reject(event, index_problem, fingerprint, header=event)
        if outcome.recorded:
            self._metrics.campaign_transitions.labels(outcome.state).inc()
        return f"{outcome.result}:{outcome.state}"

    async def _on_recipients(self, event: CampaignRecipients, fingerprint: str) -> str:
        # Duplicates are recognised inside record_batch's single Redis call.
        problem = validate_recipients(event)
        if problem is not None:
            if seen := await self._seen_before(event, fingerprint):
                return seen
            return await self._reject(event, problem, fingerprint)
        now = self._clock.now()
        outcome = await self._store.record_batch(
            event, now, now + self._settings.collect_timeout, fingerprint
        )
        if outcome.result == "event-id-reused":
            return await self._reject_reused_id(event)
        if outcome.result == "bad-index":
            snapshot = await self._store.load(event.ref.key)
            count = snapshot.header.batch_count if snapshot and snapshot.header else 0
            index_problem = batch_index_problem([event.batch_index], count)
            assert index_problem is not None
            return await self._reject(event, index_problem, fingerprint)
        if outcome.recorded and outcome.state == CampaignState.READY:
            self._metrics.campaign_transitions.labels(outcome.state).inc()
        return f"{outcome.result}:{outcome.state}"

    async def _on_cancelled(self, event: CampaignCancelled, fingerprint: str) -> str:
        if seen := await self._seen_before(event, fingerprint):
            return seen
        for _ in range(5):  # a concurrent change (the executor) makes us look again
            snapshot = await self._store.load(event.ref.key)
            outcome = await self._cancel(event, snapshot, fingerprint)
            if outcome is not None:
                return outcome
        raise TransientError(f"campaign {event.ref.key} kept changing while being cancelled")

    async def _cancel(
        self, event: CampaignCancelled, snapshot: CampaignSnapshot | None, fingerprint: str
    ) -> str | None:
        key = event.ref.key
        keys = self._store.keys
        now = self._clock.now()
        transition = self._store.transition(key).mark_seen(
            keys.event_seen(event.event_id), fingerprint
        )
        if snapshot is not None and snapshot.state.is_final:
            transition.expect(snapshot.state)
            result = await self._store.apply(transition, now)
            return f"ignored:{snapshot.state}" if result.ok else None
        if snapshot is None or snapshot.state == CampaignState.COLLECTING:
            # Nothing was created at TextLocal yet: cancelled here and now.
            header = snapshot.header if snapshot else None
            cancelled = CampaignStatusEvent(
                ref=event.ref,
                status=StatusCode.CANCELLED,
                occurred_at=now,
                counts=RecipientCounts(requested=snapshot.requested if snapshot else 0),
                error=StatusError("CANCELLED_BY_OPTIMOVE", event.reason or "no reason given"),
                metadata=header.metadata if header else {},
            )
            transition = (
                transition.expect(CampaignState.COLLECTING, absent=True)
                .set_state(CampaignState.CANCELLED)
                .set(cancel_reason=event.reason or "", ended_at=now)
                .dequeue(keys.collecting_queue, key)
                .delete_key(keys.recipients(key))
                .delete_key(keys.batches(key))
                .emit(keys.outbox, status_entry(self._registry, cancelled))
                .expire(keys.campaign(key), FINISHED_CAMPAIGN_RETENTION_S)
            )
            result = await self._store.apply(transition, now)
            if result.ok:
                self._metrics.campaign_transitions.labels(CampaignState.CANCELLED).inc()
            return "cancelled" if result.ok else None
        # Work may exist at TextLocal (a segment, a scheduled send): the executor finishes it.
        transition = (
            transition.expect(snapshot.state)
            .set(cancel_requested=True, cancel_reason=event.reason or "")
            .enqueue(keys.work_queue, key, now)
        )
        result = await self._store.apply(transition, now)
        return "cancel-requested" if result.ok else None

    # --- rejection and dead letters -----------------------------------------------------------

    async def _reject(
        self,
        event: InputEvent,
        problem: StatusError,
        fingerprint: str | None,
        header: CampaignScheduled | None = None,
    ) -> str:
        """REJECTED status for the campaign (if it has not started).

        The event id is remembered with `fingerprint`; None leaves the id's record as it is (a
        reused id stays bound to the event that first had it).
        """
        self._metrics.events_rejected.labels(type(event).__name__, problem.code).inc()
        key = event.ref.key
        keys = self._store.keys
        now = self._clock.now()
        snapshot = await self._store.load(key)
        if header is None and snapshot is not None:
            header = snapshot.header
        log_event(
            log,
            "intake.rejected",
            logging.WARNING,
            campaign=key,
            event_id=event.event_id,
            reason=problem.code,
            detail=problem.message,
        )
        transition = self._store.transition(key)
        if fingerprint is not None:
            transition.mark_seen(keys.event_seen(event.event_id), fingerprint)
        if snapshot is not None and snapshot.state not in (
            CampaignState.COLLECTING,
            CampaignState.READY,
        ):
            # Too late to reject the campaign (it is under way or over): only this event is
            # refused, which the log line and the metric above record.
            await self._store.apply(transition, now)
            return f"rejected-event:{snapshot.state}"
        rejected = CampaignStatusEvent(
            ref=event.ref,
            status=StatusCode.REJECTED,
            occurred_at=now,
            qualifier=event.event_id,
            counts=RecipientCounts(requested=snapshot.requested if snapshot else 0),
            error=problem,
            send_at=header.scheduled_at if header else None,
            metadata=self._echoable_metadata(header),
        )
        transition = (
            transition.expect(CampaignState.COLLECTING, CampaignState.READY, absent=True)
            .set_state(CampaignState.REJECTED)
            .set(error_code=problem.code, error_message=problem.message, ended_at=now)
            .dequeue(keys.collecting_queue, key)
            .dequeue(keys.work_queue, key)
            .delete_key(keys.recipients(key))
            .delete_key(keys.batches(key))
            .delete_key(keys.recipient_codes(key))
            .delete_key(keys.distinct_codes(key))
            .emit(keys.outbox, status_entry(self._registry, rejected))
            .expire(keys.campaign(key), FINISHED_CAMPAIGN_RETENTION_S)
        )
        result = await self._store.apply(transition, now)
        if not result.ok:
            raise TransientError(f"campaign {key} changed while being rejected ({result.reason})")
        self._metrics.campaign_transitions.labels(CampaignState.REJECTED).inc()
        return f"rejected:{problem.code}"

    def _echoable_metadata(self, header: CampaignScheduled | None) -> dict[str, str]:
        """The header's metadata for an output event; none when it is over the bound."""
        if header is None:
            return {}
        if metadata_bytes(header.metadata) > self._settings.limits.max_metadata_bytes:
            return {}
        return dict(header.metadata)

    async def _dead_letter(
        self, record: InboundRecord, error_class: str, message: str, reason: str
    ) -> None:
        """Copy the record to the dead-letter topic, whole when it fits, else cut to fit."""
        ours: list[tuple[str, bytes | None]] = [
            ("dlq.source.topic", record.topic.encode()),
            ("dlq.source.partition", str(record.partition).encode()),
            ("dlq.source.offset", str(record.offset).encode()),
            ("dlq.source.timestamp", str(record.timestamp_ms or "").encode()),
            ("dlq.consumer.group", self._settings.consumer_group.encode()),
            ("dlq.error.class", error_class.encode()),
            ("dlq.error.message", message[:1000].encode()),
            ("dlq.attempts", b"1"),
        ]
        theirs = [
            (INPUT_HEADER_PREFIX + name if name.startswith(DLQ_HEADER_PREFIX) else name, value)
            for name, value in record.headers
        ]
        limit = self._dead_letters.max_record_bytes - _RECORD_OVERHEAD_BYTES
        for copy in _dead_letter_copies(record, theirs, ours, limit):
            try:
                await self._dead_letters.publish(self._settings.dlq_topic, *copy)
                break
            except KafkaRecordRefused as exc:
                refusal = str(exc)  # the topic allows less than we do: a smaller copy next
        else:
            # Not even the coordinates could be published; the record stays in the input
            # topic for its retention, and this line says where.
            self._metrics.events_dead_lettered.labels("refused_by_kafka").inc()
            log_event(
                log,
                "intake.dead_letter_refused",
                logging.ERROR,
                partition=record.partition,
                offset=record.offset,
                error=refusal,
            )
            return
        self._metrics.events_dead_lettered.labels(reason).inc()
        log_event(
            log,
            "intake.dead_lettered",
            logging.WARNING,
            partition=record.partition,
            offset=record.offset,
            error_class=error_class,
            error=message[:300],
            truncated=copy[1] is not record.value,
        )


DeadLetterCopy = tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]


def _dead_letter_copies(
    record: InboundRecord,
    theirs: list[tuple[str, bytes | None]],
    ours: list[tuple[str, bytes | None]],
    limit: int,
) -> list[DeadLetterCopy]:
    """The dead letters to try in turn: whole if it fits, then cut to fit, then coordinates only.

    A cut copy keeps the start of the value and says so (`dlq.truncated`, the original sizes); the
    original stays findable by `dlq.source.*` for the input topic's retention.
    """
    whole: DeadLetterCopy = (record.key, record.value, [*theirs, *ours])
    original = [
        ("dlq.truncated", b"true"),
        ("dlq.original.value.bytes", str(len(record.value or b"")).encode()),
        ("dlq.original.headers", str(len(record.headers)).encode()),
    ]
    key = record.key if len(record.key or b"") <= 1024 else (record.key or b"")[:1024]
    bare: DeadLetterCopy = (key, None, [*ours, *original])
    copies = []
    if record_size(*whole) <= limit:
        copies.append(whole)
    else:
        with_headers = (key, b"", [*theirs, *ours, *original])
        room = limit - record_size(*with_headers)
        if room < 0:  # the input's headers alone are too large: dropped (counted above)
            room = limit - record_size(*bare)
            copies.append((key, (record.value or b"")[: max(room, 0)], bare[2]))
        else:
            copies.append((key, (record.value or b"")[:room], with_headers[2]))
    copies.append(bare)
    return copies


# What the codec's messages say, most specific first; as labels, with "_" for " ".
_CODEC_REASONS = (
    "truncated header",
    "bad marker",
    "unknown schema fingerprint",
    "unexpected record",
    "truncated",
    "malformed",
    "trailing bytes",
    "no value",
)
# Every `reason` of events_dead_lettered_total.
DEAD_LETTER_REASONS = (
    *(reason.replace(" ", "_") for reason in _CODEC_REASONS),
    "undecodable",
    "invalid_identity",
    "handler_error",
    "refused_by_kafka",
)


def _dead_letter_reason(error: CodecError) -> str:
    """A bounded label for the metric, from the codec's message."""
    text = str(error)
    for reason in _CODEC_REASONS:
        if reason in text:
            return reason.replace(" ", "_")
    return "undecodable"
