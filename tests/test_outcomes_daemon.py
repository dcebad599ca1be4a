"""CustomerOutcomes end to end: the daemon as a process, real Kafka and Redis, the sandbox.

Polls run every 4 s over a 12 s window (3 polls); the sandbox's clock is moved between them, so
about half the messages have settled at the first poll and all of them by the second. The union
of the CustomerOutcomes records must then be, customer by customer, what the sandbox reports.
"""

from __future__ import annotations

import json
import re
import signal
from collections import Counter, defaultdict
from datetime import timedelta
from typing import Any

import pytest

from consumer.workflow import CampaignState
from tests.daemon import Stack, customer_ids
from tests.fixtures_sandbox import call
from tests.helpers import REGISTRY, eventually, new_ref, read_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECIPIENTS = 25_000
FAST_POLLS = {
    "TEXTLOCAL_CONSUMER_WORKFLOW_POLL_INTERVAL_S": "4",
    "TEXTLOCAL_CONSUMER_WORKFLOW_METRICS_WINDOW_DAYS": str(3 * 4 / 86400),
}
LETTERS = {"D": "DELIVERED", "U": "UNDELIVERED", "I": "INVALID", "E": "EXPIRED", "?": "UNKNOWN"}
# The sandbox's master group numbers (tests.daemon.FIRST_NUMBER onwards): none may be printed.
A_NUMBER = re.compile(r"4477\d{8}")


def read_topic(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every record the topic holds now, decoded (call it once the outbox is empty)."""
    return [REGISTRY.decode(m.value() or b"").fields for m in read_all(bootstrap, topic)]


async def sandbox_truth(stack: Stack, batch_id: int) -> dict[str, str]:
    """Customer id → the sandbox's status letter now, through the master group's contacts."""
    (group,) = json.loads(stack.env["TEXTLOCAL_CONSUMER_CONTACT_GROUPS"])
    contacts = (await stack.sandbox.admin.group_contacts(int(group["id"]))).contacts
    customer_of = {contact.number: contact.custom1 for contact in contacts}
    report = await call(stack.sandbox, "status_batch", {"batch_id": str(batch_id)})
    return {customer_of[int(m["recipient"])]: m["status"] for m in report["messages"]}


async def wait_until_published(stack: Stack) -> None:
    async def outbox_empty() -> bool:
        return await stack.store.outbox_length() == 0

    await eventually(outbox_empty, timeout_s=60, interval_s=0.2)


def assert_no_numbers(texts: list[str]) -> None:
    for text in texts:
        assert A_NUMBER.search(text) is None, "a phone number left the daemon"


async def test_the_union_of_outcomes_is_the_sandbox_s_final_statuses(stack: Stack) -> None:
    """25,000 recipients settling over two polls: every customer's final outcome is published
    once, in records of at most 10,000, equal to the sandbox's; no number in records or logs."""
    daemon = stack.daemon(**FAST_POLLS).start()
    await daemon.wait_ready()
    ref = new_ref()
    stack.publish(*stack.campaign(ref, customer_ids(1, RECIPIENTS), 3))
    await stack.wait_for_state(ref, CampaignState.SENT, CampaignState.POLLING, timeout_s=120)
    # Settle delays run from 60 to 120 s: at the first poll about half have settled.
    await stack.sandbox.admin.advance_clock(timedelta(seconds=90))

    async def polled_once() -> bool:
        snapshot = await stack.store.load(ref.key)
        return snapshot is not None and snapshot.polls_done >= 1

    await eventually(polled_once, timeout_s=60, interval_s=0.1)
    await stack.sandbox.admin.advance_clock(timedelta(seconds=120))
    await stack.wait_for_state(ref, CampaignState.DONE, timeout_s=60)
    await wait_until_published(stack)
    snapshot = await stack.store.load(ref.key)
    assert snapshot is not None
    assert snapshot.batch_id is not None

    records = read_topic(stack.bootstrap, stack.topics.outcomes)
    truth = await sandbox_truth(stack, snapshot.batch_id)
    assert len(truth) == RECIPIENTS
    assert set(truth.values()) <= set(LETTERS), "the sandbox should have settled every message"
    by_id = {r["event_id"]: r for r in records}
    assert all(0 < len(r["customer_ids"]) <= 10_000 for r in by_id.values())
    published = Counter(
        (customer, r["outcome"]) for r in by_id.values() for customer in r["customer_ids"]
    )
    assert max(published.values()) == 1, "a customer's outcome was published twice"
    outcome_of = {customer: outcome for customer, outcome in published}
    assert outcome_of == {customer: LETTERS[letter] for customer, letter in truth.items()}
    polls = {r["poll_number"] for r in by_id.values()}
    assert polls == {1, 2}, "the first poll publishes the settled half, the second the rest"
    assert all(r["metadata"] == {"journey": "welcome"} for r in by_id.values())
    # The numbers hash went with the window; numbers in no record and no log line.
    assert not await stack.store.redis.exists(stack.store.keys.recipient_numbers(ref.key))
    assert_no_numbers([str(r) for r in by_id.values()])
    assert_no_numbers(daemon.output().splitlines())
    assert await daemon.stop() == 0


async def test_outcomes_recorded_before_a_kill_are_published_after_it(stack: Stack) -> None:
    """SIGKILL right after a poll and its outcomes are recorded: after a restart every outcome
    is published, any one twice only as the same record with the same event id."""
    killed = stack.daemon("killed", **FAST_POLLS)
    killed.start({"TEXTLOCAL_CONSUMER_TEST_KILL_AT": "poll.recorded"})
    await killed.wait_ready()
    ref = new_ref()
    stack.publish(*stack.campaign(ref, customer_ids(1, RECIPIENTS), 3))
    await stack.wait_for_state(ref, CampaignState.SENT, CampaignState.POLLING, timeout_s=120)
    await stack.sandbox.admin.advance_clock(timedelta(seconds=200))  # all settled at poll 1
    assert await killed.wait_exit(60) == -signal.SIGKILL
    snapshot = await stack.store.load(ref.key)
    assert snapshot is not None
    assert snapshot.batch_id is not None
    assert snapshot.polls_done == 1

    restarted = stack.daemon("restarted", **FAST_POLLS).start()
    await restarted.wait_ready()
    await stack.wait_for_state(ref, CampaignState.DONE, timeout_s=60)
    await wait_until_published(stack)

    records = read_topic(stack.bootstrap, stack.topics.outcomes)
    contents: dict[str, set[tuple[str, tuple[str, ...]]]] = defaultdict(set)
    for record in records:
        contents[record["event_id"]].add((record["outcome"], tuple(record["customer_ids"])))
    assert all(len(seen) == 1 for seen in contents.values()), "one event id, two contents"
    published = Counter(
        (customer, outcome)
        for ((outcome, customers),) in contents.values()
        for customer in customers
    )
    assert max(published.values()) == 1
    truth = await sandbox_truth(stack, snapshot.batch_id)
    assert dict(published) == {(c, LETTERS[letter]): 1 for c, letter in truth.items()}
    assert {r["poll_number"] for r in records} == {1}
    assert_no_numbers([str(r) for r in records])
    assert_no_numbers(killed.output().splitlines() + restarted.output().splitlines())
    assert await restarted.stop() == 0
