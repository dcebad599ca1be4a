"""Delivery reports and history: status_batch, status_message, get_history_group,
get_history_single, get_history_api. Statuses come from the delivery model at request time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Final

from textlocal_sandbox.codes import CommandFailed
from textlocal_sandbox.commands.context import (
    CommandContext,
    Reply,
    format_datetime,
    page_bounds,
    parse_int,
)
from textlocal_sandbox.delivery import (
    DELIVERED,
    EXPIRED,
    INVALID,
    PENDING,
    UNDELIVERED,
    UNKNOWN,
)
from textlocal_sandbox.model import Send
from textlocal_sandbox.reply import json_array
from textlocal_sandbox.wire import RequestParams

MAX_HISTORY_PAGE: Final = 1_000
DEFAULT_HISTORY_SPAN_S: Final = 183 * 24 * 3600  # "6 months ago"


def send_statuses(ctx: CommandContext, send: Send) -> list[str]:
    """Each recipient's status now; a send still waiting for its schedule time is all pending."""
    if send.send_at_s > ctx.now_s:
        return [PENDING] * len(send.recipients)
    return ctx.config.delivery.statuses(
        send.recipients, send.send_at_s, ctx.now_s, send.invalid_positions
    )


def status_batch(ctx: CommandContext, params: RequestParams) -> Reply:
    batch_id = parse_int(params.text("batch_id"))
    send = ctx.state.sends.get(batch_id) if batch_id is not None else None
    if send is None:
        raise CommandFailed(901)
    statuses = send_statuses(ctx, send)
    counts = Counter(statuses)
    return {
        "batch_id": send.batch_id,
        "num_messages": len(statuses),
        "num_delivered": counts[DELIVERED],
        "num_undelivered": counts[UNDELIVERED],
        "num_unknown": counts[UNKNOWN],
        "num_invalid": counts[INVALID],
        "num_expired": counts[EXPIRED],
        "messages": json_array(
            f'{{"recipient":{n},"status":"{s}"}}'
            for n, s in zip(send.recipients, statuses, strict=True)
        ),
    }


def status_message(ctx: CommandContext, params: RequestParams) -> Reply:
    message_id = parse_int(params.text("message_id"))
    found = ctx.state.find_message(message_id) if message_id is not None else None
    if found is None:
        raise CommandFailed(902)
    send, position = found
    number = send.recipients[position]
    return {
        "message": {
            "id": send.message_id(position),
            "recipient": number,
            "type": send.kind,
            "status": _message_status(ctx, send, position),
            "date": format_datetime(send.send_at_s),
        }
    }


def get_history_group(ctx: CommandContext, params: RequestParams) -> Reply:
    sends = _sends_in_window(ctx, params, lambda s: s.group_id is not None)
    start, limit = page_bounds(params, default_limit=MAX_HISTORY_PAGE, max_limit=MAX_HISTORY_PAGE)
    messages = [
        {
            "batch_id": s.batch_id,
            "group_id": s.group_id,
            "group_name": s.group_name,
            "message": s.text,
            "datetime": format_datetime(s.send_at_s),
            "num_credits": ctx.money(s.cost),
        }
        for s in sends[start : start + limit]
    ]
    return {"messages": messages, "start": start, "limit": limit, "total": len(sends)}


def get_history_single(ctx: CommandContext, params: RequestParams) -> Reply:
    return _message_history(ctx, params, lambda s: s.group_id is None)


def get_history_api(ctx: CommandContext, params: RequestParams) -> Reply:
    return _message_history(ctx, params, lambda s: True)


def _message_history(
    ctx: CommandContext, params: RequestParams, wanted: Callable[[Send], bool]
) -> Reply:
    """One entry per message, paged across sends without expanding the ones outside the page."""
    sends = _sends_in_window(ctx, params, wanted)
    start, limit = page_bounds(params, default_limit=MAX_HISTORY_PAGE, max_limit=MAX_HISTORY_PAGE)
    total = sum(len(s.recipients) for s in sends)
    page: list[dict[str, object]] = []
    for send, position in _positions(sends, start, limit):
        page.append(
            {
                "id": send.message_id(position),
                "number": send.recipients[position],
                "content": send.text_for(position),
                "datetime": format_datetime(send.send_at_s),
                "sender": send.sender,
                "status": _message_status(ctx, send, position),
            }
        )
    return {"messages": page, "start": start, "limit": limit, "total": total}


def _positions(sends: list[Send], start: int, limit: int) -> Iterator[tuple[Send, int]]:
    skip = start
    remaining = limit
    for send in sends:
        size = len(send.recipients)
        if skip >= size:
            skip -= size
            continue
        for position in range(skip, min(size, skip + remaining)):
            yield send, position
            remaining -= 1
        skip = 0
        if remaining <= 0:
            return


def _sends_in_window(
    ctx: CommandContext, params: RequestParams, wanted: Callable[[Send], bool]
) -> list[Send]:
    min_time = parse_int(params.text("min_time"))
    max_time = parse_int(params.text("max_time"))
    low = ctx.now_s - DEFAULT_HISTORY_SPAN_S if min_time is None else min_time
    high = ctx.now_s if max_time is None else min(max_time, ctx.now_s)
    sends = [s for s in ctx.state.sent(ctx.now_s) if low <= s.send_at_s <= high and wanted(s)]
    descending = (params.text("sort_order") or "desc").strip().lower() != "asc"
    sends.sort(key=lambda s: (s.send_at_s, s.batch_id), reverse=descending)
    return sends


def _message_status(ctx: CommandContext, send: Send, position: int) -> str:
    if send.send_at_s > ctx.now_s:
        return PENDING
    number = send.recipients[position]
    status = ctx.config.delivery.status(number, send.send_at_s, ctx.now_s)
    if status != PENDING and position in send.invalid_positions:
        return INVALID
    return status
