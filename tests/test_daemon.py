"""The daemon as a real process, end to end: Kafka in, TextLocal (the sandbox) and Kafka out.

Covers the happy path at scale, redelivery, bad input, SIGKILL at every step boundary (crash
safety: exactly one SMS per recipient), TextLocal faults, graceful SIGTERM, and that no phone
number, message body or secret reaches the logs.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime, timedelta

import pytest

from consumer.events import InputEvent
from consumer.workflow import CampaignState
from tests.daemon import (
    FIRST_NUMBER,
    Stack,
    assert_one_message_per_recipient,
    assert_statuses_consistent,
    customer_ids,
)
from tests.helpers import consume, new_ref
from textlocal_sandbox import FaultRule

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_large_campaign_end_to_end(stack: Stack) -> None:
    """3 batches / 25,000 customers: one segment, one send, one SMS per matched valid number."""
    ref = new_ref()
    matched = customer_ids(1, 24_990)
    targeted = [*matched, *[f"UNKNOWN-{i}" for i in range(7)], "INV-1", "INV-2", "INV-3"]
    daemon = stack.daemon().start()
    await daemon.wait_ready()
    stack.publish(*stack.campaign(ref, targeted, batches=3))
    await stack.wait_for_state(ref, CampaignState.SENT, timeout_s=120)

    await assert_one_message_per_recipient(stack, 24_990)
    calls = await stack.sandbox.admin.call_counts()
    assert calls["send"] == 1
    assert calls["create_group"] == 1
    assert calls["create_contacts_bulk"] == 17  # ⌈24,990 / 1,500⌉
    statuses = stack.statuses(expected=3)
    assert assert_statuses_consistent(statuses, ref) == ["ACCEPTED", "SEGMENT_CREATED", "SENT"]
    sent = statuses[-1]
    assert sent["counts"] == {
        "requested": 25_000,
        "matched": 24_990,
        "unmatched": 7,
        "invalid_numbers": 3,
        "duplicates": 0,
        "skipped": 0,
    }
    assert sent["message_parts"] == 1
    assert sent["cost_credits"] == 24_990
    assert sent["metadata"] == {"journey": "welcome"}
    assert await daemon.stop() == 0


async def test_redelivered_events_send_once(stack: Stack) -> None:
    """The same campaign events published twice lead to exactly one send."""
    ref = new_ref()
    events = stack.campaign(ref, customer_ids(1, 300), batches=2)
    daemon = stack.daemon().start()
    await daemon.wait_ready()
    stack.publish(*events, *events)
    await stack.wait_for_state(ref, CampaignState.SENT)
    await asyncio.sleep(2)  # time for the duplicates to be read and ignored
    assert (await stack.sandbox.admin.call_counts())["send"] == 1
    await assert_one_message_per_recipient(stack, 300)
    assert await daemon.stop() == 0


async def test_bad_input_is_refused_and_nothing_after_it_is_lost(stack: Stack) -> None:
    """Garbage, unknown schemas and invalid campaigns go to the DLQ or REJECTED; the rest flows."""
    good = new_ref()
    bad = {name: new_ref() for name in ("mms", "prefix", "empty", "past")}
    unknown_fingerprint = b"\xc3\x01" + bytes.fromhex("0011223344556677") + b"\x00"
    daemon = stack.daemon().start()
    await daemon.wait_ready()
    stack.publish(
        (b"k1", b"\xde\xad\xbe\xef"),
        (b"k2", unknown_fingerprint),
        *stack.campaign(bad["mms"], customer_ids(1, 5), 1, message_type="MMS"),
        *stack.campaign(bad["prefix"], customer_ids(1, 5), 1, template_name="XYZ_Promo"),
        stack.campaign(bad["empty"], customer_ids(1, 5), 1, recipient_count=0)[0],
        *stack.campaign(
            bad["past"], customer_ids(1, 5), 1, scheduled_at=datetime.now(UTC) - timedelta(days=2)
        ),
        *stack.campaign(good, customer_ids(1, 50), batches=1),
    )
    await stack.wait_for_state(good, CampaignState.SENT)
    for ref in bad.values():  # other partitions than the good one's, maybe: wait for each
        await stack.wait_for_state(ref, CampaignState.REJECTED)
    dead = consume(stack.bootstrap, stack.topics.dlq, expected=2)
    assert sorted(m.key() for m in dead) == [b"k1", b"k2"]  # two partitions: any order
    reasons = {
        (s["campaign_id"], s["error"]["code"])
        for s in stack.statuses(expected=7)
        if s["status"] == "REJECTED"
    }
    assert reasons == {
        (bad["mms"].campaign_id, "MMS_NOT_SUPPORTED"),
        (bad["prefix"].campaign_id, "UNKNOWN_TEMPLATE_PREFIX"),
        (bad["empty"].campaign_id, "EMPTY_TARGET"),
        (bad["past"].campaign_id, "SEND_TIME_PASSED"),
    }
    await assert_one_message_per_recipient(stack, 50)
    assert await daemon.stop() == 0


@pytest.mark.parametrize(
    "kill_at",
    ["segment.created", "contacts.chunk_loaded:2", "send.returned", "send.recorded"],
)
async def test_sigkill_at_each_step_boundary_still_sends_exactly_once(
    stack: Stack, kill_at: str
) -> None:
    """Killed at a step boundary and restarted, the daemon ends SENT with one SMS per recipient."""
    ref = new_ref()
    first = stack.daemon("first", TEXTLOCAL_CONSUMER_TEST_KILL_AT=kill_at).start()
    await first.wait_ready()
    stack.publish(*stack.campaign(ref, customer_ids(1, 4_000), batches=2))
    assert await first.wait_exit(timeout_s=90) == -signal.SIGKILL
    assert any(e.get("event") == "test.kill_point_reached" for e in first.events())

    second = stack.daemon("second").start()
    await stack.wait_for_state(ref, CampaignState.SENT, timeout_s=120)
    await assert_one_message_per_recipient(stack, 4_000)
    assert (await stack.sandbox.admin.call_counts())["create_group"] >= 1
    assert len({b.batch_id for b in await stack.sandbox.admin.batches()}) == 1
    order = assert_statuses_consistent(stack.statuses(expected=3), ref)
    assert order == ["ACCEPTED", "SEGMENT_CREATED", "SENT"]
    assert await second.stop() == 0


async def test_textlocal_faults_across_fifty_campaigns_send_each_once(stack: Stack) -> None:
    """With 20% of TextLocal calls failing (5xx, 429, timeouts), 50 campaigns each send once."""
    await stack.sandbox.admin.set_faults(
        [
            FaultRule("http_5xx", rate=0.08, status=503),
            FaultRule("http_429", rate=0.06, retry_after_s=1),
            FaultRule("latency", rate=0.03, latency_s=4.0),
            FaultRule("drop_after", rate=0.03),
        ],
        seed=7,
    )
    daemon = stack.daemon(TEXTLOCAL_CONSUMER_TEXTLOCAL_REQUEST_TIMEOUT_S="3").start()
    await daemon.wait_ready()
    refs = [new_ref() for _ in range(50)]
    events: list[InputEvent] = []
    for number, ref in enumerate(refs):
        events += stack.campaign(ref, customer_ids(number * 40 + 1, 40), batches=1)
    stack.publish(*events)
    for ref in refs:
        await stack.wait_for_state(ref, CampaignState.SENT, timeout_s=240)
    assert len(await stack.sandbox.admin.faults_fired()) > 0
    batches = await stack.sandbox.admin.batches()
    assert len(batches) == 50
    await assert_one_message_per_recipient(stack, 2_000)
    assert await daemon.stop() == 0


async def test_sigterm_drains_and_exits_zero(stack: Stack) -> None:
    """SIGTERM stops intake, finishes or hands back work, commits, and exits with status 0."""
    daemon = stack.daemon().start()
    await daemon.wait_ready()
    status, body = await daemon.health("/healthz")
    assert (status, body["status"]) == (200, "ok")
    ref = new_ref()
    stack.publish(*stack.campaign(ref, customer_ids(1, 100), batches=1))
    await stack.wait_for_state(ref, CampaignState.SENT)
    assert await daemon.stop(timeout_s=40) == 0
    events = [e.get("event") for e in daemon.events()]
    assert "daemon.stopping" in events
    assert events[-1] == "daemon.stopped"
    # Offsets were committed: a new daemon in the same group reads nothing again.
    again = stack.daemon("again").start()
    await again.wait_ready()
    await asyncio.sleep(3)
    assert not [e for e in again.events() if e.get("event") == "intake.event"]
    assert await again.stop() == 0


async def test_logs_hold_no_numbers_bodies_or_secrets(stack: Stack) -> None:
    """A full campaign's logs never show a phone number, the message text or the API key."""
    ref = new_ref()
    daemon = stack.daemon().start()
    await daemon.wait_ready()
    stack.publish(*stack.campaign(ref, customer_ids(1, 200), batches=1))
    await stack.wait_for_state(ref, CampaignState.SENT)
    assert await daemon.stop() == 0
    output = daemon.output()
    assert "campaign.sent" in output
    assert stack.sandbox.api_key not in output
    assert "20% off" not in output
    assert "WEEKEND20" not in output
    for number in range(FIRST_NUMBER, FIRST_NUMBER + 200):
        assert str(number) not in output
