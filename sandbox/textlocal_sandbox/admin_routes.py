"""The admin API under `/_sandbox/`: for tests, the demo and benchmarks, never for clients.

JSON in, JSON out; a bad request is HTTP 400 and an unknown id 404, each with `{"error": ...}`.
Paths (see admin_client.py for the matching calls):
  GET    /_sandbox/clock                      {"now": ISO-8601, "unix_s": float}
  PUT    /_sandbox/clock                      {"now": ISO-8601 with offset}
  POST   /_sandbox/clock/advance              {"seconds": float}
  POST   /_sandbox/contacts                   {"group_id"?, "group_name"?, "contacts": [...]}
  POST   /_sandbox/contacts/generate          {"group_id"?, "group_name"?, "count", ...}
  POST   /_sandbox/optouts                    {"numbers": [...]}: contacts texting STOP
  GET    /_sandbox/groups                     every group with its size
  GET    /_sandbox/groups/{id}?start=&limit=  one group and (a page of) its contacts
  POST   /_sandbox/templates                  {"templates": [{"title", "body", ...}]}
  PATCH  /_sandbox/templates/{id}             {"title"?, "body"?}
  DELETE /_sandbox/templates/{id}
  GET|PUT|DELETE /_sandbox/faults             {"seed"?, "rules": [FaultRule...]}
  GET    /_sandbox/messages?batch_id=         every message sent so far (column layout)
  GET    /_sandbox/batches                    every batch accepted, with its state
  GET|DELETE /_sandbox/calls                  per-command request counters (DELETE: and the log)
  GET    /_sandbox/calls/log                  every request's arrival time and command, in order
  GET|PUT /_sandbox/balance                   {"sms", "mms"}
  POST   /_sandbox/receipts/flush             POST due receipts now; GET /_sandbox/receipts
  PUT    /_sandbox/receipts/mode              {"retries"?, "duplicate"?, "reverse"?}
  POST   /_sandbox/reset
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Final

from aiohttp import web

from textlocal_sandbox.contacts import Contact, ContactGroup
from textlocal_sandbox.faults import FaultPlan, FaultRule
from textlocal_sandbox.model import Send
from textlocal_sandbox.receipts import ReceiptMode
from textlocal_sandbox.runtime import RUNTIME, SandboxRuntime
from textlocal_sandbox.state import MY_CONTACTS_ID, OPTOUTS_ID

PREFIX: Final = "/_sandbox"
_CONTACT_FIELDS: Final = ("first_name", "last_name", "custom1", "custom2", "custom3")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminRequestError(Exception):
    """A malformed admin request (HTTP 400), or an unknown id (404)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def add_admin_routes(app: web.Application) -> None:
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/clock", get_clock),
        ("PUT", "/clock", set_clock),
        ("POST", "/clock/advance", advance_clock),
        ("POST", "/contacts", seed_contacts),
        ("POST", "/contacts/generate", generate_contacts),
        ("POST", "/optouts", add_optouts),
        ("GET", "/groups", list_groups),
        ("GET", "/groups/{group_id}", get_group),
        ("POST", "/templates", seed_templates),
        ("PATCH", "/templates/{template_id}", update_template),
        ("DELETE", "/templates/{template_id}", delete_template),
        ("GET", "/faults", get_faults),
        ("PUT", "/faults", set_faults),
        ("DELETE", "/faults", clear_faults),
        ("GET", "/messages", get_messages),
        ("GET", "/batches", get_batches),
        ("GET", "/calls", get_calls),
        ("DELETE", "/calls", clear_calls),
        ("GET", "/calls/log", get_call_log),
        ("GET", "/balance", get_balance),
        ("PUT", "/balance", set_balance),
        ("GET", "/receipts", get_receipts),
        ("POST", "/receipts/flush", flush_receipts),
        ("PUT", "/receipts/mode", set_receipt_mode),
        ("POST", "/reset", reset),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, PREFIX + path, _json_errors(handler))


def _json_errors(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except AdminRequestError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except (ValueError, TypeError, KeyError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)

    return wrapped


async def _body(request: web.Request) -> Mapping[str, object]:
    try:
        data = json.loads(await request.text() or "{}")
    except ValueError as exc:
        raise AdminRequestError(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise AdminRequestError("body must be a JSON object")
    return data


def _runtime(request: web.Request) -> SandboxRuntime:
    return request.app[RUNTIME]


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise AdminRequestError(f"{name} must be an integer")
    return int(value)


def _clock_json(runtime: SandboxRuntime) -> web.Response:
    now = runtime.clock.now()
    return web.json_response({"now": now.isoformat(), "unix_s": now.timestamp()})


async def get_clock(request: web.Request) -> web.StreamResponse:
    return _clock_json(_runtime(request))


async def set_clock(request: web.Request) -> web.StreamResponse:
    moment = datetime.fromisoformat(str((await _body(request))["now"]))
    if moment.tzinfo is None:
        raise AdminRequestError("now must carry a UTC offset")
    runtime = _runtime(request)
    runtime.clock.set(moment)
    return _clock_json(runtime)


async def advance_clock(request: web.Request) -> web.StreamResponse:
    seconds = float(str((await _body(request))["seconds"]))
    runtime = _runtime(request)
    runtime.clock.advance(timedelta(seconds=seconds))
    return _clock_json(runtime)


def _target_group(runtime: SandboxRuntime, body: Mapping[str, object]) -> ContactGroup:
    """The group named by id, or by name (created when missing), or My Contacts."""
    state = runtime.state
    if body.get("group_id") is not None:
        group = state.groups.get(_int(body["group_id"], "group_id"))
        if group is None:
            raise AdminRequestError(f"no group {body['group_id']}", status=404)
        return group
    name = body.get("group_name")
    if name is not None:
        return state.group_named(str(name)) or state.create_group(str(name))
    return state.groups[MY_CONTACTS_ID]


async def seed_contacts(request: web.Request) -> web.StreamResponse:
    # Seeding trusts its input (no number validation), so tests can plant odd data.
    body = await _body(request)
    runtime = _runtime(request)
    group = _target_group(runtime, body)
    raw = body.get("contacts", [])
    if not isinstance(raw, list):
        raise AdminRequestError("contacts must be a list")
    contacts = [_contact(item) for item in raw]
    added = runtime.state.add_contacts(group, contacts, runtime.now_s())
    return web.json_response({"group_id": group.id, "added": added, "size": len(group)})


async def generate_contacts(request: web.Request) -> web.StreamResponse:
    """Many contacts without shipping them: numbers from `first_number`, ids `{prefix}{i}`.

    `fields` (optional) gives other fields one constant value for every contact generated,
    e.g. `{"custom2": "fr"}`.
    """
    body = await _body(request)
    runtime = _runtime(request)
    group = _target_group(runtime, body)
    count = _int(body["count"], "count")
    first = _int(body.get("first_number", 447_000_000_000), "first_number")
    start = _int(body.get("first_index", 1), "first_index")
    id_field = str(body.get("id_field", "custom1"))
    if id_field not in _CONTACT_FIELDS:
        raise AdminRequestError(f"id_field must be one of {_CONTACT_FIELDS}")
    prefix = str(body.get("id_prefix", "C"))
    width = _int(body.get("id_width", 7), "id_width")
    extra = body.get("fields") or {}
    if not isinstance(extra, dict) or not set(extra) <= set(_CONTACT_FIELDS) - {id_field}:
        raise AdminRequestError(f"fields must map fields of {_CONTACT_FIELDS} but id_field")
    constant = {name: str(value) for name, value in extra.items()}
    contacts = (
        Contact(first + i, **constant, **{id_field: f"{prefix}{start + i:0{width}d}"})
        for i in range(count)
    )
    added = runtime.state.add_contacts(group, contacts, runtime.now_s())
    return web.json_response({"group_id": group.id, "added": added, "size": len(group)})


async def add_optouts(request: web.Request) -> web.StreamResponse:
    """Numbers opting out now, as when a contact texts STOP: each enters group 6 (the opt-outs)
    at the sandbox's current time with a new opt-out id; one already opted out is left as it
    is. The numbers stay in every other group, as the assumed real service leaves them."""
    body = await _body(request)
    raw = body.get("numbers")
    if not isinstance(raw, list) or not raw:
        raise AdminRequestError("numbers must be a non-empty list")
    runtime = _runtime(request)
    state = runtime.state
    numbers = [_int(number, "number") for number in raw]
    state.add_contacts(state.groups[OPTOUTS_ID], [Contact(n) for n in numbers], runtime.now_s())
    ids = [state.optouts[number][0] for number in numbers]
    return web.json_response({"ids": ids, "size": len(state.groups[OPTOUTS_ID])})


def _contact(item: object) -> Contact:
    if not isinstance(item, dict):
        raise AdminRequestError("each contact must be an object")
    fields = {name: str(item.get(name) or "") for name in _CONTACT_FIELDS}
    return Contact(_int(item.get("number"), "number"), **fields)


async def list_groups(request: web.Request) -> web.StreamResponse:
    groups = _runtime(request).state.groups.values()
    return web.json_response(
        {"groups": [{"id": g.id, "name": g.name, "size": len(g)} for g in groups]}
    )


async def get_group(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    group_id = _int(request.match_info["group_id"], "group_id")
    group = runtime.state.groups.get(group_id)
    if group is None:
        raise AdminRequestError(f"no group {group_id}", status=404)
    start = int(request.query.get("start", "0"))
    limit_text = request.query.get("limit")
    limit = len(group) if limit_text is None else int(limit_text)
    return web.json_response(
        {
            "id": group.id,
            "name": group.name,
            "size": len(group),
            "contacts": [c.to_json() for c in group.page(start, limit)],
        }
    )


async def seed_templates(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    raw = body.get("templates", [])
    if not isinstance(raw, list):
        raise AdminRequestError("templates must be a list")
    state = _runtime(request).state
    ids = []
    for item in raw:
        if not isinstance(item, dict) or "title" not in item or "body" not in item:
            raise AdminRequestError("each template needs a title and a body")
        sender = str(item.get("sender_name") or item.get("senderName") or "")
        ids.append(state.add_template(str(item["title"]), str(item["body"]), sender).id)
    return web.json_response({"ids": ids})


def _template_id(request: web.Request, runtime: SandboxRuntime) -> int:
    template_id = _int(request.match_info["template_id"], "template_id")
    if template_id not in runtime.state.templates:
        raise AdminRequestError(f"no template {template_id}", status=404)
    return template_id


async def update_template(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    template_id = _template_id(request, runtime)
    body = await _body(request)
    title = body.get("title")
    text = body.get("body")
    runtime.state.update_template(
        template_id,
        title=None if title is None else str(title),
        body=None if text is None else str(text),
    )
    return web.json_response({"id": template_id})


async def delete_template(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    runtime.state.delete_template(_template_id(request, runtime))
    return web.json_response({})


def _faults_json(plan: FaultPlan) -> web.Response:
    return web.json_response(
        {"seed": plan.seed, "rules": [r.to_json() for r in plan.rules], "fired": plan.fired}
    )


async def get_faults(request: web.Request) -> web.StreamResponse:
    return _faults_json(_runtime(request).faults)


async def set_faults(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    raw = body.get("rules", [])
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise AdminRequestError("rules must be a list of objects")
    seed = body.get("seed")
    plan = FaultPlan(
        rules=tuple(FaultRule.from_json(r) for r in raw),
        seed=None if seed is None else _int(seed, "seed"),
    )
    runtime = _runtime(request)
    runtime.faults = plan
    return _faults_json(plan)


async def clear_faults(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    runtime.faults = FaultPlan()
    return _faults_json(runtime.faults)


async def get_messages(request: web.Request) -> web.StreamResponse:
    """Messages that have left (scheduled ones once their time passed; cancelled never).

    One entry per batch with its numbers as a list, rather than an object per message, so a
    million-message log stays a few megabytes.
    """
    runtime = _runtime(request)
    batch_text = request.query.get("batch_id")
    wanted = None if batch_text is None else int(batch_text)
    batches = [
        _batch_json(s, with_numbers=True)
        for s in runtime.state.sent(runtime.now_s())
        if wanted is None or s.batch_id == wanted
    ]
    return web.json_response({"batches": batches})


async def get_batches(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    now_s = runtime.now_s()
    batches = [
        {**_batch_json(s, with_numbers=False), "left": s.send_at_s <= now_s}
        for s in runtime.state.sends.values()
    ]
    return web.json_response({"batches": batches, "cancelled": sorted(runtime.state.cancelled)})


def _batch_json(send: Send, *, with_numbers: bool) -> dict[str, object]:
    data: dict[str, object] = {
        "batch_id": send.batch_id,
        "kind": send.kind,
        "text": send.text,
        "sender": send.sender,
        "sent_at_s": send.send_at_s,
        "accepted_at_s": send.accepted_at_s,
        "scheduled": send.scheduled,
        "group_id": send.group_id,
        "num_messages": len(send.recipients),
        "cost": send.cost,
        "custom": send.custom,
        "first_message_id": send.first_message_id,
    }
    if with_numbers:
        data["numbers"] = send.recipients.tolist()
        data["texts"] = None if send.texts is None else list(send.texts)
    return data


async def get_calls(request: web.Request) -> web.StreamResponse:
    return web.json_response({"counts": dict(_runtime(request).call_counts)})


async def clear_calls(request: web.Request) -> web.StreamResponse:
    _runtime(request).clear_calls()
    return web.json_response({"counts": {}})


async def get_call_log(request: web.Request) -> web.StreamResponse:
    """The latest requests (up to `runtime.CALL_LOG_LIMIT`): real Unix time of arrival, command."""
    calls = [{"at_s": at_s, "command": command} for at_s, command in _runtime(request).call_log]
    return web.json_response({"calls": calls})


def _balance_json(runtime: SandboxRuntime) -> web.Response:
    state = runtime.state
    return web.json_response({"sms": state.balance_sms, "mms": state.balance_mms})


async def get_balance(request: web.Request) -> web.StreamResponse:
    return _balance_json(_runtime(request))


async def set_balance(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    runtime = _runtime(request)
    if body.get("sms") is not None:
        runtime.state.balance_sms = _int(body["sms"], "sms")
    if body.get("mms") is not None:
        runtime.state.balance_mms = _int(body["mms"], "mms")
    return _balance_json(runtime)


async def get_receipts(request: web.Request) -> web.StreamResponse:
    receipts = _runtime(request).receipts
    return web.json_response(
        {
            "posted": receipts.posted,
            "failed": receipts.failed,
            "retried": receipts.retried,
            "mode": receipts.mode.to_json(),
        }
    )


async def set_receipt_mode(request: web.Request) -> web.StreamResponse:
    """Retries after a refusal, and duplicate / reversed posting (tests of the receiver)."""
    body = await _body(request)
    unknown = set(body) - {"retries", "duplicate", "reverse"}
    if unknown:
        raise AdminRequestError(f"unknown receipt mode fields {sorted(unknown)}")
    mode = ReceiptMode(
        retries=_int(body.get("retries", 0), "retries"),
        duplicate=body.get("duplicate", False) is True,
        reverse=body.get("reverse", False) is True,
    )
    _runtime(request).receipts.mode = mode
    return web.json_response(mode.to_json())


async def flush_receipts(request: web.Request) -> web.StreamResponse:
    posted, failed = await _runtime(request).dispatch_receipts()
    return web.json_response({"posted": posted, "failed": failed})


async def reset(request: web.Request) -> web.StreamResponse:
    _runtime(request).reset()
    return web.json_response({})
