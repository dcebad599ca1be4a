"""The receipt listener: parsing, the token, idempotent and bounded recording in Redis."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry

from consumer.config import ReceiptSettings, describe_settings, load_settings
from consumer.errors import ConfigError
from consumer.keys import RedisKeys
from consumer.metrics import Metrics
from consumer.outcomes import OutcomeRecorder
from consumer.receipt_outcomes import ReceiptOutcomes
from consumer.receipts import MalformedReceipt, parse_receipt, receipt_digest, receipts_app
from consumer.store import CampaignStore, ReceiptEntry
from tests.helpers import REGISTRY
from textlocal_sandbox import ManualClock

TOKEN = "t0ken-" + "x" * 40
REFERENCE = "42.2_38-0123456789abcdef0123"


def receipt_form(number: str = "447700900123", status: str = "D", **extra: str) -> dict[str, str]:
    return {
        "number": number,
        "status": status,
        "customID": REFERENCE,
        "datetime": "2025-03-01 12:30:00",
        **extra,
    }


# --- parsing, pure ------------------------------------------------------------------------------


def test_parse_takes_the_published_fields() -> None:
    """number, status, customID and datetime (Y-m-d H:i:s, taken as UTC) make a receipt."""
    receipt = parse_receipt(receipt_form(number="+447700900123"))
    assert receipt == ReceiptEntry(REFERENCE, "447700900123", "D", 1740832200)


def test_parse_is_lenient_about_names_case_and_iso_times() -> None:
    """Field names compare case-insensitively; an ISO 8601 time is accepted too."""
    receipt = parse_receipt(
        {
            "NUMBER": "447700900123",
            "Status": "u",
            "customid": REFERENCE,
            "DateTime": "2025-03-01T12:30:00+00:00",
        }
    )
    assert (receipt.status, receipt.at_s) == ("U", 1740832200)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"number": ""}, "number"),
        ({"number": "44 7700 900123"}, "number"),
        ({"number": "12345"}, "number"),
        ({"status": "P"}, "status"),
        ({"status": ""}, "status"),
        ({"customID": ""}, "custom_id"),
        ({"customID": "a" * 65}, "custom_id"),
        ({"customID": "x;DROP"}, "custom_id"),
        ({"datetime": "yesterday"}, "datetime"),
    ],
)
def test_parse_refuses_what_is_not_as_published(fields: dict[str, str], reason: str) -> None:
    """A field missing or not as published is refused, with a bounded reason."""
    with pytest.raises(MalformedReceipt) as caught:
        parse_receipt({**receipt_form(), **fields})
    assert caught.value.reason == reason


def test_digest_is_keyed_and_covers_reference_number_and_status() -> None:
    """The de-duplication digest depends on the key and on each of the three fields, and does
    not carry the number."""
    receipt = parse_receipt(receipt_form())
    digest = receipt_digest(b"k" * 32, receipt)
    assert "447700900123" not in digest
    assert digest != receipt_digest(b"j" * 32, receipt)
    for change in ({"status": "U"}, {"number": "447700900124"}):
        assert digest != receipt_digest(b"k" * 32, parse_receipt(receipt_form(**change)))
    assert digest == receipt_digest(
        b"k" * 32, parse_receipt(receipt_form(datetime="2025-03-02 00:00:00"))
    )


# --- settings -----------------------------------------------------------------------------------


BASE_ENV = {
    "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": "k:9092",
    "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": "key",
    "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": '[{"id": 1, "template_prefix": "OPT_"}]',
}


def test_receipts_are_off_without_a_token() -> None:
    """No token: no listener, sends carry no receipt_url."""
    receipts = load_settings(BASE_ENV).receipts
    assert not receipts.enabled
    assert receipts.receipt_url is None


def test_public_url_and_token_make_the_receipt_url() -> None:
    """The URL sends carry is the public base URL, /receipts/, the token; the token is a
    secret: never in repr, registered for the log scrubber, hidden in the settings table."""
    settings = load_settings(
        {
            **BASE_ENV,
            "TEXTLOCAL_CONSUMER_RECEIPTS_TOKEN": TOKEN,
            "TEXTLOCAL_CONSUMER_RECEIPTS_PUBLIC_URL": "https://sms.example.com/tl/",
        }
    )
    assert settings.receipts.receipt_url == f"https://sms.example.com/tl/receipts/{TOKEN}"
    assert TOKEN not in repr(settings)
    assert TOKEN in settings.secrets()
    assert "TEXTLOCAL_CONSUMER_RECEIPTS_TOKEN\n    receipts.token = (secret)" in describe_settings()


@pytest.mark.parametrize(
    ("env", "named", "says"),
    [
        ({"TEXTLOCAL_CONSUMER_RECEIPTS_TOKEN": "short"}, "RECEIPTS_TOKEN", "at least 32"),
        ({"TEXTLOCAL_CONSUMER_RECEIPTS_TOKEN": "a/" + "b" * 40}, "RECEIPTS_TOKEN", "URL path"),
        (
            {"TEXTLOCAL_CONSUMER_RECEIPTS_PUBLIC_URL": "https://sms.example.com"},
            "RECEIPTS_TOKEN",
            "required when receipts.public_url",
        ),
        (
            {
                "TEXTLOCAL_CONSUMER_RECEIPTS_TOKEN": TOKEN,
                "TEXTLOCAL_CONSUMER_RECEIPTS_PUBLIC_URL": "ftp://sms.example.com",
            },
            "RECEIPTS_PUBLIC_URL",
            "http(s) URL",
        ),
        (
            {
                "TEXTLOCAL_CONSUMER_RECEIPTS_TOKEN": TOKEN,
                "TEXTLOCAL_CONSUMER_RECEIPTS_PORT": "9108",
            },
            "RECEIPTS_PORT",
            "must differ from http.port",
        ),
    ],
)
def test_bad_receipt_settings_name_themselves(env: dict[str, str], named: str, says: str) -> None:
    """A bad receipt setting stops the start with its name, never quoting the token."""
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE_ENV, **env})
    assert named in caught.value.setting
    assert says in str(caught.value)
    assert "b" * 40 not in str(caught.value)


# --- the listener over HTTP, recording in Redis -------------------------------------------------


@dataclass
class Listener:
    url: str
    store: CampaignStore
    metrics: Metrics
    session: aiohttp.ClientSession

    def count(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "textlocal_consumer_receipts_total", {"result": result}
        )
        return value or 0.0

    async def post(self, path: str = "", **kwargs: Any) -> tuple[int, str, str | None]:
        async with self.session.post(self.url + (path or f"/receipts/{TOKEN}"), **kwargs) as resp:
            return resp.status, await resp.text(), resp.headers.get("Retry-After")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def listener(redis_client: aioredis.Redis, key_prefix: str) -> AsyncIterator[Listener]:
    store = CampaignStore(redis_client, RedisKeys(prefix=key_prefix), REGISTRY)
    await store.register_receipt_reference(REFERENCE, "42:2.38:505", timedelta(hours=1))
    metrics = Metrics(CollectorRegistry())
    settings = ReceiptSettings(token=TOKEN, max_backlog=5)
    runner = web.AppRunner(receipts_app(settings, store, metrics), access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    async with aiohttp.ClientSession() as session:
        yield Listener(f"http://127.0.0.1:{port}", store, metrics, session)
    await runner.cleanup()


@pytest.mark.integration
async def test_a_receipt_is_recorded_once_however_often_it_comes(listener: Listener) -> None:
    """A receipt posted twice is answered 200 both times and recorded once."""
    assert (await listener.post(data=receipt_form()))[:2] == (200, "accepted")
    assert (await listener.post(data=receipt_form()))[:2] == (200, "duplicate")
    [recorded] = await listener.store.receipts_read(10)
    assert (recorded.reference, recorded.number, recorded.status) == (
        REFERENCE,
        "447700900123",
        "D",
    )
    assert listener.count("accepted") == 1
    assert listener.count("duplicate") == 1


@pytest.mark.integration
async def test_form_multipart_json_and_query_are_all_understood(listener: Listener) -> None:
    """Url-encoded and multipart forms, a JSON object and the query string carry receipts."""
    multipart = aiohttp.FormData()
    for name, value in receipt_form(number="447700900002").items():
        multipart.add_field(name, value)
    assert (await listener.post(data=receipt_form(number="447700900001")))[0] == 200
    assert (await listener.post(data=multipart))[0] == 200
    assert (await listener.post(json=receipt_form(number="447700900003")))[0] == 200
    assert (await listener.post(params=receipt_form(number="447700900004")))[0] == 200
    numbers = [r.number for r in await listener.store.receipts_read(10)]
    assert numbers == ["447700900001", "447700900002", "447700900003", "447700900004"]


@pytest.mark.integration
async def test_without_the_token_nothing_is_recorded(listener: Listener) -> None:
    """A wrong token, none, or another path is 404 and counted; a GET with the token is 405."""
    wrong = TOKEN[:-1] + "y"
    for path in (f"/receipts/{wrong}", "/receipts/", "/receipts", "/metrics", "/healthz"):
        assert (await listener.post(path, data=receipt_form()))[0] == 404, path
    async with listener.session.get(f"{listener.url}/receipts/{TOKEN}") as response:
        assert response.status == 405
    assert listener.count("bad_token") == 5
    assert listener.count("method_not_allowed") == 1
    assert await listener.store.receipts_read(10) == []


@pytest.mark.integration
async def test_malformed_receipts_are_refused_and_counted(listener: Listener) -> None:
    """Missing fields, bad values, a non-object JSON body and an oversized body are 400."""
    bodies: list[dict[str, Any]] = [
        {"data": {"number": "447700900123"}},
        {"data": receipt_form(status="X")},
        {"data": b"[1, 2]", "headers": {"Content-Type": "application/json"}},
        {"data": {**receipt_form(), "padding": "p" * 20_000}},
    ]
    for body in bodies:
        assert (await listener.post(**body))[0] == 400, body
    assert listener.count("malformed") == len(bodies)
    assert await listener.store.receipts_read(10) == []


@pytest.mark.integration
async def test_a_reference_none_of_our_sends_carries_is_dropped(listener: Listener) -> None:
    """customID unknown (never sent, or its retention over): 200 (nothing to retry), counted,
    not recorded."""
    status, body, _ = await listener.post(data=receipt_form(customID="other-ref"))
    assert (status, body) == (200, "unknown_reference")
    assert await listener.store.receipts_read(10) == []


@pytest.mark.integration
async def test_beyond_the_backlog_receipts_are_refused_with_retry_after(listener: Listener) -> None:
    """With max_backlog waiting, the next is 503 with Retry-After and not recorded; once the
    drain deletes some, receipts are accepted again."""
    for n in range(5):
        assert (await listener.post(data=receipt_form(number=f"44770090010{n}")))[0] == 200
    status, body, retry_after = await listener.post(data=receipt_form(number="447700900200"))
    assert (status, body, retry_after) == (503, "backlog_full", "30")
    assert await listener.store.receipts_backlog() == 5
    first = (await listener.store.receipts_read(1))[0]
    await listener.store.receipts_done([first.entry_id])
    assert (await listener.post(data=receipt_form(number="447700900200")))[0] == 200
    assert listener.count("backlog_full") == 1


# --- the drain: receipts into CustomerOutcomes ------------------------------------------------


CAMPAIGN_KEY = "42:2.38:505"


async def outcome_records(store: CampaignStore) -> list[dict[str, Any]]:
    entries = await store.outbox_read(1000)
    return [REGISTRY.decode(e.value).fields for e in entries if e.topic == "outcomes" and e.value]


@pytest.mark.integration
async def test_the_drain_publishes_each_customers_first_final_outcome_once(
    listener: Listener,
) -> None:
    """Receipts become one CustomerOutcomes record per outcome, with customer ids and never a
    number; the same receipts again, or a later receipt with another status for a customer
    already settled, publish nothing; numbers not of the campaign are ignored; U is left to the
    polls (it may be an expiry)."""
    store = listener.store
    await store.record_recipient_numbers(
        CAMPAIGN_KEY, [(f"44770090000{n}", f"C{n}") for n in range(4)], ttl_s=3600
    )
    drain = ReceiptOutcomes(
        store,
        OutcomeRecorder(store, REGISTRY, listener.metrics.customer_outcomes),
        listener.metrics,
        ManualClock(),
        "test",
    )

    async def deliver(*receipts: tuple[int, str]) -> None:
        for n, status in receipts:
            entry = parse_receipt(receipt_form(number=f"44770090000{n}", status=status))
            key = await store.receipt_digest_key()
            await store.accept_receipt(entry, receipt_digest(key, entry), 100)

    await deliver((0, "D"), (1, "D"), (2, "I"), (9, "D"), (3, "U"))
    assert await drain.drain() == 5
    records = await outcome_records(store)
    by_outcome = {r["outcome"]: sorted(r["customer_ids"]) for r in records}
    assert by_outcome == {"DELIVERED": ["C0", "C1"], "INVALID": ["C2"]}
    assert {r["source"] for r in records} == {"RECEIPT"}
    assert {r["poll_number"] for r in records} == {None}
    assert "44770090000" not in repr(records)
    assert await store.receipts_backlog() == 0

    await deliver((0, "D"), (2, "D"), (3, "?"))  # the first is a duplicate: not recorded
    assert await drain.drain() == 2
    records = await outcome_records(store)
    assert [(r["outcome"], r["customer_ids"]) for r in records[-1:]] == [("UNKNOWN", ["C3"])]
    assert len(records) == 3
    applied = listener.metrics.registry.get_sample_value
    assert applied("textlocal_consumer_receipts_applied_total", {"result": "outcome"}) == 4
    assert applied("textlocal_consumer_receipts_applied_total", {"result": "no_change"}) == 2
    assert applied("textlocal_consumer_receipts_applied_total", {"result": "left_to_poll"}) == 1
