"""A campaign's record: the one typed value of its Redis hash (DESIGN §4), part of the store.

Every field of the hash is declared here once, as an attribute of `CampaignSnapshot` whose name
is the field's name and whose kind says how it reads and how it is written. So:

- reading: `CampaignStore.load` gives a `CampaignSnapshot`; each field reads as its type
  (`snapshot.group_id` is an `int | None`, `snapshot.send_at` a `datetime | None`), parsed from
  the hash's text when asked, as before, so a field no one reads cannot fail a read;
- writing: `Transition.set(group_id=..., send_at=...)` takes `CampaignUpdate`, the writable
  fields with their types (mypy checks names and types), and encodes each value as its field
  does (times as epoch millis, flags as "1"/"0", id lists as JSON);
- the Lua scripts of the store name fields as `$name` (`lua_with_fields`): a name not declared
  here fails when the module loads.

Nothing outside the store layer spells a field's name as a string.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from string import Template
from typing import Any, Generic, TypedDict, TypeVar, overload

from consumer.clock import to_millis
from consumer.events import CampaignScheduled, RecipientCounts
from consumer.workflow import CampaignState

T = TypeVar("T")
W = TypeVar("W")

# The two fields the store reads itself at every load (they are not `CampaignField`s).
STATE = "state"
HEADER = "header"  # the CampaignScheduled event, Avro single-object encoded
# Every field's value as Redis takes it.
Encoded = str | int | float | bytes


class CampaignField(Generic[T, W]):
    """One field of the campaign hash: its name (the attribute's) and its kind.

    Reads as `T` (from the hash's text, or its absence); is written from a `W`.
    """

    name: str

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, record: None, owner: type) -> CampaignField[T, W]: ...

    @overload
    def __get__(self, record: CampaignSnapshot, owner: type) -> T: ...

    def __get__(self, record: CampaignSnapshot | None, owner: type) -> T | CampaignField[T, W]:
        if record is None:
            return self
        return self.read(record.fields.get(self.name))

    def read(self, raw: str | None) -> T:
        raise NotImplementedError

    def encode(self, value: W) -> Encoded:
        raise NotImplementedError


class _Text(CampaignField[str, str]):
    def read(self, raw: str | None) -> str:
        return raw or ""

    def encode(self, value: str) -> Encoded:
        return value


class _Count(CampaignField[int, int]):
    """An integer that is 0 until written."""

    def read(self, raw: str | None) -> int:
        return 0 if raw in (None, "") else int(raw)

    def encode(self, value: int) -> Encoded:
        return value


class _OptionalInt(CampaignField[int | None, int]):
    def read(self, raw: str | None) -> int | None:
        return None if raw in (None, "") else int(raw)

    def encode(self, value: int) -> Encoded:
        return value


class _OptionalFloat(CampaignField[float | None, float]):
    def read(self, raw: str | None) -> float | None:
        return None if raw in (None, "") else float(raw)

    def encode(self, value: float) -> Encoded:
        return value


class _Time(CampaignField[datetime | None, datetime]):
    """A moment, kept as epoch milliseconds."""

    def read(self, raw: str | None) -> datetime | None:
        return None if raw in (None, "") else datetime.fromtimestamp(int(raw) / 1000, UTC)

    def encode(self, value: datetime) -> Encoded:
        return to_millis(value)


class _Flag(CampaignField[bool, bool]):
    """A yes/no, kept as "1" / "0" (absent: no)."""

    def read(self, raw: str | None) -> bool:
        return raw == "1"

    def encode(self, value: bool) -> Encoded:
        return "1" if value else "0"


class _Ids(CampaignField[list[int], Sequence[int]]):
    """A list of TextLocal ids, kept as a JSON array (absent: empty)."""

    def read(self, raw: str | None) -> list[int]:
        return [int(value) for value in json.loads(raw or "[]")]

    def encode(self, value: Sequence[int]) -> Encoded:
        return json.dumps(list(value))


@dataclass(frozen=True)
class CampaignSnapshot:
    """A campaign's hash, read at one moment, with typed fields (see the module docstring)."""

    key: str
    state: CampaignState
    header: CampaignScheduled | None
    fields: Mapping[str, str]  # the hash's text, header excepted (for display and the parsing)

    # --- recorded by intake (the store's Lua scripts) ---
    batch_count = _OptionalInt()
    created_at = _Time()
    ready_at = _Time()
    updated_at = _Time()  # by every change
    requested = _Count()  # customer ids received
    with_promo = _Count()  # of which with a promo code of their own
    codes_overflow = _Flag()  # more distinct own codes than the store keeps
    cancel_requested = _Flag()
    cancel_reason = _Text()
    # --- the executor's steps ---
    failures = _Count()  # transient step failures in a row (the executor's back-off)
    plan_mode = _Text()  # "" (not planned yet), "single" or "multi"
    planned_message = _Text()  # a single-text campaign's rendered text
    group_name = _Text()
    group_id = _OptionalInt()
    index_version = _Text()  # the contact-index version the campaign resolves against
    chunks = _Count()
    matched = _Count()
    unmatched = _Count()
    invalid_numbers = _Count()
    duplicates = _Count()
    skipped = _Count()
    language_fallbacks = _Count()
    message = _Text()
    message_parts = _OptionalInt()
    unicode = _Flag()
    estimated_cost = _OptionalInt()  # credits the send needs
    send_attempted_at = _Time()
    send_attempts = _Count()
    send_at = _Time()
    scheduled = _Flag()  # scheduled at TextLocal rather than sent at once
    batch_id = _OptionalInt()  # the send's (the first sub-send's)
    batch_ids = _Ids()  # every sub-send's
    group_ids = _Ids()  # every sub-send's segment group
    cost = _OptionalFloat()
    num_messages = _OptionalInt()
    sent_at = _Time()
    window_ends_at = _Time()
    # --- the poller ---
    polls_done = _Count()
    last_polled_at = _Time()
    poll_error = _Text()
    poll_failures = _Count()
    segment_cleanup = _Flag()  # DONE, its segment groups still to delete
    segment_error = _Text()
    # --- endings ---
    error_code = _Text()
    error_message = _Text()
    ended_at = _Time()

    def counts(self) -> RecipientCounts:
        """The recipient counts as recorded (zeros before the contacts are loaded)."""
        return RecipientCounts(
            requested=self.requested,
            matched=self.matched,
            unmatched=self.unmatched,
            invalid_numbers=self.invalid_numbers,
            duplicates=self.duplicates,
            skipped=self.skipped,
        )


class CampaignUpdate(TypedDict, total=False):
    """The fields `Transition.set` writes, with the types it takes (state: `set_state`; the
    intake fields, `updated_at` and `failures`: the store's own scripts and methods)."""

    cancel_requested: bool
    cancel_reason: str
    plan_mode: str
    planned_message: str
    group_name: str
    group_id: int
    index_version: str
    chunks: int
    requested: int
    matched: int
    unmatched: int
    invalid_numbers: int
    duplicates: int
    skipped: int
    language_fallbacks: int
    message: str
    message_parts: int
    unicode: bool
    estimated_cost: int
    send_attempted_at: datetime
    send_attempts: int
    send_at: datetime
    scheduled: bool
    batch_id: int | None
    batch_ids: Sequence[int]
    group_ids: Sequence[int]
    cost: float | None
    num_messages: int | None
    sent_at: datetime
    window_ends_at: datetime
    polls_done: int
    last_polled_at: datetime
    poll_error: str
    poll_failures: int
    segment_cleanup: bool
    segment_error: str | None
    error_code: str
    error_message: str
    ended_at: datetime


# name → field, for encoding and for the Lua scripts.
FIELDS: dict[str, CampaignField[Any, Any]] = {
    name: value
    for name, value in vars(CampaignSnapshot).items()
    if isinstance(value, CampaignField)
}
FIELD_NAMES = frozenset({STATE, HEADER, *FIELDS})
_WRITABLE = CampaignUpdate.__optional_keys__
if not FIELDS.keys() >= _WRITABLE:  # pragma: no cover - caught by any import
    raise TypeError(f"CampaignUpdate names unknown fields: {sorted(_WRITABLE - FIELDS.keys())}")


def encode_update(values: Mapping[str, Any]) -> list[Encoded]:
    """`[name, encoded value, ...]` of an update (None values are not written)."""
    flat: list[Encoded] = []
    for name, value in values.items():
        if value is None:
            continue
        if name not in _WRITABLE:
            raise KeyError(f"{name!r} is not a writable campaign field")
        flat += [name, FIELDS[name].encode(value)]
    return flat


def counts_update(counts: RecipientCounts) -> CampaignUpdate:
    """The recipient counts as an update."""
    return CampaignUpdate(
        requested=counts.requested,
        matched=counts.matched,
        unmatched=counts.unmatched,
        invalid_numbers=counts.invalid_numbers,
        duplicates=counts.duplicates,
        skipped=counts.skipped,
    )


def parse_campaign(
    key: str, fields: Mapping[str, str], header: CampaignScheduled | None
) -> CampaignSnapshot | None:
    """The record of a hash's text (its header decoded by the caller); None without a state."""
    if STATE not in fields:
        return None
    return CampaignSnapshot(
        key=key, state=CampaignState(fields[STATE]), header=header, fields=fields
    )


def lua_with_fields(script: str) -> str:
    """A Lua script with its `$name` placeholders replaced by field names (KeyError: a name
    that is not a field of the record)."""
    return Template(script).substitute({name: name for name in FIELD_NAMES})


__all__ = [
    "FIELDS",
    "FIELD_NAMES",
    "HEADER",
    "STATE",
    "CampaignField",
    "CampaignSnapshot",
    "CampaignUpdate",
    "counts_update",
    "encode_update",
    "lua_with_fields",
    "parse_campaign",
]
