"""`get_scheduled` and `cancel_scheduled`: sends waiting for their schedule time."""

from __future__ import annotations

from datetime import UTC, datetime

from textlocal_sandbox.codes import CommandFailed
from textlocal_sandbox.commands.context import CommandContext, Reply, parse_int
from textlocal_sandbox.wire import RequestParams


def get_scheduled(ctx: CommandContext, params: RequestParams) -> Reply:
    # Every field a string, as published; the id is the batch id, so a client that lost the
    # send's reply can adopt the batch it finds here.
    scheduled = [
        {
            "id": str(send.batch_id),
            "scheduledFor": datetime.fromtimestamp(send.send_at_s, UTC).strftime(
                "%Y-%m-%d-%H-%M-%S"
            ),
            "howmany": str(len(send.recipients)),
            "message": send.text,
            "origin": send.sender,
            "groupName": send.group_name,
            "groupid": str(send.group_id or 0),
        }
        for send in sorted(ctx.state.scheduled(ctx.now_s), key=lambda s: s.send_at_s)
    ]
    return {"scheduled": scheduled}


def cancel_scheduled(ctx: CommandContext, params: RequestParams) -> Reply:
    sent_id = parse_int(params.text("sent_id"))
    send = ctx.state.sends.get(sent_id) if sent_id is not None else None
    if send is None or send.send_at_s <= ctx.now_s:
        raise CommandFailed(903)
    ctx.state.cancel_send(send.batch_id)
    return {}
