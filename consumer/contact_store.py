"""The contact index in Redis: the store's part for `consumer.contact_index` (DESIGN §1.5).

Every Redis operation on the index lives here, behind the same error translation as the
campaign store (`StoreUnavailable`); `ContactIndex` keeps the rules (packing, versions,
resolution) and calls these. Per group, each build is a hash of its own (customer id → packed
entry, `keys.contacts_version`), and one string names the current one (`keys.contacts_current`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import NamedTuple

import redis.asyncio as aioredis

from consumer.keys import RedisKeys
from consumer.store import ID_SEPARATOR, as_text, redis_errors

# One page of a contact index's HSCAN: the customer ids whose entry's number (before the first
# unit separator, 0x1F) is in the lookup set. KEYS: index hash, lookup set; ARGV: cursor, count.
# Answers {next cursor, id, number, id, number, ...}.
_NUMBERS_IN_INDEX = r"""
local reply = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local out = {reply[1]}
local fields = reply[2]
for i = 1, #fields, 2 do
  local entry = fields[i + 1]
  local stop = string.find(entry, '\31', 1, true)
  local number = stop and string.sub(entry, 1, stop - 1) or entry
  if number ~= '' and redis.call('SISMEMBER', KEYS[2], number) == 1 then
    out[#out + 1] = fields[i]
    out[#out + 1] = number
  end
end
return out
"""
_INDEX_SCAN_COUNT = 5000


class ResolvedBatch(NamedTuple):
    """One recipients batch looked up in a contact index: `entries[i]` is `ids[i]`'s."""

    ids: list[str]
    entries: list[str]


class ContactStore:
    """Reads and writes the per-group contact index hashes and their version pointer."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys) -> None:
        self._redis = redis
        self.keys = keys
        self._numbers_in_index = redis.register_script(_NUMBERS_IN_INDEX)

    async def current_version(self, group_id: int) -> str | None:
        with redis_errors("GET contact index version"):
            version = await self._redis.get(self.keys.contacts_current(group_id))
        return None if version is None else as_text(version)

    async def has_version(self, group_id: int, version: str) -> bool:
        with redis_errors("EXISTS contact index version"):
            return bool(await self._redis.exists(self.keys.contacts_version(group_id, version)))

    async def version_size(self, group_id: int, version: str) -> int:
        """How many customer ids a version of the index holds."""
        with redis_errors("HLEN contact index"):
            return int(await self._redis.hlen(self.keys.contacts_version(group_id, version)))

    async def resolve_batch(
        self, recipients_key: str, group_id: int, version: str, batch: int
    ) -> ResolvedBatch:
        """The ids of one recipients batch (in batch order) and their index entries ("" for an
        id the index does not know); both empty for a batch that is not there.

        Two plain commands, HGET then HMGET of every id: Redis's own HMGET does in 0.5 µs an id
        what a Lua script splitting the batch and gluing the answer took 2.5 µs for, and the
        arguments cost little to pack (hiredis, see consumer.store.connect_redis). Both keys
        are written once (a batch when it arrives, a version when it is built), so the two
        answers agree."""
        index_key = self.keys.contacts_version(group_id, version)
        with redis_errors("HGET recipients batch"):
            joined = await self._redis.hget(recipients_key, str(batch))
        if not joined:
            return ResolvedBatch([], [])
        ids = as_text(joined).split(ID_SEPARATOR)
        with redis_errors("HMGET contact index"):
            found = await self._redis.hmget(index_key, ids)
        return ResolvedBatch(ids, [as_text(entry) if entry is not None else "" for entry in found])

    async def batch_codes(self, codes_key: str, batch: int) -> list[str]:
        """The own promo codes of one recipients batch, aligned with its ids ([] without)."""
        with redis_errors("HGET batch codes"):
            raw = await self._redis.hget(codes_key, str(batch))
        return as_text(raw).split(ID_SEPARATOR) if raw else []

    async def add_entries(self, group_id: int, version: str, entries: Mapping[str, str]) -> None:
        """Write packed entries (customer id → entry) into a version being built."""
        if entries:
            with redis_errors("HSET contact index"):
                await self._redis.hset(
                    self.keys.contacts_version(group_id, version),
                    mapping=dict(entries),  # type: ignore[arg-type]
                )

    async def discard_version(self, group_id: int, version: str) -> None:
        """Drop a version (a build that failed half-way)."""
        with redis_errors("UNLINK half-built index"):
            await self._redis.unlink(self.keys.contacts_version(group_id, version))

    async def switch_version(self, group_id: int, version: str, previous_ttl_s: int) -> None:
        """Make `version` the current one (one atomic SET); the previous one expires later."""
        with redis_errors("switch contact index"):
            answer = await self._redis.set(self.keys.contacts_current(group_id), version, get=True)
            previous = None if answer is None else as_text(answer)
            if previous is not None and previous != version:
                await self._redis.expire(
                    self.keys.contacts_version(group_id, previous), previous_ttl_s
                )

    async def customers_with_numbers(
        self, group_id: int, numbers: Collection[str], token: str
    ) -> dict[str, list[str]] | None:
        """Number → the customer ids that hold it in the group's current contact index (only
        numbers found), or None when the group has no index yet.

        The index is keyed by customer id, so this scans it: `HSCAN` inside Lua, a few thousand
        entries per call, matching each entry's number (the part before the first unit separator,
        `contact_index.IndexedContact.pack`) against a short-lived set of the wanted numbers.
        Only the matches travel; the cost is one pass over the index per call of this method.
        """
        with redis_errors("GET contact index version"):
            version = await self._redis.get(self.keys.contacts_current(group_id))
        if version is None:
            return None
        found: dict[str, list[str]] = {}
        if not numbers:
            return found
        index = self.keys.contacts_version(group_id, as_text(version))
        lookup = self.keys.optouts_lookup(token)
        with redis_errors("opt-out numbers in the contact index"):
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.sadd(lookup, *numbers)
                    pipe.expire(lookup, 3600)
                    await pipe.execute()
                cursor = "0"
                while True:
                    reply = await self._numbers_in_index(
                        keys=[index, lookup], args=[cursor, _INDEX_SCAN_COUNT]
                    )
                    cursor = as_text(reply[0])
                    pairs = [as_text(value) for value in reply[1:]]
                    for customer_id, number in zip(pairs[0::2], pairs[1::2], strict=True):
                        found.setdefault(number, []).append(customer_id)
                    if cursor == "0":
                        break
            finally:
                await self._redis.unlink(lookup)
        for customers in found.values():
            customers.sort()
        return found


__all__ = ["ContactStore"]
