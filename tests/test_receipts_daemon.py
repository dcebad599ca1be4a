"""Delivery receipts end to end: real daemon processes, Kafka, Redis, the sandbox posting them.

The sandbox posts a receipt per message to the `receipt_url` the daemon's sends carry (the
daemon's own listener); the tests add the hostile traffic (wrong token, malformed, a flood
beyond the backlog, replays) and a SIGKILL in the drain, and read the CustomerOutcomes topic.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter, defaultdict
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from consumer.events import CampaignRef
from consumer.workflow import CampaignState, short_reference
from tests.daemon import (
    FIRST_NUMBER,
    DaemonProcess,
    Stack,
    customer_ids,
    free_port,
)
from tests.helpers import REGISTRY, eventually, new_ref, read_all
from tests.test_outcomes_daemon import (
    FAST_POLLS,
    LETTERS,
    RECIPIENTS,
    read_topic,
    sandbox_truth,
    wait_until_published,
)
from textlocal_sandbox.delivery import EXPIRED, UNDELIVERED, DeliveryModel

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTCOME_OF_RECEIPT = {"D": "DELIVERED", "U": "UNDELIVERED", "I": "INVALID", "?": "UNKNOWN"}
SENT = (CampaignState.SENT, CampaignState.POLLING)


def receipts_env(port: int, token: str, max_backlog: int = 100_000) -> dict[str, str]:
    return {
        "TEXTLOCAL_CONSUMER_RECEIPTS_TOKEN": token,
        "TEXTLOCAL_CONSUMER_RECEIPTS_HOST": "127.0.0.1",
        "TEXTLOCAL_CONSUMER_RECEIPTS_PORT": str(port),
        "TEXTLOCAL_CONSUMER_RECEIPTS_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "TEXTLOCAL_CONSUMER_RECEIPTS_MAX_BACKLOG": str(max_backlog),
    }


def number_of(customer: str) -> str:
    """The sandbox's generated contact C0000001 has FIRST_NUMBER, and so on."""
    return str(FIRST_NUMBER + int(customer[1:]) - 1)


def receipt_status(number: str) -> str:
    """What the sandbox reports for this number in a receipt (E is reported as U)."""
    status = DeliveryModel().final_status(int(number))
    return UNDELIVERED if status == EXPIRED else status


def taken(customers: list[str]) -> list[str]:
    """The customers whose receipt the drain takes (a U is left to the polls)."""
    return [c for c in customers if receipt_status(number_of(c)) != UNDELIVERED]


def outcome_records(stack: Stack, *groups: list[str]) -> list[dict[str, Any]]:
    """CustomerOutcomes read from the topic until the customers taken from `groups` are in (or
    30 s passed: the caller's assertions then say what is missing)."""
    expected_customers = sum(len(taken(group)) for group in groups)
    deadline = time.monotonic() + 30
    while True:
        found = read_all(stack.bootstrap, stack.topics.outcomes)
        records = [REGISTRY.decode(r.value()).fields for r in found]
        customers = {c for r in records for c in r["customer_ids"]}
        if len(customers) >= expected_customers or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def assert_each_customer_once(
    records: list[dict[str, Any]], ref: CampaignRef, customers: list[str]
) -> None:
    """Every customer of the campaign whose receipt is not U (left to the polls) in records of
    one event id only (a record re-emitted after a crash is the same record), with the outcome
    its number's receipt said."""
    mine = [r for r in records if r["campaign_id"] == ref.campaign_id]
    event_ids: dict[str, set[str]] = defaultdict(set)
    outcome: dict[str, str] = {}
    for record in mine:
        assert record["source"] == "RECEIPT"
        for customer in record["customer_ids"]:
            event_ids[customer].add(record["event_id"])
            outcome[customer] = record["outcome"]
    expected = taken(customers)
    assert 0 < len(expected) < len(customers)
    assert sorted(event_ids) == sorted(expected)
    assert all(len(ids) == 1 for ids in event_ids.values()), "a customer counted twice"
    for customer in expected:
        assert outcome[customer] == OUTCOME_OF_RECEIPT[receipt_status(number_of(customer))]


def assert_no_number_leaked(daemon: DaemonProcess, records: list[dict[str, Any]]) -> None:
    text = daemon.output() + json.dumps(records, default=str)
    assert str(FIRST_NUMBER)[:8] not in text, "a phone number in the log or a record"


async def post_receipts(
    url: str, customers: list[str], reference: str, *, retry_refused: bool = False
) -> dict[str, int]:
    """POST one receipt per customer's number, as TextLocal would, 20 at a time; answers by
    result (with `retry_refused`, a 503 is posted again after a pause: its final answer)."""
    answers: dict[str, int] = defaultdict(int)
    gate = asyncio.Semaphore(20)
    async with aiohttp.ClientSession() as session:

        async def post(customer: str) -> None:
            number = number_of(customer)
            form = {
                "number": number,
                "status": receipt_status(number),
                "customID": reference,
                "datetime": "2026-01-01 12:00:00",
            }
            while True:
                async with gate, session.post(url, data=form) as response:
                    answer = await response.text()
                if response.status != 503 or not retry_refused:
                    answers[answer] += 1
                    return
                await asyncio.sleep(0.5)

        await asyncio.gather(*(post(c) for c in customers))
    return dict(answers)


async def metric(daemon: DaemonProcess, name: str, labels: str) -> float:
    url = f"http://127.0.0.1:{daemon.http_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}}"):
            return float(line.split()[-1])
    return 0.0


async def send_campaign(stack: Stack, ref: CampaignRef, customers: list[str]) -> None:
    stack.publish(*stack.campaign(ref, customers, 1))
    await stack.wait_for_state(ref, *SENT)


async def test_receipts_twice_out_of_order_bad_token_malformed_and_a_flood(stack: Stack) -> None:
    """The sandbox posts every receipt twice and in reverse order; a wrong token and malformed
    bodies are refused and counted; a flood beyond the backlog (drain held off) is refused with
    503 and accepted when replayed. Every customer's outcome is published once, none lost that
    was accepted, nothing counted twice, no number anywhere, and the daemon keeps running."""
    port, token = free_port(), secrets.token_hex(24)
    daemon = stack.daemon(**receipts_env(port, token, max_backlog=100)).start()
    await daemon.wait_ready()
    url = f"http://127.0.0.1:{port}/receipts/{token}"

    first = CampaignRef(tenant_id=42, campaign_id="rcpt.1", channel_id=505)
    first_customers = customer_ids(1, 300)
    await send_campaign(stack, first, first_customers)
    await stack.sandbox.admin.set_receipt_mode(duplicate=True, reverse=True, retries=3)
    async with aiohttp.ClientSession() as session:
        for path in (f"/receipts/{token[:-1]}x", "/receipts/", "/metrics"):
            async with session.post(f"http://127.0.0.1:{port}{path}", data={}) as response:
                assert response.status == 404
        for form in ({}, {"number": "447700000001"}, {"number": "x", "status": "D"}):
            async with session.post(url, data=form) as response:
                assert response.status == 400
    stack.sandbox.clock.advance(timedelta(seconds=130))
    await stack.sandbox.admin.flush_receipts()
    assert (await stack.sandbox.admin.receipt_counts())["failed"] == 0
    records = outcome_records(stack, first_customers)
    assert_each_customer_once(records, first, first_customers)

    # The drain held off (its lease taken), then a flood: beyond the backlog, 503.
    second = CampaignRef(tenant_id=42, campaign_id="rcpt.2", channel_id=505)
    second_customers = customer_ids(301, 200)
    await stack.sandbox.admin.set_receipt_mode()
    await send_campaign(stack, second, second_customers)
    lease = stack.store.keys.receipts_lease
    await stack.store.redis.set(lease, "test-holds-the-drain", px=120_000)
    await eventually(
        lambda: _metric_is(daemon, "textlocal_consumer_leases_held", 'kind="receipts"', 0),
        timeout_s=30,
    )
    flood = await post_receipts(url, second_customers, short_reference(second))
    assert flood == {"accepted": 100, "backlog_full": 100}
    await stack.store.redis.delete(lease)
    replay = await post_receipts(url, second_customers, short_reference(second), retry_refused=True)
    assert replay == {"accepted": 100, "duplicate": 100}

    records = outcome_records(stack, first_customers, second_customers)
    assert_each_customer_once(records, first, first_customers)
    assert_each_customer_once(records, second, second_customers)
    assert await metric(daemon, "textlocal_consumer_receipts_total", 'result="bad_token"') == 3
    assert await metric(daemon, "textlocal_consumer_receipts_total", 'result="malformed"') == 3
    assert await metric(daemon, "textlocal_consumer_receipts_total", 'result="duplicate"') >= 300
    assert daemon.process is not None
    assert daemon.process.poll() is None
    assert (await daemon.health("/healthz"))[0] == 200
    assert_no_number_leaked(daemon, records)
    assert await daemon.stop() == 0


async def _metric_is(daemon: DaemonProcess, name: str, labels: str, value: float) -> bool:
    return await metric(daemon, name, labels) == value


async def test_sigkill_between_recording_receipts_and_publishing_their_outcomes(
    stack: Stack,
) -> None:
    """Killed after the drain recorded outcomes but before it deleted the receipts: after a
    restart (and TextLocal's receipts replayed) every customer's outcome is published, each in
    records of one event id only."""
    port, token = free_port(), secrets.token_hex(24)
    env = receipts_env(port, token)
    daemon = stack.daemon(
        "killed", **env, TEXTLOCAL_CONSUMER_TEST_KILL_AT="receipts.outcomes_recorded"
    ).start()
    await daemon.wait_ready()
    ref = CampaignRef(tenant_id=42, campaign_id="rcpt.kill", channel_id=505)
    customers = customer_ids(501, 120)
    await send_campaign(stack, ref, customers)
    stack.sandbox.clock.advance(timedelta(seconds=130))
    await stack.sandbox.admin.flush_receipts()
    assert await daemon.wait_exit(60) == -9
    assert any(e.get("event") == "test.kill_point_reached" for e in daemon.events())
    assert await stack.store.receipts_backlog() > 0, "the receipts outlive the kill"

    again = stack.daemon("restarted", **env, TEXTLOCAL_CONSUMER_HTTP_PORT=str(free_port()))
    again.start()
    await again.wait_ready()
    url = f"http://127.0.0.1:{port}/receipts/{token}"
    # What TextLocal may retry: the receipts refused while the daemon was down.
    await post_receipts(url, customers, short_reference(ref), retry_refused=True)
    records = outcome_records(stack, customers)
    assert_each_customer_once(records, ref, customers)
    await eventually(_backlog_empty(stack), timeout_s=30)
    assert_no_number_leaked(again, records)
    assert await again.stop() == 0


def _backlog_empty(stack: Stack) -> Any:
    async def backlog_empty() -> bool:
        return await stack.store.receipts_backlog() == 0

    return backlog_empty


async def test_receipts_on_give_the_final_sets_the_polls_alone_give(stack: Stack) -> None:
    """25,000 recipients, receipts on, polls every 4 s: the sandbox posts receipts as messages
    settle while the polls run; the union of CustomerOutcomes is, customer by customer, the
    sandbox's final status (what the polls alone publish: tests/test_outcomes_daemon.py), each
    once, from both sources; receipts change no DeliveryMetrics count."""
    port, token = free_port(), secrets.token_hex(24)
    daemon = stack.daemon(**FAST_POLLS, **receipts_env(port, token)).start()
    await daemon.wait_ready()
    ref = new_ref()
    stack.publish(*stack.campaign(ref, customer_ids(1, RECIPIENTS), 3))
    await stack.wait_for_state(ref, *SENT, timeout_s=120)
    # Settle delays run from 60 to 120 s: at the first poll about half have settled, and the
    # sandbox's ticker posts their receipts meanwhile (every 0.5 s).
    await stack.sandbox.admin.advance_clock(timedelta(seconds=90))

    async def polled_once() -> bool:
        snapshot = await stack.store.load(ref.key)
        return snapshot is not None and snapshot.polls_done >= 1

    await eventually(polled_once, timeout_s=60, interval_s=0.1)
    await stack.sandbox.admin.advance_clock(timedelta(seconds=120))
    await stack.wait_for_state(ref, CampaignState.DONE, timeout_s=90)
    await stack.sandbox.admin.flush_receipts()  # waits for the round in flight
    await eventually(_backlog_empty(stack), timeout_s=30)
    await wait_until_published(stack)
    snapshot = await stack.store.load(ref.key)
    assert snapshot is not None
    assert snapshot.batch_id is not None

    records = {r["event_id"]: r for r in read_topic(stack.bootstrap, stack.topics.outcomes)}
    truth = await sandbox_truth(stack, snapshot.batch_id)
    published = Counter((c, r["outcome"]) for r in records.values() for c in r["customer_ids"])
    assert max(published.values()) == 1, "a customer's outcome was published twice"
    assert dict(published) == {(c, LETTERS[letter]): 1 for c, letter in truth.items()}
    assert {r["source"] for r in records.values()} == {"POLL", "RECEIPT"}
    metrics = read_topic(stack.bootstrap, stack.topics.metrics)
    final = [m for m in metrics if m["campaign_id"] == ref.campaign_id and m["is_final"]]
    assert final
    assert final[-1]["num_messages"] == RECIPIENTS
    assert final[-1]["delivered"] == sum(1 for s in truth.values() if s == "D")
    assert_no_number_leaked(daemon, list(records.values()))
    assert await daemon.stop() == 0
