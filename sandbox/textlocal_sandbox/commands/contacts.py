"""Groups and contacts: get_groups, create_group, delete_group, get_contacts, create_contacts,
create_contacts_bulk, delete_contact, get_optouts."""

from __future__ import annotations

from typing import Final

from textlocal_sandbox.codes import WARNING_INVALID_NUMBER, WARNING_TEXTS, CommandFailed
from textlocal_sandbox.commands.context import (
    CommandContext,
    Reply,
    format_datetime,
    page_bounds,
    parse_int,
)
from textlocal_sandbox.contacts import Contact, ContactGroup
from textlocal_sandbox.numbers import parse_number
from textlocal_sandbox.state import BUILT_IN_GROUPS, MY_CONTACTS_ID, OPTOUTS_ID
from textlocal_sandbox.wire import NotJson, RequestParams

MAX_GROUP_NAME: Final = 50
MAX_BULK_CONTACTS: Final = 1_500
MAX_CONTACTS_PAGE: Final = 1_000
_TEXT_FIELDS: Final = ("first_name", "last_name", "custom1", "custom2", "custom3")


def get_groups(ctx: CommandContext, params: RequestParams) -> Reply:
    groups = [{"id": g.id, "name": g.name, "size": len(g)} for g in ctx.state.groups.values()]
    return {"groups": groups, "num_groups": len(groups)}


def create_group(ctx: CommandContext, params: RequestParams) -> Reply:
    name = params.text("name")
    if name is None:
        raise CommandFailed(12)
    name = name.strip()
    if len(name) > MAX_GROUP_NAME:
        raise CommandFailed(13)
    if ctx.state.group_named(name) is not None:
        raise CommandFailed(14)
    group = ctx.state.create_group(name)
    return {"group": {"id": group.id, "name": group.name}}


def delete_group(ctx: CommandContext, params: RequestParams) -> Reply:
    group = _group(ctx, params, default=None)
    if group.id in BUILT_IN_GROUPS:
        raise CommandFailed(62)
    ctx.state.delete_group(group.id)
    return {}


def get_contacts(ctx: CommandContext, params: RequestParams) -> Reply:
    group = _group(ctx, params, default=None)
    start, limit = page_bounds(params, default_limit=MAX_CONTACTS_PAGE, max_limit=MAX_CONTACTS_PAGE)
    number_text = params.text("number")
    if number_text is not None:
        number = parse_number(number_text)
        found = group.get(number) if number is not None else None
        contacts = [found] if found is not None else []
    else:
        contacts = group.page(start, limit)
    return {
        "group_id": group.id,
        "start": start,
        "limit": limit,
        "num_contacts": len(group),
        "contacts": [c.to_json() for c in contacts],
    }


def create_contacts(ctx: CommandContext, params: RequestParams) -> Reply:
    group = _group(ctx, params, default=MY_CONTACTS_ID)
    numbers_text = params.text("numbers")
    if numbers_text is None:
        raise CommandFailed(55)
    contacts: list[Contact] = []
    refused = 0
    for item in numbers_text.split(","):
        if not item.strip():
            continue
        number = parse_number(item)
        if number is None:
            refused += 1
        else:
            contacts.append(Contact(number))
    if len(contacts) + refused > MAX_BULK_CONTACTS:
        raise CommandFailed(33)
    if not contacts:
        raise CommandFailed(56 if refused else 55)
    # Re-adding a number keeps its names: create_contacts carries none to replace them with.
    new = [c for c in contacts if c.number not in group]
    ctx.state.add_contacts(group, new, ctx.now_s)
    reply = _contacts_reply(group, len(contacts), contacts)
    return _with_warnings(reply, refused)


def create_contacts_bulk(ctx: CommandContext, params: RequestParams) -> Reply:
    group = _group(ctx, params, default=MY_CONTACTS_ID)
    try:
        data = params.json_value("contacts")
    except NotJson as exc:
        raise CommandFailed(15) from exc
    if data is None:
        raise CommandFailed(55)
    if not isinstance(data, list):
        raise CommandFailed(15)
    if len(data) > MAX_BULK_CONTACTS:
        raise CommandFailed(33)
    contacts: dict[int, Contact] = {}  # the same number twice in one call: the last one wins
    refused = 0
    for item in data:
        contact = _contact_from_json(item)
        if contact is None:
            refused += 1
        else:
            contacts[contact.number] = contact
    if not contacts and not refused:
        raise CommandFailed(55)
    ctx.state.add_contacts(group, contacts.values(), ctx.now_s)
    return _with_warnings({"group_id": group.id, "num_contacts": len(contacts)}, refused)


def delete_contact(ctx: CommandContext, params: RequestParams) -> Reply:
    group = _group(ctx, params, default=None)
    number_text = params.text("number")
    if number_text is None:
        raise CommandFailed(55)
    number = parse_number(number_text)
    if number is None:
        raise CommandFailed(32)
    if not ctx.state.remove_contact(group, number):
        raise CommandFailed(61)
    return {}


def get_optouts(ctx: CommandContext, params: RequestParams) -> Reply:
    """Opt-outs added at or after `time` (Unix seconds; all without it), oldest first."""
    since = parse_int(params.text("time")) or 0
    listed = ctx.state.optouts
    found = sorted(
        (at_s, optout_id, c.number)
        for c in ctx.state.groups[OPTOUTS_ID]
        for optout_id, at_s in [listed.get(c.number, (0, 0.0))]
    )
    optouts = [
        {"id": optout_id, "number": number, "datetime": format_datetime(at_s)}
        for at_s, optout_id, number in found
        if int(at_s) >= since
    ]
    return {"optouts": optouts, "num_optouts": len(optouts)}


def _group(ctx: CommandContext, params: RequestParams, *, default: int | None) -> ContactGroup:
    group_text = params.text("group_id")
    if group_text is None:
        if default is None:
            raise CommandFailed(25)
        return ctx.state.groups[default]
    group_id = parse_int(group_text, failure=10)
    group = ctx.state.groups.get(group_id) if group_id is not None else None
    if group is None:
        raise CommandFailed(10)
    return group


def _contact_from_json(item: object) -> Contact | None:
    if not isinstance(item, dict):
        return None
    raw = item.get("number")
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        return None
    number = parse_number(str(raw))
    if number is None:
        return None
    fields = [item.get(name) for name in _TEXT_FIELDS]
    texts = ["" if f is None else str(f) for f in fields]
    return Contact(number, *texts)


def _contacts_reply(group: ContactGroup, count: int, contacts: list[Contact]) -> Reply:
    return {
        "group_id": group.id,
        "num_contacts": count,
        "contacts": [c.to_json() for c in contacts],
    }


def _with_warnings(reply: Reply, refused: int) -> Reply:
    if refused:
        warning = {"code": WARNING_INVALID_NUMBER, "message": WARNING_TEXTS[WARNING_INVALID_NUMBER]}
        reply["warnings"] = [warning] * refused
    return reply
