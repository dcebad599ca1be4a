"""Account-level commands: balance, get_sender_names, get_templates, get_inboxes, get_messages,
check_keyword, create_shorturl."""

from __future__ import annotations

from typing import Final

from textlocal_sandbox.codes import CommandFailed
from textlocal_sandbox.commands.context import CommandContext, Reply, page_bounds, parse_int
from textlocal_sandbox.commands.sending import is_http_url
from textlocal_sandbox.wire import RequestParams

# One inbox, as every account has; the sandbox receives no inbound messages, so it stays empty.
INBOX_ID: Final = 1
INBOX_KEYWORD: Final = "SANDBOX"
INBOX_NUMBER: Final = 447_700_900_999
SHORT_URL_BASE: Final = "https://tx.gl/"


def balance(ctx: CommandContext, params: RequestParams) -> Reply:
    state = ctx.state
    return {"balance": {"sms": ctx.money(state.balance_sms), "mms": ctx.money(state.balance_mms)}}


def get_sender_names(ctx: CommandContext, params: RequestParams) -> Reply:
    names = list(ctx.config.sender_names)
    if ctx.config.default_sender and ctx.config.default_sender not in names:
        names.insert(0, ctx.config.default_sender)
    return {"default_sender_name": ctx.config.default_sender, "sender_names": names}


def get_templates(ctx: CommandContext, params: RequestParams) -> Reply:
    templates = [
        {
            "id": t.id,
            "title": t.title,
            "body": t.body,
            "senderName": t.sender_name,
            "isMyDND": "1" if t.is_my_dnd else "0",
        }
        for t in ctx.state.templates.values()
    ]
    return {"templates": templates}


def get_inboxes(ctx: CommandContext, params: RequestParams) -> Reply:
    inbox = {
        "id": str(INBOX_ID),
        "number": str(INBOX_NUMBER),
        "keyword": INBOX_KEYWORD,
        "num_messages": "0",
        "num_new": "0",
    }
    return {"num_inboxes": 1, "inboxes": [inbox]}


def get_messages(ctx: CommandContext, params: RequestParams) -> Reply:
    if parse_int(params.text("inbox_id")) != INBOX_ID:
        raise CommandFailed(904)
    start, limit = page_bounds(params, default_limit=1_000, max_limit=1_000)
    return {
        "inbox_id": INBOX_ID,
        "num_messages": 0,
        "min_time": parse_int(params.text("min_time")) or 0,
        "max_time": parse_int(params.text("max_time")) or int(ctx.now_s),
        "sort_order": (params.text("sort_order") or "desc").lower(),
        "start": start,
        "limit": limit,
        "messages": [],
    }


def check_keyword(ctx: CommandContext, params: RequestParams) -> Reply:
    keyword = params.text("keyword")
    if keyword is None:
        raise CommandFailed(905)
    return {"keyword": keyword.strip(), "available": keyword.strip().upper() != INBOX_KEYWORD}


def create_shorturl(ctx: CommandContext, params: RequestParams) -> Reply:
    url = params.text("url")
    if url is None:
        raise CommandFailed(185)
    if not is_http_url(url):
        raise CommandFailed(186)
    return {"shorturl": f"{SHORT_URL_BASE}{ctx.state.next_short_url_id():06d}"}
