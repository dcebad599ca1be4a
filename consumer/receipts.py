"""Delivery receipts: TextLocal's POSTs, accepted on a listener of their own (DESIGN §4b).

TextLocal POSTs one receipt per message to a send's `receipt_url`: `number`, `status` (D, U, I or
?), `customID` (the send's `custom`: `workflow.short_reference`, which names the campaign) and
`datetime` (`Y-m-d H:i:s`). Its encoding and retries are not published: this listener takes form
bodies (url-encoded or multipart), a JSON object, or the query string, and its answers assume
that TextLocal retries on 5xx and not on 2xx (docs/DECISIONS.md "Delivery receipts").

    POST /receipts/<token>      200 accepted, or already had (idempotent)
                                200 for a reference none of our sends carries (nothing to retry)
                                400 malformed (a field missing or not as published)
                                503 + Retry-After: the backlog is full, or Redis does not answer
    anything else               404 (no token, a wrong one, another path), 405 a non-POST

The listener is its own aiohttp site on its own port (`receipts.port`), so exposing it to
TextLocal exposes neither `/metrics` nor the health endpoints. The token is compared in constant
time. Every answer is counted (`textlocal_consumer_receipts_total{result}`); nothing about a
receipt (number, status, reference) is logged, and no access log is kept.

Recording is one atomic Redis call (`CampaignStore.accept_receipt`): the reference must be one a
send of ours registered, a keyed digest of (reference, number, status) makes a receipt delivered
twice count once, and the stream of receipts waiting (`keys.receipts`) never grows beyond
`receipts.max_backlog`. `ReceiptOutcomes` (consumer.receipt_outcomes) turns them into
CustomerOutcomes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

from aiohttp import web

from consumer.config import ReceiptSettings
from consumer.errors import TransientError
from consumer.metrics import Metrics
from consumer.store import CampaignStore, ReceiptEntry

RECEIPT_PATH: Final = "/receipts/{token}"
# A receipt is four short fields; anything much larger is not one.
MAX_BODY_BYTES: Final = 8 * 1024
# Retry-After when the backlog is full (the drain takes it down within seconds) or Redis is away.
BACKLOG_RETRY_AFTER_S: Final = 30
UNAVAILABLE_RETRY_AFTER_S: Final = 10

# Published statuses D, U, I, ?; E (expired) is accepted too, should TextLocal ever send it.
FINAL_STATUSES: Final = frozenset({"D", "U", "I", "?", "E"})
_NUMBER = re.compile(r"\+?(\d{7,15})")
_REFERENCE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
RESULTS: Final = (
    "accepted",
    "duplicate",
    "unknown_reference",
    "backlog_full",
    "unavailable",
    "malformed",
    "bad_token",
    "method_not_allowed",
)


class MalformedReceipt(ValueError):
    """A receipt missing a field, or with one not as published; `reason` is a bounded label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_receipt(fields: Mapping[str, str]) -> ReceiptEntry:
    """The receipt in `fields` (names case-insensitive), validated; raises MalformedReceipt."""
    lowered = {name.lower(): value.strip() for name, value in fields.items()}
    number = _NUMBER.fullmatch(lowered.get("number", ""))
    if number is None:
        raise MalformedReceipt("number")
    status = lowered.get("status", "").upper()
    if status not in FINAL_STATUSES:
        raise MalformedReceipt("status")
    reference = lowered.get("customid", "")
    if not _REFERENCE.fullmatch(reference):
        raise MalformedReceipt("custom_id")
    return ReceiptEntry(
        reference=reference,
        number=number.group(1),
        status=status,
        at_s=_receipt_time(lowered.get("datetime", "")),
    )


def _receipt_time(text: str) -> int:
    """`Y-m-d H:i:s` (taken as UTC: TextLocal does not say), or ISO 8601; Unix seconds."""
    try:
        moment = datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise MalformedReceipt("datetime") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def receipt_digest(key: bytes, receipt: ReceiptEntry) -> str:
    """A keyed digest of what makes a receipt the same receipt: reference, number and status.

    Keyed (the deployment's random key in Redis), so the digests stored for de-duplication do
    not let anyone confirm a guessed number.
    """
    message = f"{receipt.reference}\x1f{receipt.number}\x1f{receipt.status}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


def receipts_app(
    settings: ReceiptSettings, store: CampaignStore, metrics: Metrics
) -> web.Application:
    """The aiohttp application of the receipt listener."""
    expected = settings.token.encode()
    counted = metrics.receipts

    def answer(result: str, status: int, **headers: str) -> web.Response:
        counted.labels(result).inc()
        return web.Response(status=status, text=result, headers=headers)

    async def receive(request: web.Request) -> web.Response:
        token = request.match_info.get("token", "").encode()
        if not hmac.compare_digest(token, expected):
            return answer("bad_token", 404)
        if request.method != "POST":
            return answer("method_not_allowed", 405, Allow="POST")
        try:
            receipt = parse_receipt(await _fields(request))
        except MalformedReceipt:
            return answer("malformed", 400)
        try:
            key = await store.receipt_digest_key()
            result = await store.accept_receipt(
                receipt, receipt_digest(key, receipt), settings.max_backlog
            )
        except TransientError:
            return answer("unavailable", 503, **{"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)})
        if result == "backlog_full":
            return answer(result, 503, **{"Retry-After": str(BACKLOG_RETRY_AFTER_S)})
        return answer(result, 200)

    async def refuse(_request: web.Request) -> web.Response:
        return answer("bad_token", 404)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_route("*", RECEIPT_PATH, receive)
    app.router.add_route("*", "/{tail:.*}", refuse)
    for result in RESULTS:
        counted.labels(result)
    return app


async def _fields(request: web.Request) -> dict[str, str]:
    """The query string's fields, then the body's over them (form, multipart or JSON)."""
    fields = {name: value for name, value in request.query.items()}
    try:
        if request.content_type == "application/json":
            data = json.loads(await request.read() or b"{}")
            if not isinstance(data, dict):
                raise MalformedReceipt("body")
            fields.update({str(k): str(v) for k, v in data.items() if v is not None})
        elif request.body_exists:
            form = await request.post()
            fields.update({name: value for name, value in form.items() if isinstance(value, str)})
    except web.HTTPRequestEntityTooLarge:
        raise MalformedReceipt("too_large") from None
    except (ValueError, UnicodeDecodeError):
        raise MalformedReceipt("body") from None
    return fields
