"""Campaign state in Redis: the workflow's durable memory (DESIGN §2, §4).

Every change to a campaign is one atomic Lua call that checks what it expects (the campaign's
state, and for the executor its lease token), writes the campaign's fields, moves it between
queues and appends the output events the change causes to the outbox stream. A crash therefore
never leaves a state change without its status event, nor an event without its state.

Redis errors are translated into `StoreUnavailable` here; nothing above sees redis-py's types.
This module is the store layer with `consumer.campaign_record` (the campaign's hash as one typed
value: its fields, how they read and are written) and `consumer.contact_store` (the contact
index's hashes); only these two modules use the Redis client.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Unpack

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError as RedisDataError
from redis.exceptions import ReadOnlyError as RedisReadOnlyError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from consumer.campaign_record import (
    HEADER,
    STATE,
    CampaignField,
    CampaignSnapshot,
    CampaignUpdate,
    counts_update,
    encode_update,
    lua_with_fields,
    parse_campaign,
)
from consumer.clock import to_millis, to_unix_s
from consumer.codec import SchemaRegistry
from consumer.errors import ConfigError, PermanentError, StoreUnavailable
from consumer.events import CampaignRecipients, CampaignScheduled, RecipientCounts
from consumer.keys import RedisKeys
from consumer.workflow import CampaignState

# Separates customer ids passed to Redis as one string (intake refuses ids containing it).
ID_SEPARATOR = "\x1e"
# How long an input event id is remembered for de-duplication (redelivery horizon).
EVENT_DEDUPE_TTL_S = 30 * 24 * 3600
# The marker of an event id recorded before markers carried fingerprints: matches any event.
LEGACY_SEEN_MARKER = "1"


def event_fingerprint(event_type: str, campaign_key: str, value: bytes | None) -> str:
    """What an input event id stands for: its type, its campaign and a digest of its bytes.

    A redelivered record has the same fingerprint; a producer reusing an event id for another
    campaign, another type or other content does not.
    """
    digest = hashlib.sha256(value or b"").hexdigest()[:16]
    return f"{event_type}|{campaign_key}|{digest}"


# Distinct per-customer promo codes kept per campaign; beyond, the campaign has "many".
MAX_DISTINCT_CODES_KEPT = 1_000
# A run of handler failures older than this is forgotten (the member will have ended by then).
HANDLER_FAILURES_TTL_S = 7 * 24 * 3600


# Error replies a Redis gives while it cannot take writes for a while: a replica promoted or
# demoted in a failover (READONLY), no primary yet (MASTERDOWN), not enough replicas in sync.
# (LOADING, an AOF still loading after a restart, is redis-py's BusyLoadingError, a
# ConnectionError.)
_PASSING_REPLIES = ("READONLY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "LOADING")


@contextmanager
def redis_errors(operation: str) -> Iterator[None]:
    """Translate redis-py's failures of an unavailable Redis into the product's transient error.

    Connection refused or reset, timeouts, and the error replies of a Redis that is failing over
    or still loading: all pass, and are waited out (DESIGN §6a).
    """
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, RedisReadOnlyError, OSError) as exc:
        raise StoreUnavailable(f"Redis {operation}: {type(exc).__name__}: {exc}") from exc
    except RedisResponseError as exc:
        if not str(exc).startswith(_PASSING_REPLIES):
            raise
        raise StoreUnavailable(f"Redis {operation}: {type(exc).__name__}: {exc}") from exc


def connect_redis(url: str) -> aioredis.Redis:
    """The one Redis client of a process, made by the wiring (`consumer.app`) and handed to the
    store's classes (`CampaignStore`, `consumer.contact_store.ContactStore`), which alone use it.
    Its connections pack commands with hiredis (`_HiredisPacking`)."""
    client = aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=15,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    pool = client.connection_pool
    base = pool.connection_class  # TCP, TLS or unix socket, as the URL says
    pool.connection_class = type(f"HiredisPacking{base.__name__}", (_HiredisPacking, base), {})
    return client


class _HiredisPacking:
    """Packs each command with hiredis's C packer instead of redis-py's Python one.

    redis-py's asyncio connections have no packer option (its sync ones use hiredis when it is
    installed). A million-recipient campaign sends commands of twenty thousand arguments (the
    numbers hash, `HSET`), which the Python packer takes ~2 µs an argument to pack (2.3 s of CPU
    per million pairs; hiredis: 0.23 s). The same rules: a command name with spaces is split,
    and a value that is not str, bytes, int or float is refused with redis-py's DataError.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise RedisDataError(str(exc)) from exc


@dataclass(frozen=True)
class OutboxEntry:
    """An output event waiting to be published: logical topic, key, encoded value."""

    topic: str  # "status", "metrics", "templates", "optouts"; mapped to topic names when published
    key: str
    value: bytes | None  # None publishes a tombstone (compacted topics)
    event_id: str
    entry_id: str = ""  # the stream entry id, once read back


@dataclass(frozen=True)
class IntakeOutcome:
    """What recording an input event did: "recorded", "duplicate-event", "ignored", ..."""

    result: str
    state: str

    @property
    def recorded(self) -> bool:
        return self.result == "recorded"


@dataclass
class Transition:
    """A batch of writes to one campaign, applied atomically if its expectations hold."""

    key: str
    expected_states: tuple[CampaignState, ...] | None = None  # None: any state
    expect_absent: bool = False  # also accept "no campaign yet"
    lease_key: str = ""
    lease_token: str = ""
    ops: list[bytes | str | int | float] = field(default_factory=list)
    extra_keys: list[str] = field(default_factory=list)

    def expect(self, *states: CampaignState, absent: bool = False) -> Transition:
        """Apply only if the campaign is in one of `states` (or, with `absent`, does not exist)."""
        self.expected_states = states
        self.expect_absent = absent
        return self

    def fenced(self, lease_key: str, token: str) -> Transition:
        self.lease_key, self.lease_token = lease_key, token
        return self

    def set(self, **values: Unpack[CampaignUpdate]) -> Transition:
        """Write fields of the campaign's record (a None value is not written)."""
        flat = encode_update(values)
        if flat:
            self.ops += ["hset", len(flat) // 2, *flat]
        return self

    def set_counts(self, counts: RecipientCounts) -> Transition:
        """Write the recipient counts."""
        return self.set(**counts_update(counts))

    def set_header(self, encoded: bytes) -> Transition:
        """Write the encoded CampaignScheduled (for tests and benchmarks seeding campaigns:
        intake's script records it otherwise)."""
        self.ops += ["hset", 1, HEADER, encoded]
        return self

    def set_state(self, state: CampaignState) -> Transition:
        self.ops += ["hset", 1, STATE, state.value]
        return self

    def set_in(self, key: str, field_name: str, value: str) -> Transition:
        """HSET one field of another hash (the campaign's sub-sends) with this change."""
        self.ops += ["hsetk", self._key_index(key), field_name, value]
        return self

    def delete_fields(self, *fields: CampaignField[Any, Any]) -> Transition:
        """Remove fields of the record (`CampaignSnapshot.poll_failures`, ...)."""
        self.ops += ["hdel", len(fields), *(record_field.name for record_field in fields)]
        return self

    def enqueue(self, queue: str, member: str, due_at: datetime) -> Transition:
        self.ops += ["zadd", self._key_index(queue), to_millis(due_at), member]
        return self

    def dequeue(self, queue: str, member: str) -> Transition:
        self.ops += ["zrem", self._key_index(queue), member]
        return self

    def delete_key(self, key: str) -> Transition:
        self.ops += ["del", self._key_index(key)]
        return self

    def expire(self, key: str, seconds: int) -> Transition:
        self.ops += ["expire", self._key_index(key), seconds]
        return self

    def mark_seen(self, seen_key: str, fingerprint: str) -> Transition:
        """Remember an input event id, with what it stood for (see `event_fingerprint`)."""
        self.ops += ["setex", self._key_index(seen_key), EVENT_DEDUPE_TTL_S, fingerprint]
        return self

    def emit(self, outbox: str, entry: OutboxEntry) -> Transition:
        tombstone = entry.value is None
        self.ops += [
            "xadd",
            self._key_index(outbox),
            entry.topic,
            entry.key,
            b"" if entry.value is None else entry.value,
            entry.event_id,
            "1" if tombstone else "0",
        ]
        return self

    def _key_index(self, key: str) -> int:
        if key not in self.extra_keys:
            self.extra_keys.append(key)
        return 3 + self.extra_keys.index(key)  # KEYS[1] hash, KEYS[2] lease, then these


@dataclass(frozen=True)
class ApplyResult:
    ok: bool
    reason: str = ""  # "conflict:<state>" or "lease-lost" when not ok


# --- the campaign sets by state (DESIGN §6a) -------------------------------------------------
# Each script that changes a campaign keeps it in the sorted set of its state
# (`keys.campaigns_in_state`, named here from the index key), scored like the index by its last
# update. Counting the sets is the campaigns-by-state gauge; trimming them (`_TRIM_STATE_SETS`)
# removes campaigns whose hash expired from the index. Sets rather than counters: adding and
# removing a member are idempotent, so a count cannot drift, and a finished campaign's set still
# says its state after its hash has expired.
_TRACK_STATE = r"""
local function track_state(index, key, old, new, now)
  if old and old ~= new then redis.call('ZREM', index .. ':state:' .. old, key) end
  if new then redis.call('ZADD', index .. ':state:' .. new, now, key) end
end
"""

_APPLY = lua_with_fields(
    _TRACK_STATE
    + r"""
local hash = KEYS[1]
if KEYS[2] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[2] then return 'lease-lost' end
local state = redis.call('HGET', hash, '$state')
-- ARGV[1]: the states this change expects, comma-separated ('-' stands for "no campaign yet");
-- empty means any.
if ARGV[1] ~= '' then
  local ok = false
  for s in string.gmatch(ARGV[1], '[^,]+') do
    if s == state or (s == '-' and not state) then ok = true end
  end
  if not ok then return 'conflict:' .. (state or '-') end
end
local i = 6
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'hset' then
    local n = tonumber(ARGV[i + 1])
    redis.call('HSET', hash, unpack(ARGV, i + 2, i + 1 + 2 * n))
    i = i + 2 + 2 * n
  elseif op == 'hdel' then
    local n = tonumber(ARGV[i + 1])
    redis.call('HDEL', hash, unpack(ARGV, i + 2, i + 1 + n))
    i = i + 2 + n
  elseif op == 'hsetk' then
    redis.call('HSET', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 'zadd' then
    redis.call('ZADD', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 'zrem' then
    redis.call('ZREM', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2])
    i = i + 3
  elseif op == 'del' then
    redis.call('DEL', KEYS[tonumber(ARGV[i + 1])])
    i = i + 2
  elseif op == 'expire' then
    redis.call('EXPIRE', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2])
    i = i + 3
  elseif op == 'setex' then
    redis.call('SET', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 3], 'EX', ARGV[i + 2])
    i = i + 4
  elseif op == 'xadd' then
    redis.call('XADD', KEYS[tonumber(ARGV[i + 1])], '*', 'topic', ARGV[i + 2], 'key', ARGV[i + 3],
      'value', ARGV[i + 4], 'event_id', ARGV[i + 5], 'tombstone', ARGV[i + 6])
    i = i + 7
  else
    return redis.error_reply('unknown op ' .. tostring(op))
  end
end
redis.call('HSET', hash, '$updated_at', ARGV[3])
redis.call('ZADD', ARGV[4], ARGV[3], ARGV[5])
track_state(ARGV[4], ARGV[5], state, redis.call('HGET', hash, '$state'), ARGV[3])
return 'ok'
"""
)

# Recording a recipients batch: idempotent by event id and by batch index; the campaign turns
# READY when the header is in and every batch has arrived.
_RECORD_BATCH = lua_with_fields(
    _TRACK_STATE
    + r"""
local campaign, batches, recipients, seen, work, collecting, index =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local key, batch_index, now, deadline, ttl, with_promo, customers, joined, fingerprint =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8], ARGV[9]
-- An event id remembered with another fingerprint was reused by the producer for something
-- else ('1' is the marker of releases before fingerprints: taken as this event).
local seen_as = redis.call('GET', seen)
if seen_as then
  if seen_as == fingerprint or seen_as == '1' then return {'duplicate-event', ''} end
  return {'event-id-reused', ''}
end
local state = redis.call('HGET', campaign, '$state')
if state and state ~= 'COLLECTING' then
  redis.call('SET', seen, fingerprint, 'EX', ttl)
  return {'ignored', state}
end
local state_before = state
if redis.call('SISMEMBER', batches, batch_index) == 1 then
  redis.call('SET', seen, fingerprint, 'EX', ttl)
  return {'duplicate-batch', state or ''}
end
local count = tonumber(redis.call('HGET', campaign, '$batch_count') or '-1')
if count > 0 and tonumber(batch_index) >= count then return {'bad-index', state or ''} end
-- The batch's customer ids are kept as the one string they came in (joined by RS): storing is
-- cheap here, on intake's path; the resolution splits and de-duplicates them, batch by batch.
if customers > 0 then redis.call('HSET', recipients, batch_index, joined) end
-- Own promo codes, aligned with the ids; their distinct values are kept up to a bound (past it
-- the campaign's codes are "many" and its code texts go out personally: see send_plan).
local codes = ARGV[10]
if codes ~= '' then
  redis.call('HSET', KEYS[8], batch_index, codes)
  if redis.call('HEXISTS', campaign, '$codes_overflow') == 0 then
    local start = 1
    while true do
      local stop = string.find(codes, '\30', start, true)
      local code = string.sub(codes, start, (stop or 0) - 1)
      if code ~= '' then
        redis.call('SADD', KEYS[9], code)
        if redis.call('SCARD', KEYS[9]) > tonumber(ARGV[11]) then
          redis.call('HSET', campaign, '$codes_overflow', '1')
          break
        end
      end
      if not stop then break end
      start = stop + 1
    end
  end
end
redis.call('HINCRBY', campaign, '$requested', customers)
redis.call('HINCRBY', campaign, '$with_promo', with_promo)
redis.call('SADD', batches, batch_index)
redis.call('HSET', campaign, '$updated_at', now)
redis.call('ZADD', index, now, key)
if not state then
  state = 'COLLECTING'
  redis.call('HSET', campaign, '$state', state, '$created_at', now)
  redis.call('ZADD', collecting, 'NX', deadline, key)
end
if count > 0 and redis.call('SCARD', batches) >= count then
  state = 'READY'
  redis.call('HSET', campaign, '$state', state, '$ready_at', now)
  redis.call('ZREM', collecting, key)
  redis.call('ZADD', work, now, key)
end
track_state(index, key, state_before, state, now)
redis.call('SET', seen, fingerprint, 'EX', ttl)
return {'recorded', state}
"""
)

# Recording a campaign header (CampaignScheduled), with its ACCEPTED status event.
_RECORD_HEADER = lua_with_fields(
    _TRACK_STATE
    + r"""
local campaign, batches, seen, work, collecting, outbox, index =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local key, header, batch_count, now, deadline, ttl, fingerprint =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[10]
local seen_as = redis.call('GET', seen)
if seen_as then
  if seen_as == fingerprint or seen_as == '1' then return {'duplicate-event', ''} end
  return {'event-id-reused', ''}
end
local state = redis.call('HGET', campaign, '$state')
if state and state ~= 'COLLECTING' then
  redis.call('SET', seen, fingerprint, 'EX', ttl)
  return {'ignored', state}
end
local state_before = state
if redis.call('HEXISTS', campaign, '$header') == 1 then
  redis.call('SET', seen, fingerprint, 'EX', ttl)
  return {'ignored', 'header-present'}
end
for _, member in ipairs(redis.call('SMEMBERS', batches)) do
  if tonumber(member) >= tonumber(batch_count) then return {'bad-index', member} end
end
redis.call('HSET', campaign, '$header', header, '$batch_count', batch_count, '$updated_at', now)
if not state then redis.call('HSET', campaign, '$created_at', now) end
redis.call('ZADD', index, now, key)
redis.call('XADD', outbox, '*', 'topic', ARGV[7], 'key', key, 'value', ARGV[8],
  'event_id', ARGV[9], 'tombstone', '0')
if redis.call('SCARD', batches) >= tonumber(batch_count) then
  state = 'READY'
  redis.call('HSET', campaign, '$state', state, '$ready_at', now)
  redis.call('ZREM', collecting, key)
  redis.call('ZADD', work, now, key)
else
  state = 'COLLECTING'
  redis.call('HSET', campaign, '$state', state)
  redis.call('ZADD', collecting, 'GT', deadline, key)
end
track_state(index, key, state_before, state, now)
redis.call('SET', seen, fingerprint, 'EX', ttl)
return {'recorded', state}
"""
)

# Claim up to N due members of a queue, each under its own lease (SET NX PX) with a token unique
# to that claim (the caller's base token and a counter), so an old holder never passes a fence
# meant for a new one. A claimed member is pushed back by the lease time, so members held by
# others never crowd the due range, and a crashed holder's work falls due again when its lease
# runs out. ARGV[6..] are members this process already has in hand: never claimed again here.
_CLAIM_DUE = r"""
local in_hand = {}
for i = 6, #ARGV do in_hand[ARGV[i]] = true end
local limit = tonumber(ARGV[2])
local members =
  redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, limit * 4 + #ARGV - 5)
local claimed, n = {}, 0
local requeue_at = tonumber(ARGV[1]) + tonumber(ARGV[5])
for _, member in ipairs(members) do
  if not in_hand[member] then
    local token = ARGV[4] .. '#' .. tostring(n + 1)
    if redis.call('SET', ARGV[3] .. member, token, 'NX', 'PX', ARGV[5]) then
      redis.call('ZADD', KEYS[1], 'XX', requeue_at, member)
      table.insert(claimed, member)
      table.insert(claimed, token)
      n = n + 1
      if n >= limit then break end
    end
  end
end
return claimed
"""

_RENEW_LEASE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_LEASE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# --- the TextLocal rate limit ------------------------------------------------------------------
# GCRA (the generic cell rate algorithm). KEYS[1] holds the account's "theoretical arrival time"
# (TAT): when its next turn is due if turns are taken at the rate. A request may go when TAT is at
# most (burst - 1) intervals ahead of now, and moves TAT on by one interval. Time is Redis' own
# (TIME), in microseconds, so the replicas' clocks do not matter. ARGV[1]: the interval (µs per
# request, 1/rate); ARGV[2]: the burst (requests that may go back to back after a quiet spell).
# Answers 0 when a turn was taken, else the µs until one may be free (nothing is taken then).
_RATE_LIMIT_TURN = r"""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local wait = tat - (burst - 1) * interval - now
if wait > 0 then return wait end
tat = tat + interval
-- Once TAT has passed, the key says nothing that a missing key would not: it may expire then.
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return 0
"""

# Trim (bounded): look at up to ARGV[5] members of each state set scored before the cutoff
# (last update + retention passed). A campaign whose hash is gone (expired: its retention is over)
# leaves the set and the index; one filed under the wrong state moves to its own; one still there
# is looked at again when its hash expires (PTTL), or after another retention period (no TTL:
# a finished campaign whose segment clean-up is still pending). Returns {removed, any set full}.
_TRIM_STATE_SETS = lua_with_fields(
    r"""
local index, campaign_prefix = ARGV[1], ARGV[2]
local cutoff, now, limit = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local removed, full = 0, 0
for i = 6, #ARGV do
  local set = index .. ':state:' .. ARGV[i]
  local members = redis.call('ZRANGEBYSCORE', set, '-inf', cutoff, 'LIMIT', 0, limit)
  if #members >= limit then full = 1 end
  for _, key in ipairs(members) do
    local hash = campaign_prefix .. key
    local state = redis.call('HGET', hash, '$state')
    if not state then
      redis.call('ZREM', set, key)
      redis.call('ZREM', index, key)
      removed = removed + 1
    elseif state ~= ARGV[i] then
      redis.call('ZREM', set, key)
      redis.call('ZADD', index .. ':state:' .. state, 'NX',
        redis.call('ZSCORE', index, key) or now, key)
    else
      local ttl = redis.call('PTTL', hash)
      local again = now
      if ttl > 0 then again = string.format('%d', cutoff + ttl) end
      redis.call('ZADD', set, again, key)
    end
  end
end
return {removed, full}
"""
)

# Filing index members in the sets of their states (an upgrade from a version without the sets,
# or a check): each member leaves every other state set and joins its own (NX: a newer score
# stays); a member whose hash is gone leaves the index. ARGV: index, campaign key prefix, the
# number of states n, the n states, then the members. Returns how many left the index.
_INDEX_STATES = lua_with_fields(
    r"""
local index, campaign_prefix, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local dropped = 0
for i = 4 + n, #ARGV do
  local key = ARGV[i]
  local state = redis.call('HGET', campaign_prefix .. key, '$state')
  for j = 4, 3 + n do
    if ARGV[j] ~= state then redis.call('ZREM', index .. ':state:' .. ARGV[j], key) end
  end
  if state then
    local score = redis.call('ZSCORE', index, key)
    if score then redis.call('ZADD', index .. ':state:' .. state, 'NX', score, key) end
  else
    redis.call('ZREM', index, key)
    dropped = dropped + 1
  end
end
return dropped
"""
)

# --- opt-outs ----------------------------------------------------------------------------------
# Opt-outs with their outbox entries, once each. KEYS: seen set, watermark, outbox. ARGV: how far
# behind the watermark markers are kept (s), then per opt-out: marker, time (Unix s), n, and
# n x (topic, key, value, event id).
_RECORD_OPTOUTS = r"""
local seen, watermark, outbox = KEYS[1], KEYS[2], KEYS[3]
local high = tonumber(redis.call('GET', watermark) or '-1')
local new = {}
local i = 2
while i <= #ARGV do
  local marker, at, n = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  if redis.call('ZSCORE', seen, marker) then
    new[#new + 1] = 0
  else
    redis.call('ZADD', seen, at, marker)
    for j = i, i + 4 * (n - 1), 4 do
      redis.call('XADD', outbox, '*', 'topic', ARGV[j], 'key', ARGV[j + 1], 'value', ARGV[j + 2],
        'event_id', ARGV[j + 3], 'tombstone', '0')
    end
    new[#new + 1] = 1
  end
  i = i + 4 * n
  if at > high then high = at end
end
if high >= 0 then
  redis.call('SET', watermark, string.format('%d', high))
  redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. string.format('%d', high - tonumber(ARGV[1])))
end
return new
"""


# Numbers go to the two outcome scripts as one argument, joined by commas (digits only), and the
# scripts read and write the hash a slice at a time (HMGET/HSET of up to 1,000 fields: Lua's
# `unpack` is bounded): one redis.call per thousand numbers, not two per number.
_SPLIT_NUMBERS = r"""
local function split_numbers(joined)
  local all = {}
  for number in string.gmatch(joined, '[^,]+') do all[#all + 1] = number end
  return all
end
"""

# The numbers' values in the campaign's numbers hash, in the order given: HMGET without the cost
# of packing ten thousand arguments in Python. KEYS: the hash. ARGV: the numbers. Returns one
# list of values (nil for a number not in it) per thousand numbers.
_RECIPIENT_VALUES = (
    _SPLIT_NUMBERS
    + r"""
local all, found = split_numbers(ARGV[1]), {}
local n = #all
for first = 1, n, 1000 do
  found[#found + 1] = redis.call('HMGET', KEYS[1], unpack(all, first, math.min(first + 999, n)))
end
return found
"""
)

# Recording one CustomerOutcomes record (consumer.outcomes): every number must still be eligible
# (as above); then each is marked with the outcome's letter and the record goes to the outbox.
# If any is not, nothing is written and the ineligible numbers are returned. KEYS: the campaign's
# numbers hash, the outbox. ARGV: the letter, '1' when final, the outbox entry (topic, key, value,
# event id), the numbers.
_RECORD_OUTCOME_CHUNK = (
    _SPLIT_NUMBERS
    + r"""
local hash, outbox = KEYS[1], KEYS[2]
local letter, final = ARGV[1], ARGV[2] == '1'
local all, refused, marks = split_numbers(ARGV[7]), {}, {}
local n = #all
for first = 1, n, 1000 do
  local values = redis.call('HMGET', hash, unpack(all, first, math.min(first + 999, n)))
  for i = 1, #values do
    local value = values[i]
    local mark = value and string.byte(value, 1)
    if mark == 45 or (final and mark == 80) then  -- '-' nothing yet, 'P' pending
      marks[#marks + 1] = all[first + i - 1]
      marks[#marks + 1] = letter .. string.sub(value, 2)
    else
      refused[#refused + 1] = all[first + i - 1]
    end
  end
end
if #refused > 0 then return refused end
for first = 1, #marks, 2000 do
  redis.call('HSET', hash, unpack(marks, first, math.min(first + 1999, #marks)))
end
redis.call('XADD', outbox, '*', 'topic', ARGV[3], 'key', ARGV[4], 'value', ARGV[5],
  'event_id', ARGV[6], 'tombstone', '0')
return refused
"""
)

# The mark of a number whose customer has nothing published yet (see keys.recipient_numbers).
NOTHING_PUBLISHED = "-"

# Recording numbers again without undoing outcomes already marked: each field only if absent.
# KEYS: the numbers hash. ARGV: its TTL in seconds, then number, value, number, value, ...
_ADD_MISSING_NUMBERS = r"""
for i = 2, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class CampaignStore:
    """Reads and atomically changes campaigns, queues, leases and the outbox in Redis."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys, registry: SchemaRegistry) -> None:
        self.redis = redis
        self.keys = keys
        self._registry = registry
        self._apply = redis.register_script(_APPLY)
        self._record_batch = redis.register_script(_RECORD_BATCH)
        self._record_header = redis.register_script(_RECORD_HEADER)
        self._claim_due = redis.register_script(_CLAIM_DUE)
        self._renew = redis.register_script(_RENEW_LEASE)
        self._release = redis.register_script(_RELEASE_LEASE)
        self._rate_limit_turn = redis.register_script(_RATE_LIMIT_TURN)
        self._trim_state_sets = redis.register_script(_TRIM_STATE_SETS)
        self._index_states = redis.register_script(_INDEX_STATES)
        self._accept_receipt = redis.register_script(_ACCEPT_RECEIPT)
        self._digest_key: bytes | None = None
        self._recipient_values = redis.register_script(_RECIPIENT_VALUES)
        self._record_outcome_chunk = redis.register_script(_RECORD_OUTCOME_CHUNK)
        self._record_optouts = redis.register_script(_RECORD_OPTOUTS)
        self._add_missing_numbers = redis.register_script(_ADD_MISSING_NUMBERS)

    # --- start-up ---------------------------------------------------------------------------

    async def check_persistence(self, *, allow_without: bool) -> bool:
        """True when Redis writes an append-only file; refuses to go on without unless allowed."""
        with redis_errors("INFO persistence"):
            info = await self.redis.info("persistence")
        if int(info.get("aof_enabled", 0)) == 1:
            return True
        if allow_without:
            return False
        raise ConfigError(
            "redis.url",
            "this Redis has no AOF persistence (appendonly no): campaign state would be lost on "
            "restart. Enable appendonly, or set TEXTLOCAL_CONSUMER_REDIS_ALLOW_NO_PERSISTENCE=true "
            "to run anyway",
        )

    # --- intake -----------------------------------------------------------------------------

    async def record_header(
        self,
        event: CampaignScheduled,
        accepted: OutboxEntry,
        now: datetime,
        collect_deadline: datetime,
        fingerprint: str,
    ) -> IntakeOutcome:
        key = event.ref.key
        header = self._registry.encode("CampaignScheduled", event.to_fields())
        k = self.keys
        with redis_errors("record header"):
            result = await self._record_header(
                keys=[
                    k.campaign(key),
                    k.batches(key),
                    k.event_seen(event.event_id),
                    k.work_queue,
                    k.collecting_queue,
                    k.outbox,
                    k.campaigns_index,
                ],
                args=[
                    key,
                    header,
                    event.batch_count,
                    to_millis(now),
                    to_millis(collect_deadline),
                    EVENT_DEDUPE_TTL_S,
                    accepted.topic,
                    accepted.value or b"",
                    accepted.event_id,
                    fingerprint,
                ],
            )
        return _outcome(result)

    async def record_batch(
        self,
        event: CampaignRecipients,
        now: datetime,
        collect_deadline: datetime,
        fingerprint: str,
    ) -> IntakeOutcome:
        key = event.ref.key
        k = self.keys
        with redis_errors("record batch"):
            result = await self._record_batch(
                keys=[
                    k.campaign(key),
                    k.batches(key),
                    k.recipients(key),
                    k.event_seen(event.event_id),
                    k.work_queue,
                    k.collecting_queue,
                    k.campaigns_index,
                    k.recipient_codes(key),
                    k.distinct_codes(key),
                ],
                args=[
                    key,
                    event.batch_index,
                    to_millis(now),
                    to_millis(collect_deadline),
                    EVENT_DEDUPE_TTL_S,
                    event.customers_with_promo_code,
                    len(event.customer_ids),
                    ID_SEPARATOR.join(event.customer_ids),
                    fingerprint,
                    ID_SEPARATOR.join(event.promo_codes),
                    MAX_DISTINCT_CODES_KEPT,
                ],
            )
        return _outcome(result)

    async def seen_event(self, event_id: str) -> str | None:
        """The fingerprint an input event id was recorded with, or None if it is new."""
        with redis_errors("GET event"):
            value = await self.redis.get(self.keys.event_seen(event_id))
        return None if value is None else as_text(value)

    async def batch_indexes(self, key: str) -> list[int]:
        with redis_errors("SMEMBERS batches"):
            members = await self.redis.smembers(self.keys.batches(key))
        return sorted(int(m) for m in members)

    # --- reading and changing campaigns -----------------------------------------------------

    async def load(self, key: str) -> CampaignSnapshot | None:
        with redis_errors("HGETALL campaign"):
            raw = {
                as_bytes(name): as_bytes(value)
                for name, value in (await self.redis.hgetall(self.keys.campaign(key))).items()
            }
        if not raw or STATE.encode() not in raw:
            return None
        header_bytes = raw.pop(HEADER.encode(), None)
        header = None
        if header_bytes:
            decoded = self._registry.decode(header_bytes, expected={"CampaignScheduled"})
            header = CampaignScheduled.from_fields(decoded.fields)
        fields = {name.decode(): value.decode() for name, value in raw.items()}
        return parse_campaign(key, fields, header)

    async def load_without_header(self, key: str) -> CampaignSnapshot | None:
        """The campaign's record without decoding its header (which may be what fails): its
        `header` is None, and text that is not UTF-8 reads with replacement characters."""
        with redis_errors("HGETALL campaign"):
            raw = await self.redis.hgetall(self.keys.campaign(key))
        fields = {
            as_text(name): as_bytes(value).decode(errors="replace")
            for name, value in raw.items()
            if as_text(name) != HEADER
        }
        return parse_campaign(key, fields, None)

    def transition(self, key: str) -> Transition:
        return Transition(key=key)

    async def apply(self, transition: Transition, now: datetime) -> ApplyResult:
        """Apply a transition atomically; not applied when an expectation does not hold."""
        keys, args = self._apply_arguments(transition, now)
        with redis_errors("apply transition"):
            result = await self._apply(keys=keys, args=args)
        return _apply_result(result)

    async def apply_all(
        self, transitions: Sequence[Transition], now: datetime
    ) -> list[ApplyResult]:
        """Apply many transitions in one round trip (a pipeline); each is atomic on its own."""
        with redis_errors("apply transitions"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for transition in transitions:
                    keys, args = self._apply_arguments(transition, now)
                    await self._apply(keys=keys, args=args, client=pipe)
                results = await pipe.execute()
        return [_apply_result(result) for result in results]

    def _apply_arguments(
        self, transition: Transition, now: datetime
    ) -> tuple[list[str], list[bytes | str | int | float]]:
        expected = ",".join(
            [state.value for state in transition.expected_states or ()]
            + (["-"] if transition.expect_absent else [])
        )
        keys = [self.keys.campaign(transition.key), transition.lease_key, *transition.extra_keys]
        args: list[bytes | str | int | float] = [
            expected,
            transition.lease_token,
            to_millis(now),
            self.keys.campaigns_index,
            transition.key,
            *transition.ops,
        ]
        return keys, args

    async def campaign_keys(self, limit: int = 100) -> list[str]:
        """The most recently updated campaigns."""
        with redis_errors("ZREVRANGE campaigns"):
            members = await self.redis.zrevrange(self.keys.campaigns_index, 0, limit - 1)
        return [as_text(member) for member in members]

    # --- the campaign index over time: retention and counts by state (DESIGN §6a) ----------
    # Per-cycle cost does not grow with the campaigns ever run: counting is one ZCARD per state,
    # a trim with nothing to do one ZRANGEBYSCORE per state.

    async def campaign_counts(self) -> dict[CampaignState, int]:
        """Campaigns held in Redis, by state (finished ones until their retention ends)."""
        with redis_errors("ZCARD campaign states"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for state in CampaignState:
                    pipe.zcard(self.keys.campaigns_in_state(state.value))
                sizes = await pipe.execute()
        return {state: int(size) for state, size in zip(CampaignState, sizes, strict=True)}

    async def trim_campaign_index(
        self, now: datetime, retention: timedelta, *, limit: int = 500, max_rounds: int = 20
    ) -> int:
        """Remove the campaigns whose hash has expired (retention over) from the index and the
        state sets; returns how many. Each round is one bounded Lua call (`_TRIM_STATE_SETS`);
        rounds go on while a set had a full page, up to `max_rounds`."""
        keys = self.keys
        args = [
            keys.campaigns_index,
            keys.campaign_prefix,
            to_millis(now - retention),
            to_millis(now),
            limit,
            *(state.value for state in CampaignState),
        ]
        removed = 0
        for _ in range(max_rounds):
            with redis_errors("trim campaign index"):
                removed_now, full = await self._trim_state_sets(args=args)
            removed += int(removed_now)
            if not int(full):
                break
        return removed

    async def campaign_states_indexed(self) -> bool:
        """Whether every campaign of the index has been filed in its state set."""
        with redis_errors("EXISTS campaign states indexed"):
            return bool(await self.redis.exists(self.keys.campaign_states_indexed))

    async def index_campaign_states(self, chunk: int = 1000) -> int:
        """File every index member in the set of its state and drop those whose hash is gone;
        then mark it done. Once after an upgrade from a version without the state sets: O(index),
        in atomic chunks, idempotent and safe beside running replicas. Returns how many members
        left the index."""
        keys = self.keys
        states = [state.value for state in CampaignState]
        head: list[bytes | str | int] = [
            keys.campaigns_index,
            keys.campaign_prefix,
            len(states),
            *states,
        ]
        dropped = 0
        cursor = 0
        with redis_errors("index campaign states"):
            while True:
                cursor, pairs = await self.redis.zscan(keys.campaigns_index, cursor, count=chunk)
                if pairs:
                    members = [as_bytes(member) for member, _score in pairs]
                    dropped += int(await self._index_states(args=[*head, *members]))
                if cursor == 0:
                    break
            await self.redis.set(keys.campaign_states_indexed, "1")
        return dropped

    # --- per-customer outcomes (consumer.outcomes) -------------------------------------------

    async def record_recipient_numbers(
        self,
        key: str,
        pairs: Sequence[tuple[str, str]],
        ttl_s: int,
        *,
        keep_existing: bool = False,
    ) -> None:
        """Remember which customer each number of the campaign was sent for (number, customer
        id), nothing published yet; the hash expires after `ttl_s` unless deleted earlier. One
        HSET of the batch (packed by hiredis, see `_HiredisPacking`). `keep_existing` leaves
        the numbers already there as they are (their outcomes may be marked: a campaign whose
        sends had started resolving again), at a Redis call per number."""
        if not pairs:
            return
        numbers = self.keys.recipient_numbers(key)
        # number, value, number, value, ... laid out by slice assignment (in C), not pair by pair
        fields: list[str] = [""] * (2 * len(pairs))
        fields[::2] = [number for number, _ in pairs]
        fields[1::2] = [NOTHING_PUBLISHED + customer_id for _, customer_id in pairs]
        if keep_existing:
            with redis_errors("add missing recipient numbers"):
                await self._add_missing_numbers(keys=[numbers], args=[ttl_s, *fields])
            return
        with redis_errors("record recipient numbers"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.execute_command("HSET", numbers, *fields)
                pipe.expire(numbers, ttl_s)
                await pipe.execute()

    async def outcome_candidates(
        self, key: str, numbers: Sequence[str], *, final: bool
    ) -> dict[str, str]:
        """Number → customer id, of the `numbers` whose customer may still take an outcome:
        nothing published yet, or (when `final`) only PENDING. Numbers not of this campaign
        are left out (as is anything but digits, which no campaign holds). One round trip
        (`_RECIPIENT_VALUES`)."""
        try:
            joined = _joined_numbers(numbers)
        except ValueError:
            numbers = [number for number in numbers if number.isdigit() and number.isascii()]
            if not numbers:
                return {}
            joined = _joined_numbers(numbers)
        with redis_errors("look up recipient numbers"):
            parts = await self._recipient_values(
                keys=[self.keys.recipient_numbers(key)], args=[joined]
            )
        # The client answers bytes (connect_redis): compared and decoded as such, in bulk.
        eligible = (b"-", b"P") if final else (b"-",)
        values = [value for part in parts for value in part]
        return {
            number: raw[1:].decode()
            for number, raw in zip(numbers, values, strict=True)
            if raw is not None and raw[:1] in eligible
        }

    async def record_outcome_chunk(
        self, key: str, letter: str, numbers: Sequence[str], entry: OutboxEntry
    ) -> list[str]:
        """Mark `numbers` with the outcome `letter` and append `entry` (their record) to the
        outbox, atomically; nothing is written if any of them is no longer eligible, and those
        are returned (see `_RECORD_OUTCOME_CHUNK`)."""
        final = "0" if letter == "P" else "1"
        with redis_errors("record outcomes"):
            refused = await self._record_outcome_chunk(
                keys=[self.keys.recipient_numbers(key), self.keys.outbox],
                args=[
                    letter,
                    final,
                    entry.topic,
                    entry.key,
                    entry.value or b"",
                    entry.event_id,
                    _joined_numbers(numbers),
                ],
            )
        return [as_text(number) for number in refused or []]

    async def published_outcomes(self, key: str) -> dict[str, str]:
        """Customer id → the letter of what was published for it ("-" nothing); for tests and
        the operator (HSCAN, so a large campaign does not block Redis)."""
        found: dict[str, str] = {}
        with redis_errors("HSCAN recipient numbers"):
            async for _, raw in self.redis.hscan_iter(self.keys.recipient_numbers(key), count=5000):
                value = as_text(raw)
                found[value[1:]] = value[:1]
        return found

    # --- queues and leases ------------------------------------------------------------------

    async def claim_due(
        self,
        queue: str,
        lease_prefix: str,
        now: datetime,
        limit: int,
        token: str,
        ttl_ms: int,
        in_hand: Sequence[str] = (),
    ) -> list[tuple[str, str]]:
        """Claim up to `limit` due members not `in_hand`: (member, that claim's own token)."""
        with redis_errors("claim due"):
            flat = await self._claim_due(
                keys=[queue], args=[to_millis(now), limit, lease_prefix, token, ttl_ms, *in_hand]
            )
        texts = [as_text(value) for value in flat]
        return list(zip(texts[0::2], texts[1::2], strict=True))

    async def hand_back(self, queue: str, member: str, now: datetime) -> None:
        """Due at once for the next owner; a member whose work removed it stays removed (XX)."""
        with redis_errors("ZADD XX"):
            await self.redis.zadd(queue, {member: to_millis(now)}, xx=True)

    async def loaded_chunks(self, key: str) -> set[int]:
        """The chunk indexes of the campaign TextLocal has accepted into its segment."""
        with redis_errors("SMEMBERS chunks loaded"):
            members = await self.redis.smembers(self.keys.chunks_loaded(key))
        return {int(as_text(member)) for member in members}

    async def sub_sends(self, key: str) -> dict[str, dict[str, Any]]:
        """The campaign's send plan and sub-send records (JSON values by name)."""
        with redis_errors("HGETALL sub-sends"):
            raw = await self.redis.hgetall(self.keys.sub_sends(key))
        return {as_text(name): json.loads(as_bytes(value)) for name, value in raw.items()}

    async def distinct_codes(self, key: str) -> tuple[list[str], bool]:
        """The distinct per-customer promo codes intake kept, and whether there were more."""
        with redis_errors("SMEMBERS codes"):
            members = await self.redis.smembers(self.keys.distinct_codes(key))
            overflow = await self.redis.hexists(
                self.keys.campaign(key), CampaignSnapshot.codes_overflow.name
            )
        return sorted(as_text(member) for member in members), bool(overflow)

    async def personal_chunk(self, key: str, number: int) -> str:
        """A chunk of personal texts the load step kept (a fenced `Transition.set_in`, see
        multi_send). Its absence is lost data (Redis without its AOF, or a key deleted by
        hand), not worth retrying: PermanentError."""
        with redis_errors("HGET personal chunk"):
            value = await self.redis.hget(self.keys.personal_chunks(key), str(number))
        if value is None:
            raise PermanentError(f"campaign {key}: personal chunk {number} is not in Redis")
        return as_text(value)

    async def loaded_chunk_names(self, key: str) -> set[str]:
        """Chunk names ("text:n") of a multi-text campaign TextLocal has accepted."""
        with redis_errors("SMEMBERS chunks loaded"):
            members = await self.redis.smembers(self.keys.chunks_loaded(key))
        return {as_text(member) for member in members}

    async def mark_chunk_loaded(self, key: str, index: int | str) -> None:
        with redis_errors("SADD chunk loaded"):
            await self.redis.sadd(self.keys.chunks_loaded(key), index)

    async def count_step_retry(self, key: str) -> int:
        """One more transient step failure in a row for the campaign (steps reset it)."""
        with redis_errors("HINCRBY failures"):
            failures = CampaignSnapshot.failures.name
            return int(await self.redis.hincrby(self.keys.campaign(key), failures, 1))

    async def count_handler_failure(self, role: str, member: str) -> int:
        """One more unexpected handler failure in a row for a member of a role's queue."""
        with redis_errors("HINCRBY handler failures"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hincrby(self.keys.handler_failures(role), member, 1)
                pipe.expire(self.keys.handler_failures(role), HANDLER_FAILURES_TTL_S)
                count, _ = await pipe.execute()
        return int(count)

    async def clear_handler_failures(self, role: str, member: str) -> None:
        with redis_errors("HDEL handler failures"):
            await self.redis.hdel(self.keys.handler_failures(role), member)

    async def due_members(self, queue: str, now: datetime, limit: int) -> list[str]:
        with redis_errors("ZRANGEBYSCORE"):
            members = await self.redis.zrangebyscore(queue, "-inf", to_millis(now), 0, limit)
        return [as_text(member) for member in members]

    async def reschedule(self, queue: str, member: str, due_at: datetime) -> None:
        with redis_errors("ZADD"):
            await self.redis.zadd(queue, {member: to_millis(due_at)})

    async def unschedule(self, queue: str, member: str) -> None:
        with redis_errors("ZREM"):
            await self.redis.zrem(queue, member)

    async def queue_size(self, queue: str) -> int:
        with redis_errors("ZCARD"):
            return int(await self.redis.zcard(queue))

    async def acquire_lease(self, lease_key: str, token: str, ttl_ms: int) -> bool:
        with redis_errors("acquire lease"):
            return bool(await self.redis.set(lease_key, token, nx=True, px=ttl_ms))

    async def renew_lease(self, lease_key: str, token: str, ttl_ms: int) -> bool:
        with redis_errors("renew lease"):
            return bool(await self._renew(keys=[lease_key], args=[token, ttl_ms]))

    async def release_lease(self, lease_key: str, token: str) -> None:
        with redis_errors("release lease"):
            await self._release(keys=[lease_key], args=[token])

    # --- outbox -----------------------------------------------------------------------------

    async def outbox_read(self, limit: int) -> list[OutboxEntry]:
        with redis_errors("XRANGE outbox"):
            rows = await self.redis.xrange(self.keys.outbox, "-", "+", count=limit)
        return [_outbox_entry(entry_id, values or {}) for entry_id, values in rows or []]

    async def outbox_delete(self, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            with redis_errors("XDEL outbox"):
                await self.redis.xdel(self.keys.outbox, *entry_ids)

    async def outbox_set_aside(self, entries: Sequence[tuple[OutboxEntry, str]]) -> None:
        """Move events Kafka refuses for good out of the outbox, into the set-aside stream."""
        with redis_errors("set aside outbox entries"):
            async with self.redis.pipeline(transaction=True) as pipe:
                for entry, reason in entries:
                    pipe.xadd(
                        self.keys.outbox_set_aside,
                        {**_outbox_fields(entry), "reason": reason, "outbox_id": entry.entry_id},
                    )
                    pipe.xdel(self.keys.outbox, entry.entry_id)
                await pipe.execute()

    async def outbox_head_id(self) -> str | None:
        """The id of the oldest outbox entry (without parsing it: it may be what fails)."""
        with redis_errors("XRANGE outbox head"):
            rows = await self.redis.xrange(self.keys.outbox, "-", "+", count=1)
        return as_text(rows[0][0]) if rows else None

    async def outbox_set_aside_raw(self, entry_id: str, reason: str) -> None:
        """Move one outbox entry, as it is, to the set-aside stream with the reason."""
        with redis_errors("set aside outbox entry"):
            rows = await self.redis.xrange(self.keys.outbox, entry_id, entry_id)
            async with self.redis.pipeline(transaction=True) as pipe:
                for _, values in rows or []:
                    fields: dict[Any, Any] = dict(values or {})
                    fields.update(reason=reason[:500], outbox_id=entry_id)
                    pipe.xadd(self.keys.outbox_set_aside, fields)
                pipe.xdel(self.keys.outbox, entry_id)
                await pipe.execute()

    async def outbox_set_aside_entries(self, limit: int = 100) -> list[OutboxEntry]:
        """What was set aside, oldest first (for the operator and tests)."""
        with redis_errors("XRANGE set aside"):
            rows = await self.redis.xrange(self.keys.outbox_set_aside, "-", "+", count=limit)
        return [_outbox_entry(entry_id, values or {}) for entry_id, values in rows or []]

    async def outbox_length(self) -> int:
        with redis_errors("XLEN outbox"):
            return int(await self.redis.xlen(self.keys.outbox))

    async def wait_for_outbox(self, after_id: str, timeout_ms: int) -> None:
        """Block until an entry newer than `after_id` arrives, or the timeout passes."""
        with redis_errors("XREAD outbox"):
            await self.redis.xread({self.keys.outbox: after_id}, count=1, block=timeout_ms)

    async def add_to_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        """Append events that belong to no campaign transition (the template catalog)."""
        if not entries:
            return
        with redis_errors("XADD outbox"):
            async with self.redis.pipeline(transaction=True) as pipe:
                for entry in entries:
                    pipe.xadd(self.keys.outbox, _outbox_fields(entry))
                await pipe.execute()

    async def delete_keys(self, *keys: str) -> None:
        if keys:
            with redis_errors("UNLINK"):
                await self.redis.unlink(*keys)

    async def ping(self) -> bool:
        try:
            with redis_errors("PING"):
                return bool(await self.redis.ping())
        except StoreUnavailable:
            return False

    # --- the TextLocal rate limit (one per account, shared by every replica) ------------------

    async def take_rate_limit_turn(self, account: str, interval_us: int, burst: int) -> float:
        """Take a turn under the account's shared rate limit, or learn when to ask again.

        Returns 0.0 when this call took a turn (its TextLocal request may go now), else the
        seconds until a turn may be free (nothing was taken). One Lua call, timed by Redis.
        """
        if interval_us < 1 or burst < 1:
            raise ValueError("interval_us and burst must be at least 1")
        with redis_errors("rate limit turn"):
            wait_us = await self._rate_limit_turn(
                keys=[self.keys.textlocal_rate_limit(account)], args=[interval_us, burst]
            )
        return int(wait_us) / 1_000_000

    # --- poll queue, template catalog, daily jobs (for the poller, catalog and daily jobs) --

    async def count_due(self, queue: str, due_by: datetime) -> int:
        """Members of `queue` due at or before `due_by`."""
        with redis_errors("ZCOUNT"):
            return int(await self.redis.zcount(queue, "-inf", to_millis(due_by)))

    async def reschedule_if_queued(self, queue: str, member: str, due_at: datetime) -> None:
        """Move a member's due time, only if it is still in the queue (ZADD XX)."""
        with redis_errors("ZADD XX"):
            await self.redis.zadd(queue, {member: to_millis(due_at)}, xx=True)

    async def replace_template_copy(self, entries: Mapping[int, str]) -> None:
        """Replace the copy of TextLocal's templates (template id → JSON), atomically."""
        key = self.keys.templates_catalog
        with redis_errors("replace templates"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                if entries:
                    pipe.hset(key, mapping={str(i): value for i, value in entries.items()})
                await pipe.execute()

    async def template_copy_entries(self) -> list[bytes]:
        """Every template of the copy (JSON), in no particular order."""
        with redis_errors("HGETALL templates"):
            raw = await self.redis.hgetall(self.keys.templates_catalog)
        return [as_bytes(value) for value in raw.values()]

    async def template_copy_entry(self, template_id: int) -> bytes | None:
        """One template of the copy (JSON), or None when the copy does not have it."""
        with redis_errors("HGET template"):
            raw = await self.redis.hget(self.keys.templates_catalog, str(template_id))
        return None if raw is None else as_bytes(raw)

    async def published_templates(self) -> dict[int, str]:
        """Template id → fingerprint of what the catalog last published."""
        with redis_errors("HGETALL templates published"):
            raw = await self.redis.hgetall(self.keys.templates_published)
        return {int(as_text(name)): as_text(value) for name, value in raw.items()}

    async def record_published_templates(
        self, fingerprints: Mapping[int, str], gone: Sequence[int]
    ) -> None:
        """Remember what the catalog published (id → fingerprint) and forget the tombstoned."""
        if not fingerprints and not gone:
            return
        key = self.keys.templates_published
        with redis_errors("record templates published"):
            async with self.redis.pipeline(transaction=True) as pipe:
                if fingerprints:
                    pipe.hset(key, mapping={str(i): value for i, value in fingerprints.items()})
                if gone:
                    pipe.hdel(key, *(str(template_id) for template_id in gone))
                await pipe.execute()

    # --- opt-outs (the daily opt-out import) ----------------------------------------------------

    async def optouts_watermark(self) -> datetime | None:
        """TextLocal's time of the latest opt-out recorded, None before the first."""
        with redis_errors("GET opt-outs watermark"):
            raw = await self.redis.get(self.keys.optouts_watermark)
        return None if raw is None else datetime.fromtimestamp(int(as_text(raw)), UTC)

    async def seen_optouts(self, markers: Sequence[str]) -> set[str]:
        """The markers among `markers` already recorded (`record_optouts`)."""
        if not markers:
            return set()
        with redis_errors("ZMSCORE opt-outs seen"):
            scores = await self.redis.zmscore(self.keys.optouts_seen, list(markers))
        return {marker for marker, score in zip(markers, scores, strict=True) if score is not None}

    async def record_optouts(
        self, optouts: Sequence[tuple[str, datetime, Sequence[OutboxEntry]]], keep: timedelta
    ) -> list[bool]:
        """Record opt-outs read from TextLocal, atomically with their outbox entries.

        Each is (marker, TextLocal's time of it, its entries: none for an opt-out no customer
        holds). In one Lua call: an opt-out whose marker is already in `keys.optouts_seen` is
        skipped (entries and all); the others are marked and their entries appended to the
        outbox; the watermark moves up to the latest time given; markers scored more than `keep`
        behind the watermark are trimmed. Returns, per opt-out, whether it was new.
        """
        if not optouts:
            return []
        args: list[bytes | str | int] = [int(keep.total_seconds())]
        for marker, at, entries in optouts:
            args += [marker, to_unix_s(at), len(entries)]
            for entry in entries:
                args += [entry.topic, entry.key, entry.value or b"", entry.event_id]
        keys = [self.keys.optouts_seen, self.keys.optouts_watermark, self.keys.outbox]
        with redis_errors("record opt-outs"):
            flags = await self._record_optouts(keys=keys, args=args)
        return [bool(int(flag)) for flag in flags]

    async def daily_job_last_success(self, job: str) -> datetime | None:
        with redis_errors("GET daily job last success"):
            raw = await self.redis.get(self.keys.daily_job_last_success(job))
        return None if raw is None else datetime.fromtimestamp(int(as_text(raw)) / 1000, UTC)

    async def record_daily_job_success(self, job: str, at: datetime) -> None:
        with redis_errors("SET daily job last success"):
            await self.redis.set(self.keys.daily_job_last_success(job), to_millis(at))

    # --- delivery receipts (consumer.receipts; DESIGN §4b) ----------------------------------

    async def register_receipt_reference(
        self, reference: str, campaign_key: str, retention: timedelta
    ) -> None:
        """Remember which campaign a send's `custom` reference stands for, before the send, so
        a receipt carrying it is accepted (and none for a reference never sent is)."""
        with redis_errors("SET receipt reference"):
            await self.redis.set(
                self.keys.receipt_reference(reference),
                campaign_key,
                ex=max(1, int(retention.total_seconds())),
            )

    async def receipt_campaigns(self, references: Sequence[str]) -> dict[str, str]:
        """reference → campaign key, for the references still known."""
        if not references:
            return {}
        unique = list(dict.fromkeys(references))
        with redis_errors("MGET receipt references"):
            found = await self.redis.mget([self.keys.receipt_reference(r) for r in unique])
        return {ref: as_text(key) for ref, key in zip(unique, found, strict=True) if key}

    async def receipt_digest_key(self) -> bytes:
        """The deployment's random key for receipt digests (made by the first replica to ask)."""
        if self._digest_key is None:
            with redis_errors("receipt digest key"):
                await self.redis.set(self.keys.receipt_digest_key, os.urandom(32), nx=True)
                key = await self.redis.get(self.keys.receipt_digest_key)
            self._digest_key = as_bytes(key)
        return self._digest_key

    async def accept_receipt(self, receipt: ReceiptEntry, digest: str, max_backlog: int) -> str:
        """Record one receipt, atomically: "accepted"; "duplicate" (its digest was seen);
        "unknown_reference" (no send of ours carries its reference); "backlog_full" (already
        `max_backlog` receipts wait)."""
        keys = self.keys
        with redis_errors("accept receipt"):
            result = await self._accept_receipt(
                keys=[
                    keys.receipt_reference(receipt.reference),
                    keys.receipts_seen(receipt.reference),
                    keys.receipts,
                ],
                args=[
                    digest,
                    max_backlog,
                    receipt.reference,
                    receipt.number,
                    receipt.status,
                    receipt.at_s,
                ],
            )
        return as_text(result)

    async def receipts_read(self, limit: int) -> list[ReceiptEntry]:
        """The oldest receipts waiting, up to `limit`."""
        with redis_errors("XRANGE receipts"):
            raw = await self.redis.xrange(self.keys.receipts, "-", "+", count=limit)
        return [_receipt_entry(entry_id, fields or {}) for entry_id, fields in raw or []]

    async def receipts_done(self, entry_ids: Sequence[str]) -> None:
        """Delete receipts the drain has turned into outcomes (or dropped)."""
        if entry_ids:
            with redis_errors("XDEL receipts"):
                await self.redis.xdel(self.keys.receipts, *entry_ids)

    async def receipts_backlog(self) -> int:
        with redis_errors("XLEN receipts"):
            return int(await self.redis.xlen(self.keys.receipts))

    async def wait_for_receipts(self, after_id: str, timeout_ms: int) -> None:
        """Block until a receipt is added after `after_id`, or the timeout."""
        with redis_errors("XREAD receipts"):
            await self.redis.xread({self.keys.receipts: after_id}, count=1, block=timeout_ms)


# Accepting a receipt: the reference must be one of our sends; a digest seen before is a
# duplicate (answered as accepted, recorded once); the backlog is bounded. The seen-hash lives
# as long as the reference (set at the send), so it never outlives its campaign's receipts.
_ACCEPT_RECEIPT = r"""
local ttl = redis.call('TTL', KEYS[1])
if ttl == -2 then return 'unknown_reference' end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 'duplicate' end
if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[2]) then return 'backlog_full' end
redis.call('XADD', KEYS[3], '*', 'ref', ARGV[3], 'number', ARGV[4], 'status', ARGV[5],
  'at', ARGV[6])
redis.call('HSET', KEYS[2], ARGV[1], '1')
if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
return 'accepted'
"""


@dataclass(frozen=True)
class ReceiptEntry:
    """A delivery receipt as recorded: the send's reference, the number, the status letter
    (D, U, I, E or ?) and when TextLocal says it happened (Unix s)."""

    reference: str
    number: str
    status: str
    at_s: int
    entry_id: str = ""


def _receipt_entry(entry_id: object, raw: Mapping[Any, Any]) -> ReceiptEntry:
    values = {as_text(name): as_text(value) for name, value in raw.items()}
    return ReceiptEntry(
        reference=values.get("ref", ""),
        number=values.get("number", ""),
        status=values.get("status", ""),
        at_s=int(values.get("at") or 0),
        entry_id=as_text(entry_id),
    )


def _apply_result(result: Any) -> ApplyResult:
    reason = result.decode() if isinstance(result, bytes) else str(result)
    return ApplyResult(ok=reason == "ok", reason="" if reason == "ok" else reason)


def _joined_numbers(numbers: Sequence[str]) -> str:
    """Numbers as the outcome scripts take them: one argument, joined by commas (ValueError
    unless every one is digits, at least one)."""
    joined = ",".join(numbers)
    digits = joined.replace(",", "")
    if not (digits.isdigit() and digits.isascii()) or joined.count(",") != len(numbers) - 1:
        raise ValueError("recipient numbers must be digits only")
    return joined


def _outcome(result: Any) -> IntakeOutcome:
    result_name, state = (
        value.decode() if isinstance(value, bytes) else str(value) for value in result
    )
    return IntakeOutcome(result=result_name, state=state)


def _outbox_fields(entry: OutboxEntry) -> dict[Any, Any]:
    return {
        "topic": entry.topic,
        "key": entry.key,
        "value": entry.value or b"",
        "event_id": entry.event_id,
        "tombstone": "1" if entry.value is None else "0",
    }


def _outbox_entry(entry_id: object, raw: Mapping[Any, Any]) -> OutboxEntry:
    values = {as_text(name): as_bytes(value) for name, value in raw.items()}
    tombstone = values.get("tombstone") == b"1"
    return OutboxEntry(
        topic=values["topic"].decode(),
        key=values["key"].decode(),
        value=None if tombstone else values["value"],
        event_id=values["event_id"].decode(),
        entry_id=as_text(entry_id),
    )


def as_bytes(value: object) -> bytes:
    """redis-py answers bytes or str depending on settings; the product reads bytes."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


def as_text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = [
    "ApplyResult",
    "CampaignSnapshot",
    "CampaignStore",
    "IntakeOutcome",
    "OutboxEntry",
    "ReceiptEntry",
    "Transition",
    "connect_redis",
    "redis_errors",
]
