"""`send`, `send_mms` and `bulk_json`: validate like TextLocal, charge, and record the batch."""

from __future__ import annotations

import re
from array import array
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, urlsplit

from textlocal_sandbox.codes import WARNING_INVALID_NUMBER, WARNING_TEXTS, CommandFailed
from textlocal_sandbox.commands.context import CommandContext, Reply, parse_int
from textlocal_sandbox.credits import count_parts, truncate
from textlocal_sandbox.model import MMS, SMS, Send
from textlocal_sandbox.numbers import parse_number
from textlocal_sandbox.reply import RawJson, json_array
from textlocal_sandbox.state import snapshot_recipients
from textlocal_sandbox.wire import NotJson, RequestParams

MAX_NUMBERS: Final = 10_000
MAX_SCHEDULE_AHEAD_S: Final = 365 * 24 * 3600
# UK alphanumeric sender: 3–11 characters with at least one letter (spaces and & . - _ ! '
# accepted, as real sender names like "Shop & Co" use them), or a numeric sender of 3–13 digits.
_ALPHA_SENDER: Final = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9 &.\-_!']{3,11}")
_NUMERIC_SENDER: Final = re.compile(r"[0-9]{3,13}")


@dataclass(frozen=True)
class Recipients:
    numbers: array[int]
    invalid_positions: tuple[int, ...]
    group_id: int | None
    group_name: str
    warnings: tuple[str, ...]  # the numbers that were refused, one warning each


@dataclass(frozen=True)
class Options:
    """The send options shared by every sending command."""

    sender: str
    send_at_s: float
    scheduled: bool
    receipt_url: str
    custom: str
    test: bool


def send(ctx: CommandContext, params: RequestParams) -> Reply:
    message = params.url_decoded("message")
    if message is None:
        raise CommandFailed(5)
    unicode = params.flag("unicode")
    text = truncate(message, unicode=unicode)
    recipients = _recipients(ctx, params)
    options = _options(ctx, params)
    return _accept(
        ctx, params, recipients, options, SMS, text, None, count_parts(text, unicode=unicode)
    )


def send_mms(ctx: CommandContext, params: RequestParams) -> Reply:
    url = params.text("url")
    if url is None:
        raise CommandFailed(185)
    if not is_http_url(url):
        raise CommandFailed(186)
    text = params.url_decoded("message") or ""
    recipients = _recipients(ctx, params)
    options = _options(ctx, params)
    return _accept(ctx, params, recipients, options, MMS, text, None, 1)


def bulk_json(ctx: CommandContext, params: RequestParams) -> Reply:
    try:
        data = params.json_value("data")
    except NotJson as exc:
        raise CommandFailed(15) from exc
    if data is None:
        raise CommandFailed(4)
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise CommandFailed(15)
    entries: list[object] = data["messages"]
    if not entries:
        raise CommandFailed(4)
    if len(entries) > MAX_NUMBERS:
        raise CommandFailed(33)
    numbers: list[int] = []
    texts: list[str] = []
    refused: list[str] = []
    unicode = params.flag("unicode") or str(data.get("unicode")).lower() in ("1", "true")
    for entry in entries:
        if not isinstance(entry, dict):
            raise CommandFailed(15)
        raw_text = entry.get("text", entry.get("message"))
        if not isinstance(raw_text, str) or not raw_text.strip():
            raise CommandFailed(5)
        raw_number = entry.get("number", entry.get("numbers"))
        number = _json_number(raw_number)
        if number is None:
            refused.append(str(raw_number))
            continue
        numbers.append(number)
        texts.append(truncate(raw_text, unicode=unicode))
    if not numbers:
        raise CommandFailed(51)
    packed, invalid = snapshot_recipients(numbers)
    recipients = Recipients(packed, invalid, None, "", tuple(refused))
    # Options given inside `data` win over the same ones given as parameters.
    overrides = {k: str(v) for k, v in data.items() if k != "messages" and v is not None}
    if "sender" in overrides:
        # Parameters' senders arrive URL-encoded once more and are decoded; one inside JSON
        # does not, so encode it here to have it come out unchanged.
        overrides["sender"] = quote(overrides["sender"], safe="")
    merged = RequestParams({**params.values, **_non_empty(overrides)})
    options = _options(ctx, merged)
    return _accept(ctx, merged, recipients, options, SMS, texts[0], tuple(texts), None)


def is_http_url(text: str) -> bool:
    try:
        parts = urlsplit(text.strip())
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _accept(
    ctx: CommandContext,
    params: RequestParams,
    recipients: Recipients,
    options: Options,
    kind: str,
    text: str,
    texts: tuple[str, ...] | None,
    parts_each: int | None,
) -> Reply:
    """Charge and record a validated send (or only answer, in test mode).

    `texts` gives one text per recipient (bulk_json); otherwise everyone costs `parts_each`.
    """
    state = ctx.state
    numbers, invalid, texts = _without_optouts(ctx, params, recipients, texts)
    if texts is None:
        num_parts = parts_each or 1
        cost = num_parts * len(numbers)
    else:
        unicode = params.flag("unicode")
        part_counts = [count_parts(t, unicode=unicode) for t in texts]
        num_parts = max(part_counts)
        cost = sum(part_counts)
    balance = state.balance_mms if kind == MMS else state.balance_sms
    if not options.test and cost > balance:
        raise CommandFailed(7)
    batch_id = state.allocate_batch_id()
    first_message_id = state.allocate_message_ids(len(numbers))
    reply: Reply = {}
    if options.test:
        reply["test_mode"] = True
    else:
        state.record_send(
            Send(
                batch_id=batch_id,
                kind=kind,
                recipients=numbers,
                text=text,
                texts=texts,
                sender=options.sender,
                accepted_at_s=ctx.now_s,
                send_at_s=options.send_at_s,
                scheduled=options.scheduled,
                group_id=recipients.group_id,
                group_name=recipients.group_name,
                num_parts=num_parts,
                cost=cost,
                receipt_url=options.receipt_url,
                custom=options.custom,
                first_message_id=first_message_id,
                invalid_positions=invalid,
            )
        )
        balance -= cost
    reply.update(
        {
            "balance": ctx.money(balance),
            "batch_id": batch_id,
            "cost": ctx.money(cost),
            "num_messages": len(numbers),
            "message": {"num_parts": num_parts, "sender": options.sender, "content": text},
            "receipt_url": options.receipt_url,
            "custom": options.custom,
            "messages": _messages_json(ctx, recipients, numbers, first_message_id),
        }
    )
    if recipients.warnings:
        reply["warnings"] = [
            {"code": WARNING_INVALID_NUMBER, "message": WARNING_TEXTS[WARNING_INVALID_NUMBER]}
            for _ in recipients.warnings
        ]
    return reply


def _messages_json(
    ctx: CommandContext, recipients: Recipients, numbers: array[int], first_id: int
) -> RawJson:
    if recipients.group_id is not None and not ctx.config.list_group_messages:
        return RawJson("[]")
    return json_array(f'{{"id":"{first_id + i}","recipient":{n}}}' for i, n in enumerate(numbers))


def _without_optouts(
    ctx: CommandContext,
    params: RequestParams,
    recipients: Recipients,
    texts: tuple[str, ...] | None,
) -> tuple[array[int], tuple[int, ...], tuple[str, ...] | None]:
    """Drop opted-out numbers when `optouts` is on: they are neither sent to nor charged."""
    optouts = ctx.state.opted_out()
    if not params.flag("optouts") or not len(optouts):
        return recipients.numbers, recipients.invalid_positions, texts
    keep = [i for i, n in enumerate(recipients.numbers) if n not in optouts]
    if not keep:
        raise CommandFailed(51)
    if len(keep) == len(recipients.numbers):
        return recipients.numbers, recipients.invalid_positions, texts
    numbers, invalid = snapshot_recipients(recipients.numbers[i] for i in keep)
    kept_texts = None if texts is None else tuple(texts[i] for i in keep)
    return numbers, invalid, kept_texts


def _recipients(ctx: CommandContext, params: RequestParams) -> Recipients:
    numbers_text = params.text("numbers")
    group_text = params.text("group_id")
    if numbers_text is not None and group_text is not None:
        raise CommandFailed(34)
    if numbers_text is not None:
        return _listed_recipients(numbers_text)
    if group_text is None:
        raise CommandFailed(4)
    group_id = parse_int(group_text, failure=10)
    group = ctx.state.groups.get(group_id) if group_id is not None else None
    if group is None:
        raise CommandFailed(10)
    if not len(group):
        raise CommandFailed(11)
    numbers, invalid = snapshot_recipients(group.numbers())
    return Recipients(numbers, invalid, group.id, group.name, ())


def _listed_recipients(numbers_text: str) -> Recipients:
    items = [item for item in numbers_text.split(",") if item.strip()]
    if not items:
        raise CommandFailed(4)
    if len(items) > MAX_NUMBERS:
        raise CommandFailed(33)
    valid: dict[int, None] = {}  # ordered set: a number listed twice gets one message
    refused: list[str] = []
    for item in items:
        number = parse_number(item)
        if number is None:
            refused.append(item)
        else:
            valid[number] = None
    if not valid:
        raise CommandFailed(51)
    numbers, invalid = snapshot_recipients(valid)
    return Recipients(numbers, invalid, None, "", tuple(refused))


def _options(ctx: CommandContext, params: RequestParams) -> Options:
    sender = params.url_decoded("sender")
    if sender is None:
        if not ctx.config.default_sender:
            raise CommandFailed(44)
        sender = ctx.config.default_sender
    elif not (_ALPHA_SENDER.fullmatch(sender) or _NUMERIC_SENDER.fullmatch(sender)):
        raise CommandFailed(43)
    send_at_s, scheduled = _schedule(ctx, params.text("schedule_time"))
    receipt_url = params.text("receipt_url") or ""
    if receipt_url and not is_http_url(receipt_url):
        raise CommandFailed(186)
    return Options(
        sender=sender,
        send_at_s=send_at_s,
        scheduled=scheduled,
        receipt_url=receipt_url.strip(),
        custom=params.text("custom") or "",
        test=params.flag("test"),
    )


def _schedule(ctx: CommandContext, schedule_text: str | None) -> tuple[float, bool]:
    schedule_time = parse_int(schedule_text, failure=8)
    if schedule_time is None:
        return ctx.now_s, False
    if schedule_time < int(ctx.now_s):
        raise CommandFailed(9)
    if schedule_time > ctx.now_s + MAX_SCHEDULE_AHEAD_S:
        raise CommandFailed(191)
    if schedule_time <= ctx.now_s:
        return ctx.now_s, False
    return float(schedule_time), True


def _json_number(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return parse_number(str(value))
    if isinstance(value, str):
        return parse_number(value)
    return None


def _non_empty(values: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in values.items() if v.strip()}
