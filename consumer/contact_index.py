"""The contact index: customer id → (number, first name, last name), per master contact group.

Built from TextLocal's `get_contacts` (pages of 1,000, a few in flight) into a new Redis hash,
then switched to with one atomic SET of the "current version" pointer, so readers never see a
half-built index. The previous version lingers for an hour, so a campaign resolving against it
when the switch happens finishes on a consistent index.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import redis.asyncio as aioredis

from consumer.clock import to_millis
from consumer.keys import RedisKeys
from consumer.logs import log_event
from consumer.store import as_bytes, as_text, redis_errors
from consumer.textlocal import TextLocalClient
from consumer.textlocal_types import Contact
from consumer.workflow import ContactGroup

log = logging.getLogger("consumer.contacts")

PAGE_SIZE = 1000
PAGES_IN_FLIGHT = 4
OLD_VERSION_GRACE_S = 3600
_SEPARATOR = "\x1f"  # unit separator: cannot appear in TextLocal's fields

Progress = Callable[[int, int], None]  # (contacts indexed so far, contacts in the group)


@dataclass(frozen=True)
class IndexedContact:
    number: str
    first_name: str
    last_name: str

    def pack(self) -> str:
        return _SEPARATOR.join((self.number, self.first_name, self.last_name))

    @classmethod
    def unpack(cls, packed: bytes) -> IndexedContact:
        number, first_name, last_name = packed.decode().split(_SEPARATOR)
        return cls(number, first_name, last_name)


@dataclass(frozen=True)
class IndexBuild:
    """What a rebuild found."""

    group_id: int
    version: str
    contacts: int  # indexed customer ids
    without_customer_id: int  # contacts whose customer-id field is empty
    repeated_customer_ids: int  # contacts sharing a customer id with an earlier one (last wins)


class ContactIndex:
    """Reads and rebuilds the per-group index in Redis."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys) -> None:
        self._redis = redis
        self._keys = keys

    async def current_version(self, group_id: int) -> str | None:
        with redis_errors("GET contact index version"):
            version = await self._redis.get(self._keys.contacts_current(group_id))
        return None if version is None else as_text(version)

    async def lookup(
        self, group_id: int, version: str, customer_ids: Sequence[str]
    ) -> list[IndexedContact | None]:
        """The contact of each customer id (None where the index has none), in order."""
        if not customer_ids:
            return []
        with redis_errors("HMGET contact index"):
            packed = await self._redis.hmget(
                self._keys.contacts_version(group_id, version), list(customer_ids)
            )
        return [None if p is None else IndexedContact.unpack(as_bytes(p)) for p in packed]

    async def size(self, group_id: int) -> int:
        version = await self.current_version(group_id)
        if version is None:
            return 0
        with redis_errors("HLEN contact index"):
            return int(await self._redis.hlen(self._keys.contacts_version(group_id, version)))

    async def rebuild(
        self,
        client: TextLocalClient,
        group: ContactGroup,
        now: datetime,
        progress: Progress | None = None,
    ) -> IndexBuild:
        """Index every contact of the group under a new version, then switch to it."""
        version = f"{to_millis(now)}-{uuid.uuid4().hex[:8]}"
        target = self._keys.contacts_version(group.group_id, version)
        first = await client.get_contacts(group.group_id, start=0, limit=PAGE_SIZE)
        total = max(first.num_contacts, len(first.contacts))
        page_size = max(1, min(PAGE_SIZE, first.limit or PAGE_SIZE))
        counts = _Counts()
        await self._store_page(target, group, first.contacts, counts)
        _report(progress, counts.seen, total)

        starts = list(range(len(first.contacts), total, page_size)) if first.contacts else []
        in_flight = asyncio.Semaphore(PAGES_IN_FLIGHT)

        async def fetch(start: int) -> None:
            async with in_flight:
                page = await client.get_contacts(group.group_id, start=start, limit=page_size)
            await self._store_page(target, group, page.contacts, counts)
            _report(progress, counts.seen, total)

        try:
            await asyncio.gather(*(fetch(start) for start in starts))
        except BaseException:
            with redis_errors("UNLINK half-built index"):
                await self._redis.unlink(target)
            raise
        await self._switch(group.group_id, version)
        build = IndexBuild(
            group_id=group.group_id,
            version=version,
            contacts=await self._hash_length(target),
            without_customer_id=counts.without_customer_id,
            repeated_customer_ids=counts.seen
            - counts.without_customer_id
            - await self._hash_length(target),
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
        self, target: str, group: ContactGroup, contacts: Sequence[Contact], counts: _Counts
    ) -> None:
        mapping: dict[str, str] = {}
        for contact in contacts:
            counts.seen += 1
            customer_id = getattr(contact, group.customer_id_field).strip()
            if not customer_id:
                counts.without_customer_id += 1
                continue
            mapping[customer_id] = IndexedContact(
                contact.number, contact.first_name, contact.last_name
            ).pack()
        if mapping:
            with redis_errors("HSET contact index"):
                await self._redis.hset(target, mapping=mapping)  # type: ignore[arg-type]

    async def _switch(self, group_id: int, version: str) -> None:
        current = self._keys.contacts_current(group_id)
        with redis_errors("switch contact index"):
            answer = await self._redis.set(current, version, get=True)
            previous = None if answer is None else as_text(answer)
            if previous is not None and previous != version:
                await self._redis.expire(
                    self._keys.contacts_version(group_id, previous), OLD_VERSION_GRACE_S
                )

    async def _hash_length(self, key: str) -> int:
        with redis_errors("HLEN"):
            return int(await self._redis.hlen(key))


class _Counts:
    def __init__(self) -> None:
        self.seen = 0
        self.without_customer_id = 0


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)
