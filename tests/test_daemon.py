"""The daemon as a real process, end to end: Kafka in, TextLocal (the sandbox) and Kafka out.

Covers the happy path at scale, redelivery, bad input, SIGKILL at every step boundary (crash
safety: exactly one SMS per recipient), TextLocal faults, graceful SIGTERM, and that no phone
number, message body or secret reaches the logs.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from consumer.events import CampaignRef, InputEvent
from consumer.keys import RedisKeys
from consumer.sandbox import FaultRule, SandboxHandle
from consumer.store import CampaignStore
from consumer.workflow import CampaignState
from tests.daemon import DaemonProcess, DaemonTopics, daemon_environment, free_port
from tests.helpers import REGISTRY, consume, eventually, new_ref, produce, recipients, scheduled

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMO_BODY = "Shop & Co: 20% off with [%PROMO_CODE%] this weekend only!"
MASTER_CONTACTS = 30_000
FIRST_NUMBER = 447_700_000_000
# Contacts whose numbers TextLocal would refuse: resolved as invalid numbers, never sent to.
INVALID_CONTACTS = [
    {"number": 4477000001, "custom1": "INV-1", "first_name": "Ten"},
    {"number": 44770000000123, "custom1": "INV-2", "first_name": "Fourteen"},
    {"number": 12345, "custom1": "INV-3", "first_name": "Short"},
]


@dataclass
class Stack:
    """One test's daemon world: topics, Redis prefix, a seeded sandbox, and daemon processes."""

    bootstrap: str
    topics: DaemonTopics
    store: CampaignStore
    sandbox: SandboxHandle
    template_id: int
    env: dict[str, str]
    tmp_path: Path
    daemons: list[DaemonProcess]

    def daemon(self, name: str = "daemon", **extra: str) -> DaemonProcess:
        env = {**self.env, **extra}
        if "TEXTLOCAL_CONSUMER_HTTP_PORT" not in extra:
            env["TEXTLOCAL_CONSUMER_HTTP_PORT"] = str(free_port())
        process = DaemonProcess(env, self.tmp_path / f"{name}.log")
        self.daemons.append(process)
        return process

    def publish(self, *events: InputEvent | tuple[bytes, bytes]) -> None:
        produce(self.bootstrap, self.topics.input, list(events))

    def campaign(
        self, ref: CampaignRef, customer_ids: list[str], batches: int, **header: Any
    ) -> list[InputEvent]:
        size = -(-len(customer_ids) // batches)
        fields: dict[str, Any] = {
            "recipient_count": len(customer_ids),
            "batch_count": batches,
            "template_id": self.template_id,
            "template_name": "OPT_Promo",
            "promo_codes": ("WEEKEND20",),
            **header,
        }
        events: list[InputEvent] = [scheduled(ref, **fields)]
        for index in range(batches):
            events.append(recipients(ref, index, customer_ids[index * size : (index + 1) * size]))
        return events

    async def state(self, ref: CampaignRef) -> CampaignState | None:
        snapshot = await self.store.load(ref.key)
        return None if snapshot is None else snapshot.state

    async def wait_for_state(
        self, ref: CampaignRef, *states: CampaignState, timeout_s: float = 90.0
    ) -> None:
        async def reached() -> bool:
            return await self.state(ref) in states

        reached.__name__ = f"{ref.key} reaches {[s.value for s in states]}"
        await eventually(reached, timeout_s=timeout_s, interval_s=0.2)

    def statuses(self, expected: int) -> list[dict[str, Any]]:
        """Status events on the status topic (decoded), waiting for at least `expected`."""
        records = consume(self.bootstrap, self.topics.status, expected=expected, timeout_s=30)
        return [REGISTRY.decode(r.value()).fields for r in records]


@pytest.fixture
async def stack(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    redis_url: str,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    topics = DaemonTopics(
        input=new_topic("input", partitions=3),
        status=new_topic("status", partitions=3),
        metrics=new_topic("metrics", partitions=3),
        templates=new_topic("templates", config={"cleanup.policy": "compact"}),
        dlq=new_topic("dlq"),
    )
    group_id = await sandbox.admin.generate_contacts(
        "Optimove customers", MASTER_CONTACTS, first_number=FIRST_NUMBER
    )
    await sandbox.admin.seed_contacts(group_id, None, INVALID_CONTACTS)
    (template_id,) = await sandbox.admin.seed_templates(
        [{"title": "OPT_Promo", "body": PROMO_BODY}]
    )
    env = daemon_environment(
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        key_prefix=key_prefix,
        topics=topics,
        sandbox=sandbox,
        group_id=group_id,
        http_port=free_port(),
    )
    store = CampaignStore(redis_client, RedisKeys(prefix=key_prefix), REGISTRY)
    world = Stack(kafka_bootstrap, topics, store, sandbox, template_id, env, tmp_path, [])
    yield world
    for daemon in world.daemons:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)


def customer_ids(first: int, count: int) -> list[str]:
    return [f"C{i:07d}" for i in range(first, first + count)]


async def assert_one_message_per_recipient(stack: Stack, expected_numbers: int) -> None:
    messages = await stack.sandbox.admin.messages()
    per_number = Counter(m.number for m in messages)
    assert len(per_number) == expected_numbers
    assert max(per_number.values()) == 1, "a recipient got more than one SMS"


def assert_statuses_consistent(statuses: list[dict[str, Any]], ref: CampaignRef) -> list[str]:
    """Each status appears with one event id only (re-emissions are exact duplicates)."""
    ids_by_status: dict[str, set[str]] = defaultdict(set)
    order = []
    for fields in statuses:
        if (fields["tenant_id"], fields["campaign_id"], fields["channel_id"]) != (
            ref.tenant_id,
            ref.campaign_id,
            ref.channel_id,
        ):
            continue
        ids_by_status[fields["status"]].add(fields["event_id"])
        if fields["status"] not in order:
            order.append(fields["status"])
    assert all(len(ids) == 1 for ids in ids_by_status.values()), ids_by_status
    return order


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
    for ref in bad.values():
        assert await stack.state(ref) == CampaignState.REJECTED
    dead = consume(stack.bootstrap, stack.topics.dlq, expected=2)
    assert [m.key() for m in dead] == [b"k1", b"k2"]
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
