"""The opt-out import: TextLocal's opt-outs published as `CustomerOptOut` records (DESIGN §4b).

A daily job (`daily_jobs.OPTOUTS_JOB`, after the contact refresh). One import:
1. asks `get_optouts` for the opt-outs added since the watermark (TextLocal's time of the latest
   opt-out recorded) less `OVERLAP`, so one TextLocal stamped late is still read; everything on
   the first run (a backfill: Optimove learns of customers who opted out before the daemon ran);
2. drops those already recorded: each opt-out has a marker (`optout_marker`: TextLocal's id, or
   a digest of number and time when its reply has none) kept in `keys.optouts_seen`;
3. looks the new ones' numbers up in every contact group's current index (one scan of each
   index, `ContactIndex.customers_with_numbers`) and makes one record per (opt-out, group,
   customer id) holding the number: a number shared by two customers, or in two groups, opts
   all of them out, as TextLocal drops it from any send with `optouts=true`;
4. records, in chunks in TextLocal's time order, each chunk's markers, its outbox entries and
   the watermark in one atomic Redis call (`CampaignStore.record_optouts`), which skips again
   any marker recorded meanwhile. A crash before a chunk's call loses nothing (the next run
   reads it again), after it duplicates nothing (its markers are in).

An opt-out whose number no group's index holds (or that is not a valid number) is counted
(`optouts_unmatched`) and published nowhere: a record must carry a customer id and never the
number. A group without an index fails the import (`ContactIndexMissing`), to be tried again
after the back-off, rather than counting every opt-out unmatched for good.

Numbers stay inside: the records carry customer id, group and times; the event id is a UUIDv5
of those (`CustomerOptOutEvent.event_id`); logs and the summary carry counts only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from consumer.clock import Clock, to_unix_s
from consumer.codec import SchemaRegistry
from consumer.contact_index import ContactIndex
from consumer.errors import ContactIndexMissing
from consumer.events import CustomerOptOutEvent
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.outbox import optout_entry
from consumer.store import CampaignStore
from consumer.textlocal_types import OptOut
from consumer.workflow import ContactGroup, normalise_number

log = logging.getLogger("consumer.optouts")

# How far behind the watermark each import asks again (TextLocal's time of an opt-out may be
# earlier than when it appears in the list), and how far behind it markers are kept (further, so
# every opt-out an import asks for again is still marked).
OVERLAP = timedelta(days=1)
MARKERS_KEPT = 2 * OVERLAP
# Opt-outs per atomic record call (one Lua call each: short, so Redis is not held up).
RECORD_CHUNK = 500


class OptOutSource(Protocol):
    """What the import needs of the TextLocal client."""

    async def get_optouts(self, *, since: datetime | None = None) -> list[OptOut]: ...


# --- pure ----------------------------------------------------------------------------------------


def optout_marker(optout: OptOut) -> str:
    """What identifies one opt-out: TextLocal's id, else a digest of its number and time."""
    if optout.optout_id is not None:
        return f"id:{optout.optout_id}"
    name = f"{optout.number}|{to_unix_s(optout.opted_out_at)}"
    return "h:" + hashlib.sha256(name.encode()).hexdigest()[:32]


def optout_events(
    optout: OptOut,
    customers: Mapping[int, Mapping[str, Sequence[str]]],
    read_at: datetime,
) -> list[CustomerOptOutEvent]:
    """The records of one opt-out: one per group and customer id its number has.

    `customers`: group id → (normalised number → customer ids), as the index lookup found them.
    An invalid number, or one no group holds, gives none.
    """
    number = normalise_number(optout.number)
    if number is None:
        return []
    return [
        CustomerOptOutEvent(
            customer_id=customer_id,
            contact_group_id=group_id,
            opted_out_at=optout.opted_out_at,
            occurred_at=read_at,
        )
        for group_id, by_number in sorted(customers.items())
        for customer_id in by_number.get(number, ())
    ]


def ask_since(watermark: datetime | None) -> datetime | None:
    """The `time` to ask TextLocal for: the overlap before the watermark; None (all) at first."""
    return None if watermark is None else watermark - OVERLAP


# --- the import ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptOutImport:
    """What one import found and recorded (counts only: never a number)."""

    optouts_listed: int  # in TextLocal's reply (the overlap included)
    optouts_new: int  # not recorded before
    optouts_published: int  # CustomerOptOut records put in the outbox
    optouts_unmatched: int  # new opt-outs no group's customer holds


class OptOutImporter:
    """Reads TextLocal's opt-outs and records `CustomerOptOut` events; see the module docstring."""

    def __init__(
        self,
        store: CampaignStore,
        index: ContactIndex,
        client: OptOutSource,
        registry: SchemaRegistry,
        groups: Sequence[ContactGroup],
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._index = index
        self._client = client
        self._registry = registry
        self._groups = tuple(groups)
        self._clock = clock
        self._metrics = metrics

    async def import_optouts(self) -> OptOutImport:
        watermark = await self._store.optouts_watermark()
        listed = await self._client.get_optouts(since=ask_since(watermark))
        ordered = sorted(listed, key=lambda o: (o.opted_out_at, o.optout_id or 0))
        seen = await self._store.seen_optouts([optout_marker(o) for o in ordered])
        fresh = [o for o in ordered if optout_marker(o) not in seen]
        customers = await self._customers(fresh)
        read_at = self._clock.now()
        new = published = unmatched = 0
        for first in range(0, len(fresh), RECORD_CHUNK):
            chunk = fresh[first : first + RECORD_CHUNK]
            events = [optout_events(o, customers, read_at) for o in chunk]
            entries = [[optout_entry(self._registry, e) for e in es] for es in events]
            recorded = await self._store.record_optouts(
                [
                    (optout_marker(o), o.opted_out_at, es)
                    for o, es in zip(chunk, entries, strict=True)
                ],
                keep=MARKERS_KEPT,
            )
            added = [es for is_new, es in zip(recorded, events, strict=True) if is_new]
            self._metrics.optouts_read.inc(len(added))
            self._metrics.optouts_published.inc(sum(len(es) for es in added))
            self._metrics.optouts_unmatched.inc(sum(1 for es in added if not es))
            new += len(added)
            published += sum(len(es) for es in added)
            unmatched += sum(1 for es in added if not es)
        outcome = OptOutImport(len(listed), new, published, unmatched)
        log_event(log, "optouts.imported", **vars(outcome))
        return outcome

    async def _customers(self, optouts: Sequence[OptOut]) -> dict[int, dict[str, list[str]]]:
        """Group id → (number → customer ids) for the numbers of `optouts`."""
        numbers = {n for n in (normalise_number(o.number) for o in optouts) if n is not None}
        if not numbers:
            return {}
        found: dict[int, dict[str, list[str]]] = {}
        for group in self._groups:
            by_number = await self._index.customers_with_numbers(group.group_id, numbers)
            if by_number is None:
                raise ContactIndexMissing(group.group_id)
            found[group.group_id] = by_number
        return found
