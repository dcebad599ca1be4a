"""The contact index: customer id → (number, first name, last name), per master contact group.

Built from TextLocal's `get_contacts` (pages of 1,000, a few in flight) into a new Redis hash,
then switched to with one atomic SET of the "current version" pointer, so readers never see a
half-built index. The previous version lingers for an hour, so a campaign resolving against it
when the switch happens finishes on a consistent index.

Each entry is stored ready for use: the number already normalised (empty when TextLocal holds an
invalid one) and the contact's fields already as a JSON fragment for `create_contacts_bulk`. A
campaign of a million customers is then resolved batch by batch (the batch's ids, then one HMGET
of them all), and Python only splits strings and glues fragments: about a microsecond a customer
instead of the dozen that decoding, validating and re-encoding took.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from json.encoder import encode_basestring
from typing import NamedTuple, TypeVar

from consumer.clock import to_millis
from consumer.contact_store import ContactStore, ResolvedBatch
from consumer.logs import log_event
from consumer.textlocal import TextLocalClient
from consumer.textlocal_types import Contact
from consumer.workflow import MAX_CONTACTS_PER_BULK_CALL, ContactGroup, normalise_number

log = logging.getLogger("consumer.contacts")

PAGE_SIZE = 1000
PAGES_IN_FLIGHT = 4
OLD_VERSION_GRACE_S = 3600
_SEPARATOR = "\x1f"  # unit separator: cannot appear in TextLocal's fields

Progress = Callable[[int, int], None]  # (contacts indexed so far, contacts in the group)
# Receives one batch's (number, customer id) pairs of the recipients taken (consumer.outcomes).
MatchedVisitor = Callable[[list[tuple[str, str]]], Awaitable[None]]


@dataclass(frozen=True)
class IndexedContact:
    """A master-group contact as the index keeps it."""

    number: str  # normalised international digits, or "" when TextLocal's number is invalid
    first_name: str
    last_name: str
    language: str = ""  # from the group's language field, "" when it has none

    def pack(self) -> str:
        """`number <US> language <US> "number":…,"first_name":…,"last_name":…` (the inside of
        a JSON object). Entries of earlier versions have no language part."""
        fragment = json.dumps(
            {"number": self.number, "first_name": self.first_name, "last_name": self.last_name},
            ensure_ascii=False,
            separators=(",", ":"),
        )[1:-1]
        return f"{self.number}{_SEPARATOR}{self.language}{_SEPARATOR}{fragment}"


# A recipient `resolve_each` visits: (number, language, the contact's JSON fragment, own promo
# code or None). A plain tuple: one is made per recipient, in a loop of a million.
VisitedContact = tuple[str, str, str, str | None]


class ResolvedContact(NamedTuple):
    """A `VisitedContact` with its fields named (`ResolvedContact._make(visited)`), where a
    visitor needs more than the plain tuple: one recipient with a valid number not taken yet."""

    number: str
    language: str
    fragment: str  # the contact's fields as the inside of a JSON object
    promo_code: str | None  # the customer's own, from the recipients batch

    def names(self) -> tuple[str, str]:
        fields = json.loads("{" + self.fragment + "}")
        return str(fields.get("first_name") or ""), str(fields.get("last_name") or "")


@dataclass(frozen=True)
class Resolution:
    """What resolving a campaign's customers against the index found."""

    matched: int  # distinct valid numbers, written in chunks
    unmatched: int  # customer ids the index does not know (each occurrence)
    invalid_numbers: int  # known customers whose number TextLocal would refuse
    duplicates: int  # a number already taken: a repeated customer id, or a shared number
    chunks: int


# A resolution loop hands the event loop a turn every this many customers. Its
# awaits rarely suspend (a chunk queued without waiting), and a loop that never suspends keeps
# the next batch's lookup from even being sent to Redis (and the loaders' calls from being
# read): the prefetch would only start once the batch is done, and Redis's work and ours would
# add up instead of overlapping (1M personal texts: ~2.5 s of Redis CPU). Each turn is also
# when the calls under way (loading, or chunks sent as they are cut) move on: every 200
# customers (about a millisecond) rather than 1,000, a million personal texts sent as cut
# reached SENT in 7.6–8.7 s (four runs) instead of 8.8–10.0 s (two runs; bench_variants.py
# --scenario codes, this 2-core machine, whose runs vary by about ±10 %).
_YIELD_EVERY = 200


class _NumberTaker:
    """The rule both resolution loops apply: a number is taken once. A customer id the index
    does not know is unmatched, one whose number TextLocal would refuse invalid, a number
    already taken (a repeated id, or two customers sharing it) a duplicate.

    `take` goes through a run of a batch (one turn of the loop, see `_YIELD_EVERY`): a call
    per run, not per recipient, keeps the rule in one place at no cost to the hot loop. It
    makes the `VisitedContact`s themselves, so a run of personal texts goes to its visitor as
    it comes (no second loop, no second tuple per recipient)."""

    def __init__(self) -> None:
        self.numbers_seen: set[int] = set()
        self.matched = self.unmatched = self.invalid = self.repeated = 0

    def take(
        self,
        entries: Sequence[str],
        ids: Sequence[str],
        codes: Sequence[str],
        taken_ids: list[str],
        pairs: list[tuple[str, str]] | None,
    ) -> list[VisitedContact]:
        """Each recipient taken, in order; each one's customer id appended to `taken_ids`, and
        (number, customer id) to `pairs` when given. An own code "" is none (None)."""
        numbers_seen = self.numbers_seen
        taken: list[VisitedContact] = []
        unmatched = invalid = repeated = 0
        for entry, customer_id, code in zip(entries, ids, codes, strict=True):
            if not entry:
                unmatched += 1
                continue
            # A packed entry (`IndexedContact.pack`); one of an earlier version has no language.
            parts = entry.split(_SEPARATOR, 2)
            if len(parts) == 3:
                number, language, fragment = parts
            else:
                (number, fragment), language = parts, ""
            if not number:
                invalid += 1
                continue
            as_int = int(number)
            if as_int in numbers_seen:
                repeated += 1
                continue
            numbers_seen.add(as_int)
            taken.append((number, language, fragment, code or None))
            taken_ids.append(customer_id)
            if pairs is not None:
                pairs.append((number, customer_id))
        self.matched += len(taken)
        self.unmatched += unmatched
        self.invalid += invalid
        self.repeated += repeated
        return taken

    def runs(
        self,
        entries: Sequence[str],
        ids: Sequence[str],
        codes: Sequence[str],
        pairs: list[tuple[str, str]] | None,
    ) -> Iterator[tuple[list[VisitedContact], list[str]]]:
        """A batch `take`n run by run (`_YIELD_EVERY`): each run's recipients taken and their
        customer ids. `codes` may be shorter than `ids` (empty: nobody in the batch has one)."""
        if len(codes) < len(ids):
            codes = [*codes, *[""] * (len(ids) - len(codes))]
        for start in range(0, len(entries), _YIELD_EVERY):
            end = start + _YIELD_EVERY
            taken_ids: list[str] = []
            run = self.take(entries[start:end], ids[start:end], codes[start:end], taken_ids, pairs)
            yield run, taken_ids

    def resolution(self, chunks: int) -> Resolution:
        return Resolution(self.matched, self.unmatched, self.invalid, self.repeated, chunks)


BatchT = TypeVar("BatchT")


async def prefetched_batches(
    fetch: Callable[[int], Awaitable[BatchT]], batch_count: int, check: Callable[[], None]
) -> AsyncGenerator[BatchT, None]:
    """Batches 0 … batch_count-1, in order, each fetched while the caller works on the one
    before (Redis looks the next batch up meanwhile); `check` runs after each batch's work (the
    caller's lease check). Use it under `contextlib.aclosing`, so a lookup in flight is
    cancelled when the caller stops early."""
    if not batch_count:
        return
    current = await fetch(0)
    following: asyncio.Future[BatchT] | None = None
    try:
        for batch in range(1, batch_count + 1):
            following = asyncio.ensure_future(fetch(batch)) if batch < batch_count else None
            yield current
            check()
            if following is not None:
                current = await following
    finally:
        if following is not None:
            following.cancel()


@dataclass(frozen=True)
class IndexBuild:
    """What a rebuild found."""

    group_id: int
    version: str
    contacts: int  # indexed customer ids
    without_customer_id: int  # contacts whose customer-id field is empty
    repeated_customer_ids: int  # contacts sharing a customer id with an earlier one (last wins)


class ContactIndex:
    """Reads and rebuilds the per-group index (kept in Redis by `ContactStore`)."""

    def __init__(self, store: ContactStore) -> None:
        self._store = store

    async def current_version(self, group_id: int) -> str | None:
        return await self._store.current_version(group_id)

    async def resolve(
        self,
        recipients_key: str,
        batch_count: int,
        group: ContactGroup,
        version: str,
        write_chunk: Callable[[int, str, int], Awaitable[None]],
        check: Callable[[], None] = lambda: None,
        *,
        on_matched: MatchedVisitor | None = None,
    ) -> Resolution:
        """Resolve a campaign's customer ids into `create_contacts_bulk` payloads.

        Goes through the recipient batches in index order (memory stays flat however big the
        campaign); `write_chunk(index, json, count)` receives each payload of ≤1,500 contacts,
        whose `group.customer_id_field` holds the customer id. A number is taken once: a customer
        id repeated, or two customers sharing a number, count as duplicates. `check` runs
        between batches (the caller's lease check); `on_matched`, when given, receives each
        batch's (number, customer id) pairs of the recipients taken, after that batch.

        Deterministic: the same batches and index version always give the same chunks, in the
        same order, so a resumed resolution can skip the chunks TextLocal already accepted.
        """
        id_field = f',"{group.customer_id_field}":'
        taker = _NumberTaker()
        chunk: list[str] = []
        chunks = 0

        async def fetch(batch: int) -> ResolvedBatch:
            return await self._store.resolve_batch(recipients_key, group.group_id, version, batch)

        async with aclosing(prefetched_batches(fetch, batch_count, check)) as batches:
            async for ids, entries in batches:
                pairs: list[tuple[str, str]] | None = [] if on_matched is not None else None
                for run, taken_ids in taker.runs(entries, ids, (), pairs):
                    await asyncio.sleep(0)  # see _YIELD_EVERY
                    for (_, _, fragment, _), customer_id in zip(run, taken_ids, strict=True):
                        chunk.append("{" + fragment + id_field + _json_string(customer_id) + "}")
                        if len(chunk) == MAX_CONTACTS_PER_BULK_CALL:
                            await write_chunk(chunks, "[" + ",".join(chunk) + "]", len(chunk))
                            chunks, chunk = chunks + 1, []
                if on_matched is not None and pairs is not None:
                    await on_matched(pairs)
        if chunk:
            await write_chunk(chunks, "[" + ",".join(chunk) + "]", len(chunk))
            chunks += 1
        return taker.resolution(chunks)

    async def resolve_each(
        self,
        recipients_key: str,
        codes_key: str,
        batch_count: int,
        group: ContactGroup,
        version: str,
        visit: Callable[[list[VisitedContact]], None],
        check: Callable[[], None] = lambda: None,
        *,
        text_of: Callable[[str, str | None], int | None] | None = None,
        write_chunk: Callable[[int, str, int], Awaitable[None]] | None = None,
        on_matched: MatchedVisitor | None = None,
    ) -> Resolution:
        """Like `resolve`, one recipient at a time (with language and own promo code).

        The same rules (a number is taken once; unknown ids and invalid numbers counted) and the
        same determinism: batches in index order, customers in batch order.

        `visit` receives the recipients in runs (those of one turn of the loop, see
        `_YIELD_EVERY`), in order: a call per recipient would cost more than the visit itself.
        With `text_of` (the contact's language and own code → the index of its group text, or
        None) and `write_chunk`, a recipient with a group text is not visited: its contact goes
        into that text's `create_contacts_bulk` chunks of ≤1,500, the customer id in
        `group.customer_id_field`, and `write_chunk(text, json, count)` receives each chunk in
        order (each text's last one after the last batch, texts in index order). Only the others
        are visited. `chunks` counts the chunks written. `on_matched` as in `resolve`.
        """
        id_field = f',"{group.customer_id_field}":'
        taker = _NumberTaker()
        by_text: dict[int, list[str]] = {}
        chunks = 0

        async def fetch(batch: int) -> tuple[ResolvedBatch, list[str]]:
            found = await self._store.resolve_batch(recipients_key, group.group_id, version, batch)
            return found, await self._store.batch_codes(codes_key, batch)

        async with aclosing(prefetched_batches(fetch, batch_count, check)) as batches:
            async for (ids, entries), codes in batches:
                pairs: list[tuple[str, str]] | None = [] if on_matched is not None else None
                for run, taken_ids in taker.runs(entries, ids, codes, pairs):
                    await asyncio.sleep(0)  # see _YIELD_EVERY
                    if text_of is None:  # every recipient visited: the run as it is
                        if run:
                            visit(run)
                        continue
                    visits: list[VisitedContact] = []
                    for contact, customer_id in zip(run, taken_ids, strict=True):
                        _, language, fragment, code = contact
                        text = text_of(language, code)
                        if text is None:
                            visits.append(contact)
                            continue
                        chunk = by_text.setdefault(text, [])
                        chunk.append("{" + fragment + id_field + _json_string(customer_id) + "}")
                        if len(chunk) == MAX_CONTACTS_PER_BULK_CALL:
                            by_text[text] = []
                            assert write_chunk is not None
                            await write_chunk(text, "[" + ",".join(chunk) + "]", len(chunk))
                            chunks += 1
                    if visits:
                        visit(visits)
                if on_matched is not None and pairs is not None:
                    await on_matched(pairs)
        for text, chunk in sorted(by_text.items()):
            if chunk:
                assert write_chunk is not None
                await write_chunk(text, "[" + ",".join(chunk) + "]", len(chunk))
                chunks += 1
        return taker.resolution(chunks)

    async def has_version(self, group_id: int, version: str) -> bool:
        return await self._store.has_version(group_id, version)

    async def size(self, group_id: int) -> int:
        version = await self.current_version(group_id)
        if version is None:
            return 0
        return await self._store.version_size(group_id, version)

    async def customers_with_numbers(
        self, group_id: int, numbers: Collection[str]
    ) -> dict[str, list[str]] | None:
        """Number → the customer ids holding it in the group's current index (only the numbers
        found, ids sorted), or None when the group has no index yet. One pass over the index,
        inside Redis (`ContactStore.customers_with_numbers`): for the few numbers of a day's
        opt-outs, cheaper than keeping a reverse index of every number."""
        return await self._store.customers_with_numbers(group_id, numbers, uuid.uuid4().hex[:12])

    async def rebuild(
        self,
        client: TextLocalClient,
        group: ContactGroup,
        now: datetime,
        progress: Progress | None = None,
    ) -> IndexBuild:
        """Index every contact of the group under a new version, then switch to it."""
        version = f"{to_millis(now)}-{uuid.uuid4().hex[:8]}"
        first = await client.get_contacts(group.group_id, start=0, limit=PAGE_SIZE)
        total = max(first.num_contacts, len(first.contacts))
        page_size = max(1, min(PAGE_SIZE, first.limit or PAGE_SIZE))
        counts = _Counts()
        await self._store_page(version, group, first.contacts, counts)
        _report(progress, counts.seen, total)

        starts = list(range(len(first.contacts), total, page_size)) if first.contacts else []
        in_flight = asyncio.Semaphore(PAGES_IN_FLIGHT)

        async def fetch(start: int) -> None:
            async with in_flight:
                page = await client.get_contacts(group.group_id, start=start, limit=page_size)
            await self._store_page(version, group, page.contacts, counts)
            _report(progress, counts.seen, total)

        try:
            await asyncio.gather(*(fetch(start) for start in starts))
        except BaseException:
            await self._store.discard_version(group.group_id, version)
            raise
        await self._store.switch_version(group.group_id, version, OLD_VERSION_GRACE_S)
        build = IndexBuild(
            group_id=group.group_id,
            version=version,
            contacts=await self._store.version_size(group.group_id, version),
            without_customer_id=counts.without_customer_id,
            repeated_customer_ids=counts.seen
            - counts.without_customer_id
            - await self._store.version_size(group.group_id, version),
        )
        log_event(
            log,
            "contacts.index_built",
            group_id=group.group_id,
            version=version,
            contacts=build.contacts,
            without_customer_id=build.without_customer_id,
            repeated_customer_ids=build.repeated_customer_ids,
        )
        return build

    async def _store_page(
        self, version: str, group: ContactGroup, contacts: Sequence[Contact], counts: _Counts
    ) -> None:
        mapping: dict[str, str] = {}
        for contact in contacts:
            counts.seen += 1
            customer_id = getattr(contact, group.customer_id_field).strip()
            if not customer_id:
                counts.without_customer_id += 1
                continue
            number = normalise_number(contact.number) or ""
            language = (
                getattr(contact, group.language_field).strip() if group.language_field else ""
            )
            mapping[customer_id] = IndexedContact(
                number, contact.first_name, contact.last_name, language.lower()
            ).pack()
        await self._store.add_entries(group.group_id, version, mapping)


class _Counts:
    def __init__(self) -> None:
        self.seen = 0
        self.without_customer_id = 0


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def _json_string(text: str) -> str:
    """`text` as a JSON string literal (json's own C encoder)."""
    return str(encode_basestring(text))
