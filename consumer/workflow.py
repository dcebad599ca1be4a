"""A campaign's rules, as pure functions: values in, decisions out. No I/O, no clock reads.

States (DESIGN §4):

    COLLECTING → READY → SEGMENT_CREATED → CONTACTS_LOADED → SEND_PENDING → SENT → POLLING → DONE
    plus the ends CANCELLED, FAILED, REJECTED.

Intake validates events here; the executor asks here what a campaign's next step is, how its
message reads, how many parts it costs and how to name its segment; the poller asks when polls
fall due.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import NamedTuple

from consumer.events import CampaignRecipients, CampaignRef, CampaignScheduled, StatusError

MAX_CUSTOMERS_PER_BATCH = 10_000
MAX_CONTACTS_PER_BULK_CALL = 1_500
# TextLocal truncates longer messages; we refuse instead of sending a cut-off text.
MAX_MESSAGE_CHARS = 765
MAX_MESSAGE_PARTS = 5
MAX_VALIDITY_HOURS = 72
MAX_METRICS_WINDOW_DAYS = 31
PROMO_CODE_PLACEHOLDER = "[%PROMO_CODE%]"
# TextLocal refuses a schedule_time further ahead than this (error 191; the sandbox's assumption,
# TextLocal publishes no figure): a campaign that far out is refused at intake, not after its
# segment was built.
MAX_SCHEDULE_AHEAD = timedelta(days=365)
# The largest campaign intake takes: far above any real one, and low enough that counts, costs
# and the collect deadline stay meaningful.
MAX_RECIPIENTS_PER_CAMPAIGN = 100_000_000
# Identities and short fields echoed into keys, names and every output record.
MAX_ID_CHARS = 128
MAX_TEMPLATE_NAME_CHARS = 200
MAX_PROMO_CODE_CHARS = 64
MAX_PROMO_CODES = 1_000
# How much of an input value an error message quotes.
QUOTE_CHARS = 60


class CampaignState(StrEnum):
    COLLECTING = "COLLECTING"
    READY = "READY"
    SEGMENT_CREATED = "SEGMENT_CREATED"
    CONTACTS_LOADED = "CONTACTS_LOADED"
    SEND_PENDING = "SEND_PENDING"
    SENT = "SENT"
    POLLING = "POLLING"
    DONE = "DONE"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES

    @property
    def before_send(self) -> bool:
        """No send can have been requested yet: cancelling needs no word with TextLocal's sends."""
        return self in BEFORE_SEND_STATES


FINAL_STATES = frozenset(
    {CampaignState.DONE, CampaignState.CANCELLED, CampaignState.FAILED, CampaignState.REJECTED}
)
BEFORE_SEND_STATES = frozenset(
    {
        CampaignState.COLLECTING,
        CampaignState.READY,
        CampaignState.SEGMENT_CREATED,
        CampaignState.CONTACTS_LOADED,
    }
)


@dataclass(frozen=True)
class ContactGroup:
    """A TextLocal master contact group and the templates (by name prefix) that target it."""

    group_id: int
    name: str
    template_prefix: str
    customer_id_field: str  # "custom1", "custom2" or "custom3"
    sender: str | None = None
    # The custom field holding a contact's language (for template variants), if any.
    language_field: str | None = None
    default_language: str = ""


@dataclass(frozen=True)
class IntakeLimits:
    """Bounds intake applies to an incoming campaign."""

    # A send time this far in the past is refused; closer, the campaign is sent at once.
    max_send_delay: timedelta = timedelta(hours=1)
    default_window_days: float = 7.0
    # Metadata is echoed on every output event: bounded so no output record can outgrow Kafka's.
    max_metadata_bytes: int = 16_384


def quote(value: str) -> str:
    """A value for an error message: repr'd, and cut short (inputs can be megabytes long)."""
    if len(value) <= QUOTE_CHARS:
        return repr(value)
    return f"{value[:QUOTE_CHARS]!r}… ({len(value)} characters)"


def metadata_bytes(metadata: Mapping[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())


def identity_problem(event_id: str, campaign_id: str) -> str | None:
    """Why an event's identity cannot be used at all (it would go into every key and record).

    Such an event cannot even be answered with a REJECTED status: it is dead-lettered.
    """
    for name, value in (("event_id", event_id), ("campaign_id", campaign_id)):
        if len(value) > MAX_ID_CHARS:
            return f"{name} has {len(value)} characters; at most {MAX_ID_CHARS} are allowed"
        odd = _CONTROL_CHARACTER.search(value)
        if odd is not None:
            return f"{name} has control character U+{ord(odd.group()):04X}"
    return None


# --- intake validation ----------------------------------------------------------------------


def contact_group_for(template_name: str, groups: Sequence[ContactGroup]) -> ContactGroup | None:
    """The group whose prefix starts the name (longest prefix wins; an empty one matches all)."""
    matches = [g for g in groups if template_name.startswith(g.template_prefix)]
    return max(matches, key=lambda g: len(g.template_prefix), default=None)


def validate_scheduled(
    event: CampaignScheduled, groups: Sequence[ContactGroup], now: datetime, limits: IntakeLimits
) -> StatusError | None:
    """Why a campaign header cannot be accepted, or None when it can.

    Every value the daemon later computes with is bounded here, so no step can fail on it.
    """
    for name, value in (
        ("event_id", event.event_id),
        ("campaign_id", event.ref.campaign_id),
        ("template_name", event.template_name),
    ):
        if not value.strip():
            return StatusError("MISSING_FIELD", f"{name} is empty")
    size = metadata_bytes(event.metadata)
    if size > limits.max_metadata_bytes:
        return StatusError(
            "METADATA_TOO_LARGE",
            f"metadata has {size} bytes; at most {limits.max_metadata_bytes} are allowed",
        )
    if event.message_type != "SMS":
        return StatusError(
            "MMS_NOT_SUPPORTED",
            f"message_type {quote(event.message_type)}: this connector sends SMS only",
        )
    if len(event.template_name) > MAX_TEMPLATE_NAME_CHARS:
        return StatusError(
            "INVALID_FIELD",
            f"template_name has {len(event.template_name)} characters; "
            f"at most {MAX_TEMPLATE_NAME_CHARS} are allowed",
        )
    if contact_group_for(event.template_name, groups) is None:
        prefixes = ", ".join(repr(g.template_prefix) for g in groups)
        return StatusError(
            "UNKNOWN_TEMPLATE_PREFIX",
            f"template_name {quote(event.template_name)} starts with no configured prefix "
            f"({prefixes})",
        )
    if problem := _count_problem(event):
        return problem
    if event.scheduled_at < now - limits.max_send_delay:
        return StatusError(
            "SEND_TIME_PASSED",
            f"scheduled_at {event.scheduled_at.isoformat()} is more than "
            f"{limits.max_send_delay} in the past",
        )
    if event.scheduled_at > now + MAX_SCHEDULE_AHEAD:
        return StatusError(
            "SEND_TIME_TOO_FAR",
            f"scheduled_at {event.scheduled_at.isoformat()} is more than "
            f"{MAX_SCHEDULE_AHEAD.days} days ahead; TextLocal schedules no further",
        )
    window = event.metrics_window_days
    if window is not None and not 1 <= window <= MAX_METRICS_WINDOW_DAYS:
        return StatusError(
            "INVALID_FIELD",
            f"metrics_window_days {window} is outside 1..{MAX_METRICS_WINDOW_DAYS}",
        )
    validity = event.validity_hours
    if validity is not None and not 1 <= validity <= MAX_VALIDITY_HOURS:
        return StatusError(
            "INVALID_FIELD", f"validity_hours {validity} is outside 1..{MAX_VALIDITY_HOURS}"
        )
    if event.sender is not None and (problem_text := sender_problem(event.sender)):
        return StatusError("INVALID_SENDER", problem_text)
    if len(event.promo_codes) > MAX_PROMO_CODES:
        return StatusError(
            "INVALID_FIELD",
            f"{len(event.promo_codes)} promo codes; at most {MAX_PROMO_CODES} are allowed",
        )
    for code in event.promo_codes:
        if len(code) > MAX_PROMO_CODE_CHARS or _CONTROL_CHARACTER.search(code):
            return StatusError(
                "INVALID_FIELD",
                f"promo code {quote(code)} is longer than {MAX_PROMO_CODE_CHARS} characters "
                "or has control characters",
            )
    return None


def _count_problem(event: CampaignScheduled) -> StatusError | None:
    recipients, batches = event.recipient_count, event.batch_count
    if recipients <= 0 or batches <= 0:
        return StatusError(
            "EMPTY_TARGET",
            f"recipient_count {recipients}, batch_count {batches}: "
            "a campaign needs at least one recipient in at least one batch",
        )
    if recipients > MAX_RECIPIENTS_PER_CAMPAIGN:
        return StatusError(
            "INVALID_FIELD",
            f"recipient_count {recipients} is above the {MAX_RECIPIENTS_PER_CAMPAIGN} "
            "a campaign may have",
        )
    if batches > recipients:
        return StatusError(
            "INVALID_FIELD",
            f"batch_count {batches} is larger than recipient_count {recipients}: "
            "every batch holds at least one customer",
        )
    if recipients > batches * MAX_CUSTOMERS_PER_BATCH:
        return StatusError(
            "INVALID_FIELD",
            f"recipient_count {recipients} cannot fit in {batches} "
            f"batches of at most {MAX_CUSTOMERS_PER_BATCH}",
        )
    return None


def validate_recipients(event: CampaignRecipients) -> StatusError | None:
    """Why a recipients batch cannot be accepted (on its own), or None."""
    if event.batch_index < 0:
        return StatusError("INVALID_FIELD", f"batch_index {event.batch_index} is negative")
    if len(event.customer_ids) > MAX_CUSTOMERS_PER_BATCH:
        return StatusError(
            "BATCH_TOO_LARGE",
            f"batch {event.batch_index} holds {len(event.customer_ids)} customers; "
            f"at most {MAX_CUSTOMERS_PER_BATCH} are allowed",
        )
    longest = max(map(len, event.customer_ids), default=0)
    if longest > MAX_ID_CHARS:
        return StatusError(
            "INVALID_FIELD",
            f"batch {event.batch_index} has a customer_id of {longest} characters; "
            f"at most {MAX_ID_CHARS} are allowed",
        )
    if event.promo_codes:
        longest_code = max(map(len, event.promo_codes))
        if longest_code > MAX_PROMO_CODE_CHARS:
            return StatusError(
                "INVALID_FIELD",
                f"batch {event.batch_index} has a promo_code of {longest_code} characters; "
                f"at most {MAX_PROMO_CODE_CHARS} are allowed",
            )
        joined_codes = "".join(event.promo_codes)
        if not joined_codes.isprintable() and _CONTROL_CHARACTER.search(joined_codes):
            return StatusError(
                "INVALID_FIELD",
                f"batch {event.batch_index} has a promo_code with a control character",
            )
    # isprintable() (C speed) is False for every control character, and for a few others too:
    # only then does the regex look (10,000 ids a batch).
    joined_ids = "".join(event.customer_ids)
    odd = None if joined_ids.isprintable() else _CONTROL_CHARACTER.search(joined_ids)
    if odd is not None:
        return StatusError(
            "INVALID_FIELD",
            f"batch {event.batch_index} has a customer_id with control character "
            f"U+{ord(odd.group()):04X}",
        )
    return None


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def batch_index_problem(batch_indexes: Sequence[int], batch_count: int) -> StatusError | None:
    """A batch index the header's batch_count does not allow, once both are known."""
    beyond = sorted(index for index in batch_indexes if index >= batch_count)
    if beyond:
        return StatusError(
            "BATCH_INDEX_OUT_OF_RANGE",
            f"batch_index {beyond[0]} but the campaign has batch_count {batch_count}",
        )
    return None


_ALPHANUMERIC_SENDER = re.compile(r"^[A-Za-z0-9 ]{3,11}$")
_NUMERIC_SENDER = re.compile(r"^[0-9]{3,13}$")


def sender_problem(sender: str) -> str | None:
    """TextLocal (UK) senders: 3–11 letters/digits, or a number of at most 13 digits."""
    if _NUMERIC_SENDER.match(sender) or (
        _ALPHANUMERIC_SENDER.match(sender) and any(c.isalpha() for c in sender)
    ):
        return None
    return f"sender {quote(sender)}: use 3–11 letters and digits, or a number of at most 13 digits"


# --- recipients -------------------------------------------------------------------------------

_NUMBER_SEPARATORS = re.compile(r"[\s\-().]")


def normalise_number(raw: str) -> str | None:
    """International digits as TextLocal wants them ("447700900123"), or None when invalid.

    Separators and a leading "+" or "00" are dropped; what remains must be 10–15 digits not
    starting with 0 (a national number like "07700…" has no country code and is invalid), and a
    UK number (44…) must be 12 digits: 44 and the 10-digit national number without its 0.
    """
    number = _NUMBER_SEPARATORS.sub("", raw)
    if number.startswith("+"):
        number = number[1:]
    elif number.startswith("00"):
        number = number[2:]
    if not number.isdigit() or not 10 <= len(number) <= 15 or number[0] == "0":
        return None
    if number.startswith("44") and len(number) != 12:
        return None
    return number


# --- the message ------------------------------------------------------------------------------

# GSM 03.38: the basic character set, and the extension table whose characters cost two septets.
_GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENSION = frozenset("^{}\\[~]|€\f")
# The same sets as regular expressions: a text is checked in C, not character by character in
# Python (a million personal texts are costed twice each).
_NOT_GSM = re.compile(
    "[^" + "".join(re.escape(c) for c in sorted(_GSM_BASIC | _GSM_EXTENSION)) + "]"
)
_GSM_EXTENDED = re.compile("[" + "".join(re.escape(c) for c in sorted(_GSM_EXTENSION)) + "]")


class MessageCost(NamedTuple):
    """How TextLocal will bill one message: characters counted, parts, and whether it is unicode.

    A named tuple: personal texts are costed one by one, a million per campaign.
    """

    length: int
    parts: int
    unicode: bool


def message_cost(text: str) -> MessageCost:
    """Parts per recipient: GSM-7 160 / 153 per part, else unicode 70 / 67 (TextLocal's table)."""
    if _NOT_GSM.search(text) is None:
        length = len(text) + len(_GSM_EXTENDED.findall(text))
        single, multi, unicode = 160, 153, False
    else:
        length = len(text.encode("utf-16-le")) // 2
        single, multi, unicode = 70, 67, True
    parts = 1 if length <= single else math.ceil(length / multi)
    return MessageCost(length, parts, unicode)


def render_message(body: str, promo_codes: Sequence[str]) -> str | StatusError:
    """The SMS text: the template body with the campaign's promo code in its placeholder.

    One group send carries one text, so the placeholder takes exactly one campaign-level code.
    """
    if PROMO_CODE_PLACEHOLDER in body:
        codes = sorted(set(promo_codes))
        if not codes:
            return StatusError(
                "PROMO_CODE_MISSING",
                f"the template uses {PROMO_CODE_PLACEHOLDER} but the campaign has no promo code",
            )
        if len(codes) > 1:
            return StatusError(
                "PROMO_CODE_AMBIGUOUS",
                f"the campaign has {len(codes)} promo codes; one segment send carries one",
            )
        body = body.replace(PROMO_CODE_PLACEHOLDER, codes[0])
    if not body.strip():
        return StatusError("EMPTY_MESSAGE", "the template body is empty")
    if len(body) > MAX_MESSAGE_CHARS:
        return StatusError(
            "MESSAGE_TOO_LONG",
            f"the message has {len(body)} characters; TextLocal sends at most {MAX_MESSAGE_CHARS}",
        )
    cost = message_cost(body)
    if cost.parts > MAX_MESSAGE_PARTS:
        return StatusError(
            "MESSAGE_TOO_LONG",
            f"the message needs {cost.parts} parts; TextLocal sends at most {MAX_MESSAGE_PARTS}",
        )
    return body


# --- names and references ---------------------------------------------------------------------

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.]")
MAX_GROUP_NAME_CHARS = 40
# Hex digits of SHA-256 carried in every name and reference: 80 bits, so two campaigns sharing one
# by chance is out of reach (the birthday bound is about 10^12 campaigns).
_DIGEST_HEX = 20
MAX_REFERENCE_CHARS = 32


def campaign_digest(*parts: str) -> str:
    """A fixed-length digest of the parts, joined without ambiguity (length-prefixed)."""
    joined = "".join(f"{len(part)}:{part}" for part in parts)
    return hashlib.sha256(joined.encode()).hexdigest()[:_DIGEST_HEX]


def short_reference(ref: CampaignRef) -> str:
    """The campaign's reference at TextLocal (`custom`, receipts): bounded and injective.

    It always carries the digest of the whole campaign key, so two campaigns whose ids differ
    only in characters the readable part drops (or beyond its length) never share a reference.
    """
    readable = _UNSAFE_NAME_CHARS.sub("_", f"{ref.tenant_id}.{ref.campaign_id}")
    room = MAX_REFERENCE_CHARS - _DIGEST_HEX - 1
    return f"{readable[:room]}-{campaign_digest(ref.key)}"


def segment_group_name(group: ContactGroup, ref: CampaignRef, instance: str) -> str:
    """The segment's name: deterministic, so a restarted executor finds the group it created.

    `instance` is the id of the campaign's CampaignScheduled event: a campaign id that Optimove
    runs again later (a new header) gets a new name, never the old run's group. The digest covers
    key and instance, so distinct campaigns never share a name; the readable part is a courtesy
    to people looking at TextLocal's group list.
    """
    digest = campaign_digest(ref.key, instance)
    head = f"{group.template_prefix}seg-"
    if len(head) + _DIGEST_HEX + 1 >= MAX_GROUP_NAME_CHARS:
        return f"seg-{digest}"
    readable = _UNSAFE_NAME_CHARS.sub("_", ref.campaign_id)
    room = MAX_GROUP_NAME_CHARS - len(head) - _DIGEST_HEX - 1
    return f"{head}{readable[:room]}-{digest}"


# --- the executor's next step -----------------------------------------------------------------


class Step(StrEnum):
    CREATE_SEGMENT = "create_segment"
    LOAD_CONTACTS = "load_contacts"  # resolve customer ids into contacts and load them
    SEND = "send"
    RECONCILE_SEND = "reconcile_send"  # a send may have happened: look before sending again
    CANCEL = "cancel"
    MISS_SEND_WINDOW = "miss_send_window"  # too late to send at all
    NONE = "none"  # nothing for the executor (collecting, sent, or over)


def next_step(
    state: CampaignState,
    *,
    cancel_requested: bool,
    scheduled_at: datetime,
    now: datetime,
    max_send_delay: timedelta,
) -> Step:
    """What the executor does next with a campaign it holds."""
    if state.is_final:
        return Step.NONE
    if cancel_requested:
        return Step.CANCEL
    late = now > scheduled_at + max_send_delay
    if late and state.before_send and state != CampaignState.COLLECTING:
        return Step.MISS_SEND_WINDOW
    steps = {
        CampaignState.READY: Step.CREATE_SEGMENT,
        CampaignState.SEGMENT_CREATED: Step.LOAD_CONTACTS,
        CampaignState.CONTACTS_LOADED: Step.SEND,
        CampaignState.SEND_PENDING: Step.RECONCILE_SEND,
    }
    return steps.get(state, Step.NONE)


def retry_delay(failures: int, cap: timedelta = timedelta(minutes=5)) -> timedelta:
    """Backoff before a campaign's next attempt after `failures` transient failures in a row."""
    return min(timedelta(seconds=2 ** min(failures, 16)), cap)


# --- delivery polls ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PollSlot:
    number: int  # 1-based
    due_at: datetime
    is_final: bool


def poll_slot(sent_at: datetime, interval: timedelta, window: timedelta, number: int) -> PollSlot:
    """The n-th poll: one interval after the previous; the one reaching the window end is final."""
    window_ends_at = sent_at + window
    due_at = min(sent_at + interval * number, window_ends_at)
    return PollSlot(number=number, due_at=due_at, is_final=due_at >= window_ends_at)


def poll_count(interval: timedelta, window: timedelta) -> int:
    return max(1, math.ceil(window / interval))


def due_poll(
    sent_at: datetime, interval: timedelta, window: timedelta, polls_done: int, now: datetime
) -> PollSlot | None:
    """The poll to make now: the latest slot due by `now` after the `polls_done` already made.

    None when the next slot is not due yet or the window is over. A poller that was down for
    several intervals makes one poll, for the latest slot, rather than several in a row that
    would all report the same counts.
    """
    last = poll_count(interval, window)
    if polls_done >= last:
        return None
    if poll_slot(sent_at, interval, window, last).due_at <= now:
        reached = last
    else:
        reached = min(last - 1, max(0, (now - sent_at) // interval))
    if reached <= polls_done:
        return None
    return poll_slot(sent_at, interval, window, reached)


# --- the template catalog ---------------------------------------------------------------------

# What the catalog's preview shows where a campaign's promo code will go.
PREVIEW_PROMO_CODE = "PROMO123"


def template_preview(body: str) -> str:
    """The body as a recipient would read it, with a sample code in the promo-code placeholder."""
    return body.replace(PROMO_CODE_PLACEHOLDER, PREVIEW_PROMO_CODE)
