"""Per-customer outcomes (DESIGN §4b): which customers of a campaign reached which delivery outcome.

TextLocal reports outcomes per phone number (`status_batch`'s `messages`, delivery receipts).
The daemon turns them into `CustomerOutcomes` records: one campaign, one outcome, at most 10,000
customer ids, never a number. Each customer's final outcome is published once per campaign.

How a number becomes a customer id: while the campaign's recipients are resolved against the
contact index (the load step), every recipient who is sent to — the first customer of the
campaign holding that number; later ones with the same number are `duplicates` and get no SMS —
is recorded in the campaign's hash `keys.recipient_numbers` (number → customer id). Outcomes are
attributed through it, so a number shared by two customers gives its outcome to the one who was
sent the message. A number not in it (not this campaign's) is ignored.

The same hash keeps, in each value's first character, what was published for that customer:
`-` nothing yet, else the outcome's letter (`P` for pending). A final outcome is recorded only
for a customer with `-` or `P`; pending only for one with `-`. Recording is one Lua call per
record (`CampaignStore.record_outcome_chunk`): it checks every number is still eligible, marks
them and appends the record to the outbox, all or nothing. So a crash never leaves customers
marked without their record, nor a record without its marks; the outbox then publishes it (again
after a crash, with the same event id). A concurrent writer (a receipt while a poll runs) that
marked some of them first makes the call refuse; the recorder drops those and tries again.

API (stable; used by the poller and by delivery receipts):

- `Outcome` (DELIVERED, UNDELIVERED, INVALID, EXPIRED, UNKNOWN, PENDING), `outcome_of_status(
  letter)` (TextLocal's D, U, I, E, ? → the final outcome; P → PENDING; anything else → None),
  `Outcome.is_final`, `Outcome.letter`.
- `OutcomeSource` (POLL, RECEIPT).
- `MAX_CUSTOMERS_PER_RECORD` (10,000), `record_chunks(ids)`.
- `CustomerOutcomesEvent` (the record as a value; `event_id` is UUIDv5 of the campaign key, the
  outcome and a digest of the ids in order, so the same record always has the same id and two
  different records never share one).
- `OutcomeTarget(ref, metadata)` (`OutcomeTarget.of(snapshot)`): the campaign a record is about.
- `OutcomeRecorder(store, registry, metrics)`:
  - `await recorder.record(target, outcome, numbers, observed_at, source, poll_number=None)`:
    publishes (through the outbox) the outcome of those numbers' customers who do not have it
    yet; returns how many customers it published. For a few numbers (a receipt) or many.
  - `recorder.batch(target, observed_at, source, poll_number, include_pending=False)` →
    `OutcomeBatch`, for a stream
    of (number, status letter) runs: `await batch.add_statuses(numbers, letters)` (or
    `await batch.add(outcome, numbers)`), then `await batch.finish()` → customers published.
    Records are full (10,000) except each outcome's last one; memory is bounded by the buffers.

Numbers are normalised international digits (`workflow.normalise_number`), as TextLocal reports
them and the contact index keeps them.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from consumer.codec import SchemaRegistry
from consumer.events import CampaignRef, output_event_id
from consumer.logs import log_event
from consumer.store import CampaignSnapshot, CampaignStore, OutboxEntry

log = logging.getLogger("consumer.outcomes")

MAX_CUSTOMERS_PER_RECORD = 10_000
OUTCOMES = "outcomes"  # the outbox's logical topic (kafka.outcomes_topic)
# Numbers looked up per round trip (`CampaignStore.outcome_candidates`) while collecting.
LOOKUP_SLICE = 10_000
# A record refused because others marked some of its customers is cut down and tried again;
# each try has fewer customers, so this bound is only a guard.
MAX_RECORD_TRIES = 20


class Outcome(StrEnum):
    DELIVERED = "DELIVERED"
    UNDELIVERED = "UNDELIVERED"
    INVALID = "INVALID"
    EXPIRED = "EXPIRED"
    UNKNOWN = "UNKNOWN"
    PENDING = "PENDING"

    @property
    def letter(self) -> str:
        """TextLocal's status letter, which also marks the outcome in Redis."""
        return _LETTERS[self]

    @property
    def is_final(self) -> bool:
        return self is not Outcome.PENDING


_LETTERS = {
    Outcome.DELIVERED: "D",
    Outcome.UNDELIVERED: "U",
    Outcome.INVALID: "I",
    Outcome.EXPIRED: "E",
    Outcome.UNKNOWN: "?",
    Outcome.PENDING: "P",
}
_BY_LETTER = {letter: outcome for outcome, letter in _LETTERS.items()}
FINAL_OUTCOMES = tuple(outcome for outcome in Outcome if outcome.is_final)


def outcome_of_status(letter: str) -> Outcome | None:
    """TextLocal's status letter as an outcome (P → PENDING); None for a letter it does not use."""
    return _BY_LETTER.get(letter.strip().upper())


class OutcomeSource(StrEnum):
    POLL = "POLL"
    RECEIPT = "RECEIPT"


def record_chunks(
    items: Sequence[str], size: int = MAX_CUSTOMERS_PER_RECORD
) -> Iterator[list[str]]:
    """`items` cut into lists of at most `size`, in order."""
    if size < 1:
        raise ValueError("size must be at least 1")
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@dataclass(frozen=True)
class CustomerOutcomesEvent:
    ref: CampaignRef
    outcome: Outcome
    customer_ids: tuple[str, ...] = field(repr=False)
    observed_at: datetime
    source: OutcomeSource
    occurred_at: datetime
    poll_number: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= len(self.customer_ids) <= MAX_CUSTOMERS_PER_RECORD:
            raise ValueError(
                f"a CustomerOutcomes record holds 1 to {MAX_CUSTOMERS_PER_RECORD} customers"
            )

    @functools.cached_property
    def event_id(self) -> str:
        digest = hashlib.sha256("\x1e".join(self.customer_ids).encode()).hexdigest()[:32]
        return output_event_id(self.ref, OUTCOMES, self.outcome.value, digest)

    def to_fields(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            "tenant_id": self.ref.tenant_id,
            "campaign_id": self.ref.campaign_id,
            "channel_id": self.ref.channel_id,
            "outcome": self.outcome.value,
            "customer_ids": list(self.customer_ids),
            "observed_at": self.observed_at,
            "source": self.source.value,
            "poll_number": self.poll_number,
            "metadata": dict(self.metadata),
        }


def outcomes_entry(registry: SchemaRegistry, event: CustomerOutcomesEvent) -> OutboxEntry:
    return OutboxEntry(
        topic=OUTCOMES,
        key=event.ref.key,
        value=registry.encode("CustomerOutcomes", event.to_fields()),
        event_id=event.event_id,
    )


@dataclass(frozen=True)
class OutcomeTarget:
    """The campaign a record is about, and the metadata its records echo."""

    ref: CampaignRef
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, snapshot: CampaignSnapshot) -> OutcomeTarget:
        if snapshot.header is None:
            return cls(CampaignRef.from_key(snapshot.key))
        return cls(snapshot.header.ref, snapshot.header.metadata)


class OutcomeCounter(Protocol):
    """Where published customers are counted (`Metrics.customer_outcomes` fits)."""

    def labels(self, *values: str) -> Any: ...


class OutcomeRecorder:
    """Publishes customers' outcomes through the outbox, each (customer, outcome) once."""

    def __init__(
        self,
        store: CampaignStore,
        registry: SchemaRegistry,
        counter: OutcomeCounter | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._counter = counter

    @property
    def store(self) -> CampaignStore:
        return self._store

    async def record(
        self,
        target: OutcomeTarget,
        outcome: Outcome,
        numbers: Iterable[str],
        observed_at: datetime,
        source: OutcomeSource,
        poll_number: int | None = None,
    ) -> int:
        """Publish `outcome` for the customers of `numbers` who do not have it yet."""
        batch = self.batch(target, observed_at, source, poll_number)
        await batch.add(outcome, list(numbers))
        return await batch.finish()

    def batch(
        self,
        target: OutcomeTarget,
        observed_at: datetime,
        source: OutcomeSource,
        poll_number: int | None = None,
        *,
        include_pending: bool = False,
    ) -> OutcomeBatch:
        """A batch for a stream of statuses; `include_pending` (the window's last poll) also
        publishes PENDING for customers still without an outcome."""
        return OutcomeBatch(self, target, observed_at, source, poll_number, include_pending)

    async def write(
        self,
        target: OutcomeTarget,
        outcome: Outcome,
        customers: Mapping[str, str],
        observed_at: datetime,
        source: OutcomeSource,
        poll_number: int | None,
    ) -> int:
        """One record of `customers` (number → customer id, at most 10,000), all or nothing;
        customers others marked meanwhile are left out. Returns how many it published."""
        remaining = dict(customers)
        for _ in range(MAX_RECORD_TRIES):
            if not remaining:
                return 0
            event = CustomerOutcomesEvent(
                ref=target.ref,
                outcome=outcome,
                customer_ids=tuple(remaining.values()),
                observed_at=observed_at,
                source=source,
                occurred_at=observed_at,
                poll_number=poll_number,
                metadata=target.metadata,
            )
            refused = await self._store.record_outcome_chunk(
                target.ref.key,
                outcome.letter,
                list(remaining),
                outcomes_entry(self._registry, event),
            )
            if not refused:
                if self._counter is not None:
                    self._counter.labels(outcome.value.lower(), source.value.lower()).inc(
                        len(remaining)
                    )
                return len(remaining)
            for number in refused:
                remaining.pop(number, None)
        log_event(
            log,
            "outcomes.record_abandoned",
            logging.ERROR,
            campaign=target.ref.key,
            outcome=outcome.value,
            customers=len(remaining),
        )
        return 0


class OutcomeBatch:
    """Collects numbers by outcome and publishes them in full records (see the module doc)."""

    def __init__(
        self,
        recorder: OutcomeRecorder,
        target: OutcomeTarget,
        observed_at: datetime,
        source: OutcomeSource,
        poll_number: int | None,
        include_pending: bool = False,
    ) -> None:
        self._recorder = recorder
        self._include_pending = include_pending
        self._store = recorder.store
        self._target = target
        self._observed_at = observed_at
        self._source = source
        self._poll_number = poll_number
        self._unchecked: dict[Outcome, list[str]] = {}
        self._eligible: dict[Outcome, dict[str, str]] = {}
        self.published: dict[Outcome, int] = {}

    async def add_statuses(self, numbers: Sequence[str], letters: Sequence[str]) -> None:
        """A run of (number, TextLocal status letter) pairs; pending ones only with
        `include_pending`, unknown letters never."""
        if len(numbers) != len(letters):
            raise ValueError("numbers and letters must pair up")
        # One pass per letter present (a handful), in C, rather than a Python step per message.
        for letter in sorted(set(letters)):
            outcome = _BY_LETTER.get(letter)
            if outcome is None or (outcome is Outcome.PENDING and not self._include_pending):
                continue
            found = [n for n, its in zip(numbers, letters, strict=True) if its == letter]
            await self.add(outcome, found)

    async def add(self, outcome: Outcome, numbers: Sequence[str]) -> None:
        waiting = self._unchecked.setdefault(outcome, [])
        waiting.extend(numbers)
        if len(waiting) >= LOOKUP_SLICE:
            await self._check(outcome)

    async def finish(self) -> int:
        """Publish everything collected; returns how many customers were published."""
        for outcome in list(self._unchecked):
            await self._check(outcome)
        for outcome in list(self._eligible):
            await self._flush(outcome, everything=True)
        return sum(self.published.values())

    async def _check(self, outcome: Outcome) -> None:
        """Look the waiting numbers up: keep those whose customer may take this outcome."""
        waiting = self._unchecked.pop(outcome, [])
        eligible = self._eligible.setdefault(outcome, {})
        for start in range(0, len(waiting), LOOKUP_SLICE):
            part = list(dict.fromkeys(waiting[start : start + LOOKUP_SLICE]))
            found = await self._store.outcome_candidates(
                self._target.ref.key, part, final=outcome.is_final
            )
            eligible.update(found)
            if len(eligible) >= MAX_CUSTOMERS_PER_RECORD:
                await self._flush(outcome, everything=False)

    async def _flush(self, outcome: Outcome, *, everything: bool) -> None:
        eligible = self._eligible.get(outcome, {})
        while len(eligible) >= MAX_CUSTOMERS_PER_RECORD or (everything and eligible):
            numbers = list(itertools.islice(eligible, MAX_CUSTOMERS_PER_RECORD))
            chunk = {number: eligible.pop(number) for number in numbers}
            published = await self._recorder.write(
                self._target, outcome, chunk, self._observed_at, self._source, self._poll_number
            )
            self.published[outcome] = self.published.get(outcome, 0) + published


__all__ = [
    "FINAL_OUTCOMES",
    "MAX_CUSTOMERS_PER_RECORD",
    "OUTCOMES",
    "CustomerOutcomesEvent",
    "Outcome",
    "OutcomeBatch",
    "OutcomeRecorder",
    "OutcomeSource",
    "OutcomeTarget",
    "outcome_of_status",
    "outcomes_entry",
    "record_chunks",
]
