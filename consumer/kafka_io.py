"""Kafka at the edge: the input consumer, the output producer and topic creation.

confluent-kafka's calls block, so each client runs on its own thread (one thread per consumer,
because librdkafka consumers want one caller) and asyncio awaits them. Kafka's errors and message
objects are translated here into `InboundRecord` and `KafkaUnavailable`; nothing above imports
confluent_kafka.

Offsets: `enable.auto.offset.store` is off, so an offset is stored only when the caller says the
record is safely handled; librdkafka's auto-commit then commits stored offsets periodically, and
`commit()` commits them at once (on shutdown and rebalance).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from consumer.errors import KafkaRecordRefused, KafkaUnavailable

log = logging.getLogger("consumer.kafka")


class LibrdkafkaNoise(logging.Filter):
    """Lets each kind of librdkafka complaint through at most once a minute.

    While a broker is away librdkafka logs every reconnection attempt ("FAIL ... Connect to ...
    failed"), hundreds a minute; the outage itself is reported once by consumer.dependencies.
    Our own records on this logger pass untouched.
    """

    _LIBRDKAFKA = re.compile(r"^([A-Z]+) \[rdkafka#")

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self._every_s = every_s
        self._last_s: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        match = self._LIBRDKAFKA.match(record.getMessage())
        if match is None:
            return True
        now_s = time.monotonic()
        facility = match.group(1)
        if now_s - self._last_s.get(facility, float("-inf")) < self._every_s:
            return False
        self._last_s[facility] = now_s
        return True


log.addFilter(LibrdkafkaNoise())

KafkaConfig = Mapping[str, str | int | float | bool]
Headers = Sequence[tuple[str, bytes | None]]
OutboundRecord = tuple[str, bytes | str | None, bytes | None, Headers]

# Errors for which Kafka will never take the record, however often it is produced again.
_REFUSED_FOR_GOOD = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.POLICY_VIOLATION,
        KafkaError._INVALID_ARG,  # e.g. a topic name librdkafka will not produce to
    }
)


@dataclass(frozen=True)
class InboundRecord:
    """One record read from Kafka, as plain values."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]  # a null header value stays None
    timestamp_ms: int | None


class KafkaObserver(Protocol):
    """Hooks for metrics, so this module does not depend on prometheus."""

    def partition_lag(self, topic: str, partition: int, lag: int) -> None: ...

    def assignment_changed(self, assigned: int) -> None: ...

    def partition_revoked(self, topic: str, partition: int) -> None: ...


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: Mapping[str, str]


class KafkaEventSource:
    """Reads the input topic through a consumer group; stores offsets only when told."""

    def __init__(
        self,
        config: KafkaConfig,
        topics: Sequence[str],
        observer: KafkaObserver | None = None,
    ) -> None:
        self._topics = list(topics)
        self._observer = observer
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-consumer")
        self._assigned: frozenset[tuple[str, int]] = frozenset()
        self._joined = False
        self._closed = False
        self._consume_errors = 0  # in a row: the first is a warning, the rest debug
        settings: dict[str, Any] = {
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "statistics.interval.ms": 15000,
            **config,
            # Not overridable: the product's no-loss guarantee rests on these two.
            "enable.auto.offset.store": False,
            "enable.auto.commit": True,
            "stats_cb": self._on_stats,
            "logger": log,
        }
        self._consumer = Consumer(settings)

    @property
    def has_joined_group(self) -> bool:
        """True once the group gave this consumer an assignment (possibly empty)."""
        return self._joined

    async def start(self) -> None:
        await self._call(
            lambda: self._consumer.subscribe(
                self._topics,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
        )

    async def poll(self, max_records: int, timeout_s: float) -> list[InboundRecord]:
        """Up to `max_records` records, waiting at most `timeout_s` for the first one."""
        messages = await self._call(lambda: self._consume(max_records, timeout_s))
        records = []
        for message in messages:
            error = message.error()
            if error is not None:
                # _FATAL arrives as an event that is not itself "fatal": a static member fenced by
                # another with the same group.instance.id. This consumer reads nothing more.
                if error.fatal() or error.code() == KafkaError._FATAL:
                    raise KafkaUnavailable(f"Kafka consumer failed: {error.str()}")
                # Brokers away: librdkafka reconnects by itself. One warning per streak.
                self._consume_errors += 1
                level = logging.WARNING if self._consume_errors == 1 else logging.DEBUG
                log.log(level, "kafka.consume_error", extra={"error": error.str()})
                continue
            self._consume_errors = 0
            records.append(
                InboundRecord(
                    topic=str(message.topic()),
                    partition=int(message.partition() or 0),
                    offset=int(message.offset() or 0),
                    key=_as_bytes(message.key()),
                    value=_as_bytes(message.value()),
                    headers=tuple(
                        (name, _as_bytes(value)) for name, value in (message.headers() or [])
                    ),
                    timestamp_ms=message.timestamp()[1] if message.timestamp()[0] else None,
                )
            )
        return records

    def _consume(self, max_records: int, timeout_s: float) -> list[Any]:
        # librdkafka's batch consume waits until the batch is full or the timeout passes, so a
        # lone event would wait the whole timeout: take what is queued, else wait for one.
        messages = self._consumer.consume(max_records, 0)
        if not messages:
            messages = self._consumer.consume(1, timeout_s)
            if messages and max_records > 1:
                messages += self._consumer.consume(max_records - 1, 0)
        return list(messages)

    async def pause(self) -> None:
        """Stop fetching from every assigned partition, staying in the group.

        While paused, `poll` must still be called (it returns nothing, or records fetched before
        the pause): that keeps this consumer's place in the group (`max.poll.interval.ms`).
        Idempotent: call it again to pause partitions assigned meanwhile.
        """
        try:
            await self._call(lambda: self._consumer.pause(self._assignment()))
        except KafkaException as exc:
            raise KafkaUnavailable(f"Kafka pause failed: {exc}") from exc

    async def resume(self) -> None:
        try:
            await self._call(lambda: self._consumer.resume(self._assignment()))
        except KafkaException as exc:
            raise KafkaUnavailable(f"Kafka resume failed: {exc}") from exc

    def _assignment(self) -> list[TopicPartition]:
        return [TopicPartition(topic, partition) for topic, partition in self._assigned]

    async def store_offset(self, record: InboundRecord) -> None:
        """Mark a record handled: its offset (+1) will be committed."""
        position = TopicPartition(record.topic, record.partition, record.offset + 1)
        try:
            await self._call(lambda: self._consumer.store_offsets(offsets=[position]))
        except KafkaException as exc:
            # The partition was revoked meanwhile: its new owner reads the record again and,
            # the handling being idempotent, nothing happens twice.
            log.info("kafka.offset_not_stored", extra={"reason": str(exc)})

    async def commit(self) -> None:
        """Commit every stored offset now."""
        try:
            await self._call(lambda: self._consumer.commit(asynchronous=False))
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError._NO_OFFSET:
                return  # nothing stored since the last commit
            raise KafkaUnavailable(f"Kafka commit failed: {exc}") from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._call(self._consumer.close)
        self._thread.shutdown(wait=True)

    async def _call(self, function: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function)

    # Called on the consumer thread, inside poll.
    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self._joined = True
        self._assigned = self._assigned | {(p.topic, p.partition) for p in partitions}
        log.info("kafka.partitions_assigned", extra={"count": len(self._assigned)})
        if self._observer is not None:
            self._observer.assignment_changed(len(self._assigned))

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # Nothing stored, or the group moved on: the next owner re-reads, idempotently.
        with contextlib.suppress(KafkaException):
            consumer.commit(asynchronous=False)
        self._assigned = self._assigned - {(p.topic, p.partition) for p in partitions}
        log.info("kafka.partitions_revoked", extra={"count": len(self._assigned)})
        if self._observer is not None:
            self._observer.assignment_changed(len(self._assigned))
            for revoked in partitions:
                self._observer.partition_revoked(revoked.topic, revoked.partition)

    def _on_stats(self, stats_json: str) -> None:
        if self._observer is None:
            return
        stats = json.loads(stats_json)
        for topic, topic_stats in stats.get("topics", {}).items():
            for partition, partition_stats in topic_stats.get("partitions", {}).items():
                lag = partition_stats.get("consumer_lag", -1)
                if int(partition) >= 0 and lag >= 0:
                    self._observer.partition_lag(topic, int(partition), int(lag))


class KafkaPublisher:
    """An idempotent producer (acks=all) whose `publish` returns once Kafka has the record.

    `max_record_bytes` is librdkafka's `message.max.bytes`: callers that copy records of unknown
    size (the dead-letter topic) cut them to fit it (see `fits`).
    """

    def __init__(self, config: KafkaConfig, max_record_bytes: int = 1_000_000) -> None:
        settings: dict[str, Any] = {
            "linger.ms": 5,
            "compression.type": "lz4",
            "delivery.timeout.ms": 30000,
            "message.max.bytes": max_record_bytes,
            **config,
            "enable.idempotence": True,
            "acks": "all",
            "logger": log,
        }
        self.max_record_bytes = int(settings["message.max.bytes"])
        self._producer = Producer(settings)
        self._stopping = threading.Event()
        self._poller = threading.Thread(target=self._serve_callbacks, name="kafka-producer")
        self._poller.daemon = True
        self._poller.start()

    async def publish(
        self,
        topic: str,
        key: bytes | str | None,
        value: bytes | None,
        headers: Headers = (),
    ) -> None:
        await self.publish_many([(topic, key, value, headers)])

    async def publish_many(self, records: Sequence[OutboundRecord]) -> None:
        """Produce records in order and wait until Kafka acknowledged every one.

        Raises `KafkaRecordRefused` (naming the refused positions) when Kafka refuses some for
        good, once every other record was acknowledged; `KafkaUnavailable` for anything that
        may pass (broker down, timeouts).
        """
        loop = asyncio.get_running_loop()
        queued: list[tuple[int, asyncio.Future[None]]] = []
        refused: dict[int, str] = {}
        for position, (topic, key, value, headers) in enumerate(records):
            future: asyncio.Future[None] = loop.create_future()
            wire_headers: list[tuple[str, str | bytes | None]] = list(headers)
            reason = await self._produce(topic, key, value, wire_headers, _resolver(loop, future))
            if reason is None:
                queued.append((position, future))
            else:
                refused[position] = reason
        outcomes = await asyncio.gather(*(f for _, f in queued), return_exceptions=True)
        transient: BaseException | None = None
        for (position, _), outcome in zip(queued, outcomes, strict=True):
            if isinstance(outcome, _Refused):
                refused[position] = outcome.reason
            elif isinstance(outcome, BaseException):
                transient = transient or outcome
        if transient is not None:
            raise transient
        if refused:
            raise KafkaRecordRefused(refused)

    async def _produce(
        self,
        topic: str,
        key: bytes | str | None,
        value: bytes | None,
        headers: list[tuple[str, str | bytes | None]],
        on_delivery: Callable[[Any, Any], None],
    ) -> str | None:
        """Queue one record; the reason when librdkafka refuses it outright for good."""
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=on_delivery
                )
                return None
            except BufferError:
                await asyncio.sleep(0.05)  # local queue full: let deliveries drain
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if isinstance(error, KafkaError) and error.code() in _REFUSED_FOR_GOOD:
                    return f"{error.name()} ({topic})"
                raise KafkaUnavailable(f"Kafka produce to {topic} failed: {exc}") from exc

    async def reachable(self, timeout_s: float = 2.0) -> bool:
        """Whether a broker answers a metadata request now (the dependency probe)."""

        def ask() -> bool:
            try:
                self._producer.list_topics(timeout=timeout_s)
            except KafkaException:
                return False
            return True

        return await asyncio.to_thread(ask)

    async def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for queued records; returns how many are still undelivered."""
        return int(await asyncio.to_thread(self._producer.flush, timeout_s))

    async def close(self, timeout_s: float = 30.0) -> None:
        remaining = await self.flush(timeout_s)
        if remaining:
            log.warning("kafka.unflushed_on_close", extra={"records": remaining})
        self._stopping.set()
        await asyncio.to_thread(self._poller.join, 5)

    def _serve_callbacks(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(0.1)


class _Refused(Exception):
    """A delivery report saying Kafka will never take the record (see `_REFUSED_FOR_GOOD`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _resolver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]
) -> Callable[[Any, Any], None]:
    """A delivery callback (producer thread) that settles an asyncio future (loop thread)."""

    def settle(result: asyncio.Future[None], error: Any) -> None:
        if result.done():
            return
        if error is None:
            result.set_result(None)
        elif isinstance(error, KafkaError) and error.code() in _REFUSED_FOR_GOOD:
            result.set_exception(_Refused(error.name()))
        else:
            result.set_exception(KafkaUnavailable(f"Kafka did not take the record: {error}"))

    def on_delivery(error: Any, _message: Any) -> None:
        loop.call_soon_threadsafe(settle, future, error)

    return on_delivery


def record_size(key: bytes | str | None, value: bytes | None, headers: Headers) -> int:
    """Bytes of a record's key, value and headers (what `message.max.bytes` bounds)."""
    key_bytes = key.encode() if isinstance(key, str) else key or b""
    return (
        len(key_bytes)
        + len(value or b"")
        + sum(len(name.encode()) + len(header or b"") for name, header in headers)
    )


def ensure_topics(config: KafkaConfig, topics: Sequence[TopicSpec], timeout_s: float = 30) -> None:
    """Create the topics that do not exist yet (blocking; call from a thread)."""
    settings: dict[str, Any] = {**config, "logger": log}
    admin = AdminClient(settings)
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise KafkaUnavailable(f"Kafka metadata request failed: {exc}") from exc
    missing = [spec for spec in topics if spec.name not in existing]
    if not missing:
        return
    futures = admin.create_topics(
        [
            NewTopic(spec.name, num_partitions=spec.partitions, config=dict(spec.config))
            for spec in missing
        ]
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue  # another replica created it first
            raise KafkaUnavailable(f"creating topic {name} failed: {exc}") from exc
        log.info("kafka.topic_created", extra={"topic": name})


def _as_bytes(value: object) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"unexpected Kafka key/value type {type(value).__name__}")
