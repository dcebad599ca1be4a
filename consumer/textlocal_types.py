"""TextLocal's replies as typed values, and the parsing that tolerates the real replies' quirks.

Real replies are loosely typed: ids come as numbers or strings, `balance` and `cost` as ints
(floats since the Webex Interact migration), `get_scheduled` sends everything as strings.
The parsers accept each of those spellings and raise `MalformedReply` (naming the field, never
echoing a value, which may be a phone number or a message body) for anything else.

Personal data (numbers, names) and message bodies are left out of the values' repr, so a
logged result never carries them.

`send` and `status_batch` replies list every recipient in a top-level `messages` array, about
40 MB for a million recipients. `TopLevelArraySkipper` drops that array from the byte stream
before JSON decoding, so those replies are parsed in memory proportional to the rest of the reply.
It can also capture one such array instead: its elements (flat objects, as TextLocal's
`messages[{recipient, status}]` are) are decoded as each chunk completes them and handed out
with `take_items()` (`MessageStatuses`, `parse_message_statuses`). `MessageStatusBuffer` holds a
whole reply's runs compactly (about 14 bytes a message, a third of the reply's JSON), so the
client reads the reply to its end before anyone works through the statuses.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

JsonObject = Mapping[str, object]


class MalformedReply(ValueError):
    """A reply that is not the JSON TextLocal documents; the text names the field, not its value."""


# --- values the client returns -------------------------------------------------------------


@dataclass(frozen=True)
class SendResult:
    """What TextLocal accepted: counts and cost, never the per-recipient list."""

    batch_id: int | None  # None only for a test send, which TextLocal does not store
    cost: float
    num_messages: int
    num_parts: int
    sender: str
    content: str = field(repr=False)
    test_mode: bool
    balance: float


@dataclass(frozen=True)
class Template:
    id: int
    title: str
    body: str
    sender_name: str | None


@dataclass(frozen=True)
class Group:
    id: int
    name: str
    size: int


@dataclass(frozen=True)
class Contact:
    number: str = field(repr=False)
    first_name: str = field(repr=False)
    last_name: str = field(repr=False)
    custom1: str
    custom2: str
    custom3: str


@dataclass(frozen=True)
class NewContact:
    """A contact to add with `create_contacts_bulk`; `number` is international digits."""

    number: str = field(repr=False)
    first_name: str = field(default="", repr=False)
    last_name: str = field(default="", repr=False)
    custom1: str = ""
    custom2: str = ""
    custom3: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "number": self.number,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "custom1": self.custom1,
            "custom2": self.custom2,
            "custom3": self.custom3,
        }


@dataclass(frozen=True)
class ContactsPage:
    """One page of `get_contacts`: `num_contacts` is TextLocal's count as it reports it."""

    group_id: int
    start: int
    limit: int
    num_contacts: int
    contacts: tuple[Contact, ...]


@dataclass(frozen=True)
class BatchStatus:
    """Delivery counts of one batch; `pending` is the remainder when TextLocal does not say."""

    batch_id: int
    num_messages: int
    delivered: int
    undelivered: int
    pending: int
    invalid: int
    expired: int
    unknown: int


@dataclass(frozen=True)
class MessageStatuses:
    """A run of a batch's per-message statuses, in reply order: numbers (international digits,
    as TextLocal reports them) and status letters (D, U, P, I, E, ?). Never in a repr."""

    numbers: tuple[str, ...] = field(repr=False)
    statuses: tuple[str, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.numbers)


class MessageStatusBuffer:
    """A reply's `MessageStatuses` runs, kept in order and compactly until they are drained.

    A run is held as two strings, its numbers joined by commas and its letters concatenated
    (about 14 bytes a message instead of some 80 for tuples of strings), unless a number holds
    a comma or a status is not one letter: that run is kept as it came. Never in a repr.
    """

    def __init__(self) -> None:
        self._runs: deque[tuple[str | tuple[str, ...], str | tuple[str, ...]]] = deque()
        self._messages = 0

    def __len__(self) -> int:
        """How many messages are held."""
        return self._messages

    def __repr__(self) -> str:
        return f"MessageStatusBuffer(messages={self._messages})"

    def add(self, run: MessageStatuses) -> None:
        if not run:
            return
        numbers: str | tuple[str, ...] = ",".join(run.numbers)
        if numbers.count(",") != len(run) - 1:
            numbers = run.numbers
        letters: str | tuple[str, ...] = "".join(run.statuses)
        if len(letters) != len(run):
            letters = run.statuses
        self._runs.append((numbers, letters))
        self._messages += len(run)

    def clear(self) -> None:
        self._runs.clear()
        self._messages = 0

    def drain(self) -> Iterator[MessageStatuses]:
        """The runs in the order added, each let go of as it is handed out."""
        while self._runs:
            numbers, letters = self._runs.popleft()
            run = MessageStatuses(
                numbers if isinstance(numbers, tuple) else tuple(numbers.split(",")),
                tuple(letters),
            )
            self._messages -= len(run)
            yield run


@dataclass(frozen=True)
class ScheduledSend:
    id: int
    scheduled_for: datetime  # aware UTC
    group_id: int | None  # None when the send went to a list of numbers
    group_name: str
    how_many: int
    message: str = field(repr=False)
    origin: str


@dataclass(frozen=True)
class HistoryEntry:
    batch_id: int
    group_id: int | None
    group_name: str
    message: str = field(repr=False)
    sent_at: datetime  # aware UTC
    num_credits: float


@dataclass(frozen=True)
class HistoryPage:
    start: int
    limit: int
    total: int
    entries: tuple[HistoryEntry, ...]


@dataclass(frozen=True)
class ApiHistoryPage:
    """A page of `get_history_api`: (number, text) per message (numbers as digits)."""

    total: int
    entries: tuple[tuple[str, str], ...] = field(repr=False)


@dataclass(frozen=True)
class OptOut:
    """One number on the account's opt-out list (a contact who texted STOP).

    `optout_id` is TextLocal's id of the opt-out when its reply has one (the reply's shape is not
    published; the sandbox gives one), else None. The number never shows in a repr.
    """

    number: str = field(repr=False)  # as TextLocal gives it, digits
    opted_out_at: datetime  # aware UTC, whole seconds
    optout_id: int | None = None


@dataclass(frozen=True)
class Balance:
    sms: float
    mms: float


@dataclass(frozen=True)
class SenderNames:
    default: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class BulkResult:
    """What `bulk_json` accepted. TextLocal does not publish this reply; fields are optional."""

    num_messages: int
    batch_ids: tuple[int, ...]
    cost: float | None
    balance: float | None


# --- field readers: tolerant of the spellings TextLocal really uses ---------------------------


def _field(reply: JsonObject, key: str, where: str) -> object:
    if key not in reply:
        raise MalformedReply(f"{where}: field {key!r} is missing")
    return reply[key]


def as_int(value: object, where: str) -> int:
    """An int given as int, integral float or digit string (TextLocal uses all three)."""
    if isinstance(value, bool):
        raise MalformedReply(f"{where}: expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise MalformedReply(f"{where}: expected an integer, got {type(value).__name__}")


def as_float(value: object, where: str) -> float:
    """A number given as int, float or numeric string (credits became floats after migration)."""
    if isinstance(value, bool):
        raise MalformedReply(f"{where}: expected a number, got a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise MalformedReply(f"{where}: expected a number, got {type(value).__name__}")


def as_str(value: object, where: str) -> str:
    """Text; numbers are accepted and spelled as TextLocal would (phone numbers come as ints)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None:
        return ""
    raise MalformedReply(f"{where}: expected text, got {type(value).__name__}")


def as_bool(value: object) -> bool:
    """TextLocal's booleans: true/1/"true"/"1" are on; everything else is off."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return value is True or value == 1


def as_object(value: object, where: str) -> JsonObject:
    if not isinstance(value, dict):
        raise MalformedReply(f"{where}: expected an object, got {type(value).__name__}")
    return value


def as_list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise MalformedReply(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _optional_int(reply: JsonObject, key: str, where: str) -> int | None:
    value = reply.get(key)
    if value is None or value == "":
        return None
    return as_int(value, f"{where}.{key}")


_DATETIME_FORMATS = ("%Y-%m-%d-%H-%M-%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S")


def as_utc_datetime(value: object, where: str) -> datetime:
    """TextLocal's times: "Y-m-d-H-i-s", "Y-m-d H:i:s" or Unix seconds, read as UTC.

    TextLocal does not publish the zone of these strings; its Unix times are GMT, and the
    sandbox writes them in UTC, so UTC is assumed.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return datetime.fromtimestamp(int(text), UTC)
        for pattern in _DATETIME_FORMATS:
            try:
                return datetime.strptime(text, pattern).replace(tzinfo=UTC)
            except ValueError:
                continue
    raise MalformedReply(f"{where}: expected a date and time")


# --- reply parsers ---------------------------------------------------------------------------


def parse_send(reply: JsonObject) -> SendResult:
    test_mode = as_bool(reply.get("test_mode", False))
    batch_id = _optional_int(reply, "batch_id", "send")
    if batch_id is None and not test_mode:
        raise MalformedReply("send: field 'batch_id' is missing")
    message = as_object(reply.get("message", {}), "send.message")
    return SendResult(
        batch_id=batch_id,
        cost=as_float(reply.get("cost", 0), "send.cost"),
        num_messages=as_int(_field(reply, "num_messages", "send"), "send.num_messages"),
        num_parts=as_int(message.get("num_parts", 1), "send.message.num_parts"),
        sender=as_str(message.get("sender", ""), "send.message.sender"),
        content=as_str(message.get("content", ""), "send.message.content"),
        test_mode=test_mode,
        balance=as_float(reply.get("balance", 0), "send.balance"),
    )


def parse_templates(reply: JsonObject) -> list[Template]:
    templates: list[Template] = []
    for item in as_list(reply.get("templates", []), "get_templates.templates"):
        entry = as_object(item, "get_templates.templates[]")
        sender = entry.get("senderName")
        templates.append(
            Template(
                id=as_int(_field(entry, "id", "template"), "template.id"),
                title=as_str(entry.get("title", ""), "template.title"),
                body=as_str(_field(entry, "body", "template"), "template.body"),
                sender_name=as_str(sender, "template.senderName") or None,
            )
        )
    return templates


def parse_group(entry: JsonObject) -> Group:
    return Group(
        id=as_int(_field(entry, "id", "group"), "group.id"),
        name=as_str(_field(entry, "name", "group"), "group.name"),
        size=as_int(entry.get("size", 0), "group.size"),
    )


def parse_groups(reply: JsonObject) -> list[Group]:
    return [
        parse_group(as_object(item, "get_groups.groups[]"))
        for item in as_list(reply.get("groups", []), "get_groups.groups")
    ]


def parse_created_group(reply: JsonObject) -> Group:
    return parse_group(as_object(_field(reply, "group", "create_group"), "create_group.group"))


def parse_contact(entry: JsonObject) -> Contact:
    return Contact(
        number=as_str(_field(entry, "number", "contact"), "contact.number"),
        first_name=as_str(entry.get("first_name", ""), "contact.first_name"),
        last_name=as_str(entry.get("last_name", ""), "contact.last_name"),
        custom1=as_str(entry.get("custom1", ""), "contact.custom1"),
        custom2=as_str(entry.get("custom2", ""), "contact.custom2"),
        custom3=as_str(entry.get("custom3", ""), "contact.custom3"),
    )


def parse_contacts_page(
    reply: JsonObject, *, group_id: int, start: int, limit: int
) -> ContactsPage:
    contacts = tuple(
        parse_contact(as_object(item, "get_contacts.contacts[]"))
        for item in as_list(reply.get("contacts", []), "get_contacts.contacts")
    )
    return ContactsPage(
        group_id=as_int(reply.get("group_id", group_id), "get_contacts.group_id"),
        start=as_int(reply.get("start", start), "get_contacts.start"),
        limit=as_int(reply.get("limit", limit), "get_contacts.limit"),
        num_contacts=as_int(reply.get("num_contacts", len(contacts)), "get_contacts.num_contacts"),
        contacts=contacts,
    )


def parse_contacts_added(reply: JsonObject) -> int:
    return as_int(_field(reply, "num_contacts", "create_contacts_bulk"), "num_contacts")


def parse_batch_status(reply: JsonObject) -> BatchStatus:
    def count(key: str) -> int:
        return as_int(reply.get(key, 0), f"status_batch.{key}")

    num_messages = as_int(_field(reply, "num_messages", "status_batch"), "num_messages")
    delivered = count("num_delivered")
    undelivered = count("num_undelivered")
    invalid = count("num_invalid")
    expired = count("num_expired")
    unknown = count("num_unknown")
    if reply.get("num_pending") is not None:
        pending = count("num_pending")
    else:
        # The published reply has no pending count: what is not final yet is still pending.
        pending = max(0, num_messages - delivered - undelivered - invalid - expired - unknown)
    return BatchStatus(
        batch_id=as_int(_field(reply, "batch_id", "status_batch"), "status_batch.batch_id"),
        num_messages=num_messages,
        delivered=delivered,
        undelivered=undelivered,
        pending=pending,
        invalid=invalid,
        expired=expired,
        unknown=unknown,
    )


def parse_message_statuses(items: Sequence[object]) -> MessageStatuses:
    """`status_batch`'s `messages[{recipient, status}]` elements (recipient an int or digits)."""
    try:  # the common shape, in bulk: objects with an int recipient and a text status
        recipients = [item["recipient"] for item in items]  # type: ignore[index]
        letters = [item["status"] for item in items]  # type: ignore[index]
    except (KeyError, TypeError):
        pass
    else:
        if all(type(r) is int for r in recipients) and all(type(s) is str for s in letters):
            return MessageStatuses(tuple(map(str, recipients)), tuple(letters))
    numbers: list[str] = []
    statuses: list[str] = []
    for item in items:
        if not isinstance(item, dict):
            raise MalformedReply("status_batch.messages[]: expected an object")
        recipient, status = item.get("recipient"), item.get("status")
        if isinstance(recipient, int) and not isinstance(recipient, bool):
            numbers.append(str(recipient))
        elif isinstance(recipient, str):
            numbers.append(recipient.strip().removeprefix("+"))
        else:
            raise MalformedReply("status_batch.messages[].recipient: expected a number")
        if not isinstance(status, str):
            raise MalformedReply("status_batch.messages[].status: expected text")
        statuses.append(status)
    return MessageStatuses(tuple(numbers), tuple(statuses))


def parse_scheduled(reply: JsonObject) -> list[ScheduledSend]:
    sends: list[ScheduledSend] = []
    for item in as_list(reply.get("scheduled", []), "get_scheduled.scheduled"):
        entry = as_object(item, "get_scheduled.scheduled[]")
        sends.append(
            ScheduledSend(
                id=as_int(_field(entry, "id", "scheduled"), "scheduled.id"),
                scheduled_for=as_utc_datetime(
                    _field(entry, "scheduledFor", "scheduled"), "scheduled.scheduledFor"
                ),
                # Group ids start at 1: a send to numbers shows "" or "0" here.
                group_id=_optional_int(entry, "groupid", "scheduled") or None,
                group_name=as_str(entry.get("groupName", ""), "scheduled.groupName"),
                how_many=as_int(entry.get("howmany", 0), "scheduled.howmany"),
                message=as_str(entry.get("message", ""), "scheduled.message"),
                origin=as_str(entry.get("origin", ""), "scheduled.origin"),
            )
        )
    return sends


def parse_history_page(reply: JsonObject, *, start: int, limit: int) -> HistoryPage:
    entries: list[HistoryEntry] = []
    for item in as_list(reply.get("messages", []), "get_history_group.messages"):
        entry = as_object(item, "get_history_group.messages[]")
        entries.append(
            HistoryEntry(
                batch_id=as_int(_field(entry, "batch_id", "history"), "history.batch_id"),
                group_id=_optional_int(entry, "group_id", "history"),
                group_name=as_str(entry.get("group_name", ""), "history.group_name"),
                message=as_str(entry.get("message", ""), "history.message"),
                sent_at=as_utc_datetime(_field(entry, "datetime", "history"), "history.datetime"),
                num_credits=as_float(entry.get("num_credits", 0), "history.num_credits"),
            )
        )
    return HistoryPage(
        start=as_int(reply.get("start", start), "get_history_group.start"),
        limit=as_int(reply.get("limit", limit), "get_history_group.limit"),
        total=as_int(reply.get("total", len(entries)), "get_history_group.total"),
        entries=tuple(entries),
    )


def parse_optouts(reply: JsonObject) -> list[OptOut]:
    """`get_optouts`: `optouts[{id?, number, datetime}]` (the shape the sandbox assumes: TextLocal
    does not publish it). A missing list is no opt-outs; an entry without a number or a time is
    malformed."""
    optouts: list[OptOut] = []
    for item in as_list(reply.get("optouts", []), "get_optouts.optouts"):
        entry = as_object(item, "get_optouts.optouts[]")
        number = as_str(_field(entry, "number", "get_optouts.optouts[]"), "optouts.number")
        optouts.append(
            OptOut(
                number=number.strip(),
                opted_out_at=as_utc_datetime(
                    _field(entry, "datetime", "get_optouts.optouts[]"), "optouts.datetime"
                ),
                optout_id=_optional_int(entry, "id", "get_optouts.optouts[]"),
            )
        )
    return optouts


def parse_balance(reply: JsonObject) -> Balance:
    balance = as_object(_field(reply, "balance", "balance"), "balance.balance")
    return Balance(
        sms=as_float(_field(balance, "sms", "balance"), "balance.sms"),
        mms=as_float(balance.get("mms", 0), "balance.mms"),
    )


def parse_sender_names(reply: JsonObject) -> SenderNames:
    names = as_list(reply.get("sender_names", []), "get_sender_names.sender_names")
    return SenderNames(
        default=as_str(reply.get("default_sender_name", ""), "default_sender_name"),
        names=tuple(as_str(name, "get_sender_names.sender_names[]") for name in names),
    )


def parse_bulk(reply: JsonObject) -> BulkResult:
    messages = reply.get("messages")
    listed = as_list(messages, "bulk_json.messages") if messages is not None else []
    batch_ids: list[int] = []
    for item in listed:
        if isinstance(item, dict) and item.get("batch_id") not in (None, ""):
            batch_id = as_int(item["batch_id"], "bulk_json.messages[].batch_id")
            if batch_id not in batch_ids:
                batch_ids.append(batch_id)
    if "batch_id" in reply:
        batch_id = as_int(reply["batch_id"], "bulk_json.batch_id")
        if batch_id not in batch_ids:
            batch_ids.append(batch_id)
    cost = reply.get("cost")
    balance = reply.get("balance_post_send", reply.get("balance"))
    return BulkResult(
        num_messages=as_int(reply.get("num_messages", len(listed)), "bulk_json.num_messages"),
        batch_ids=tuple(batch_ids),
        cost=None if cost is None else as_float(cost, "bulk_json.cost"),
        balance=None if balance is None else as_float(balance, "bulk_json.balance"),
    )


def failure_of(reply: JsonObject) -> tuple[int, str] | None:
    """(code, message) of the first error in a `status: failure` reply; None on success."""
    status = reply.get("status")
    if status == "success":
        return None
    if status != "failure":
        raise MalformedReply("reply: field 'status' is neither 'success' nor 'failure'")
    errors = as_list(reply.get("errors", []), "reply.errors")
    if not errors:
        raise MalformedReply("reply: 'failure' without errors")
    first = as_object(errors[0], "reply.errors[]")
    return (
        as_int(_field(first, "code", "reply.errors[]"), "reply.errors[].code"),
        # TextLocal's texts are short fixed phrases; the bound keeps a surprise out of logs.
        as_str(first.get("message", ""), "reply.errors[].message")[:200],
    )


def decode_reply(body: bytes) -> JsonObject:
    try:
        reply = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedReply("reply: not JSON") from exc
    return as_object(reply, "reply")


# --- skipping the per-recipient array without decoding it ------------------------------------

# Outside strings only four bytes matter for finding where an array ends: the quote that opens
# a string and the brackets. Runs of anything else, and whole strings, go by in one C-level
# match; a string cut by a chunk boundary is left for the byte-wise fallback.
_SKIPPABLE_RUN = re.compile(rb'(?:[^"\[\]]++|"(?:[^"\\]++|\\.)*+")*+', re.DOTALL)
# Inside the kept part, braces matter too (to know the nesting depth).
_PLAIN_RUN = re.compile(rb'[^"\[\]{}]*+')
_STRING_CONTENT = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
# A captured array's complete elements: flat objects (no brackets or braces outside strings);
# the first after optional whitespace, each further one after a comma.
_FLAT_OBJECT = rb'\{(?:[^{}\[\]"]++|"(?:[^"\\]++|\\.)*+")*+\}'
_FIRST_ELEMENT = re.compile(rb"\s*+" + _FLAT_OBJECT, re.DOTALL)
_MORE_ELEMENTS = re.compile(rb"(?:\s*+,\s*+" + _FLAT_OBJECT + rb")*+", re.DOTALL)
_WHITESPACE = re.compile(rb"\s*+")
# An element of a captured array cut by chunk boundaries is buffered up to this size.
_MAX_ELEMENT_BYTES = 64 * 1024
_OPENERS, _CLOSERS = frozenset(b"[{"), frozenset(b"]}")


class TopLevelArraySkipper:
    """Copies a JSON object's bytes, replacing the value of chosen top-level array keys by [].

    Fed chunk by chunk (`feed`), it keeps only the bytes outside the skipped arrays, so memory
    is the size of the rest of the reply whatever the array's length. `result()` decodes what
    was kept. The scan tracks strings and escapes, so brackets inside strings do not confuse it,
    and keys are matched only at the top level (depth 1), so a nested "messages" is kept.
    `max_kept_bytes` bounds what a hostile or broken reply can make us hold.

    With `capture`, that key's top-level array is not dropped but read: its elements, which must
    be flat JSON objects, are decoded as soon as the bytes fed complete them (one `json.loads`
    per chunk) and collected for `take_items()`; `result()` shows the array as [].
    """

    def __init__(
        self,
        keys: frozenset[str],
        *,
        max_kept_bytes: int = 16 * 1024 * 1024,
        capture: str | None = None,
    ) -> None:
        self._key_pattern = re.compile(
            rb'"(?:' + b"|".join(re.escape(key.encode()) for key in sorted(keys)) + rb')"\s*:\s*\Z'
        )
        self._capture_pattern = (
            None
            if capture is None
            else re.compile(rb'"' + re.escape(capture.encode()) + rb'"\s*:\s*\Z')
        )
        self._capturing = False
        self._captured_any = False
        self._partial = b""  # a captured element not complete yet
        self._items: list[object] = []
        self._max_kept_bytes = max_kept_bytes
        self._kept = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape_pending = False
        self._skip_depth = 0  # bracket depth inside a skipped array; 0 = not skipping
        self._last_key_start = -1  # where the latest depth-1 string starts in `_kept`

    def feed(self, chunk: bytes) -> None:
        if self._capturing:
            rest = self._capture(chunk)
            if rest is None:
                return
            chunk = rest
        pos, end = 0, len(chunk)
        copy_from = 0  # start of the bytes of this chunk not yet copied (when not skipping)
        if self._escape_pending and end:
            self._escape_pending = False
            pos = 1
        while pos < end:
            if self._in_string:
                pos = _match_end(_STRING_CONTENT, chunk, pos)
                if pos == end:
                    break
                if chunk[pos] == _BACKSLASH:  # a lone backslash ends the chunk
                    self._escape_pending = True
                    pos = end
                    break
                self._in_string = False
                pos += 1
                continue
            if self._skip_depth:
                pos = _match_end(_SKIPPABLE_RUN, chunk, pos)
                if pos == end:
                    break
                byte = chunk[pos]
                if byte == _QUOTE:  # a string the chunk cuts short
                    self._in_string = True
                elif byte == ord("["):
                    self._skip_depth += 1
                else:  # "]"
                    self._skip_depth -= 1
                    if not self._skip_depth:
                        copy_from = pos + 1
                pos += 1
                continue
            pos = _match_end(_PLAIN_RUN, chunk, pos)
            if pos == end:
                break
            byte = chunk[pos]
            if byte == _QUOTE:
                self._in_string = True
                if self._depth == 1:
                    self._last_key_start = len(self._kept) + pos - copy_from
            elif byte in _OPENERS:
                if byte == ord("[") and self._depth == 1:
                    self._keep(chunk[copy_from:pos])
                    copy_from = pos
                    if self._is_key(self._capture_pattern):
                        self._kept += b"[]"
                        self._capturing = True
                        self.feed(chunk[pos + 1 :])
                        return
                    if self._is_skipped_key():
                        self._kept += b"[]"
                        self._skip_depth = 1
                        pos += 1
                        copy_from = pos  # nothing of the skipped array is copied
                        continue
                self._depth += 1
            elif byte in _CLOSERS:
                self._depth -= 1
            pos += 1
        if not self._skip_depth:
            self._keep(chunk[copy_from:])

    def _is_skipped_key(self) -> bool:
        """Whether what was kept ends with one of the keys and its colon."""
        return self._is_key(self._key_pattern)

    def _is_key(self, pattern: re.Pattern[bytes] | None) -> bool:
        if pattern is None or self._last_key_start < 0:
            return False
        return pattern.match(self._kept, self._last_key_start) is not None

    def _capture(self, data: bytes) -> bytes | None:
        """Decode the captured array's elements completed by `data`; the bytes after the
        array's end, or None while it goes on."""
        buffered = self._partial + data if self._partial else data
        start = 0
        first = None if self._captured_any else _FIRST_ELEMENT.match(buffered)
        if first is not None:
            start = first.end()
        end = _match_end(_MORE_ELEMENTS, buffered, start)
        if end:
            # What was matched is elements separated by commas, with one leading comma when
            # an earlier run had the first element.
            run = buffered[:end] if first is not None else buffered[:end].lstrip()[1:]
            try:
                decoded = json.loads(b"[" + run + b"]")
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise MalformedReply("reply: malformed per-message list") from exc
            self._items.extend(decoded)
            self._captured_any = True
        after = _match_end(_WHITESPACE, buffered, end)
        following = buffered[after : after + 1]
        if following == b"]":
            self._capturing = False
            self._partial = b""
            return buffered[after + 1 :]
        if following and following != (b"," if self._captured_any else b"{"):
            raise MalformedReply("reply: per-message list not as documented")
        self._partial = buffered[end:]
        if len(self._partial) > _MAX_ELEMENT_BYTES:
            raise MalformedReply("reply: per-message list not as documented")
        return None

    def take_items(self) -> list[object]:
        """The captured array's elements decoded since the last call."""
        items, self._items = self._items, []
        return items

    def _keep(self, data: bytes) -> None:
        self._kept += data
        if len(self._kept) > self._max_kept_bytes:
            raise MalformedReply("reply: larger than the client accepts")

    def result(self) -> JsonObject:
        if self._skip_depth or self._in_string or self._capturing:
            raise MalformedReply("reply: truncated JSON")
        return decode_reply(bytes(self._kept))


def _match_end(pattern: re.Pattern[bytes], data: bytes, pos: int) -> int:
    match = pattern.match(data, pos)
    # Every pattern here can match the empty string, so a match always exists.
    assert match is not None
    return match.end()


def skip_top_level_arrays(body: bytes | Sequence[bytes], keys: frozenset[str]) -> JsonObject:
    """Decode a whole reply (or its chunks) without the named top-level arrays."""
    skipper = TopLevelArraySkipper(keys)
    for chunk in [body] if isinstance(body, bytes) else body:
        skipper.feed(chunk)
    return skipper.result()


def parse_api_history(reply: JsonObject) -> ApiHistoryPage:
    """`get_history_api`: messages[{number, content}] (the message text, also as `message`)."""
    listed = as_list(reply.get("messages") or [], "get_history_api.messages")
    entries = []
    for item in listed:
        if not isinstance(item, dict):
            continue
        number = str(item.get("number", "")).strip()
        text = item.get("content", item.get("message"))
        if number and isinstance(text, str):
            entries.append((number, text))
    total = reply.get("total")
    return ApiHistoryPage(
        total=as_int(total, "get_history_api.total") if total is not None else len(entries),
        entries=tuple(entries),
    )
