"""The executor against real Redis and the sandbox over HTTP: one segment, one send, no more."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import redis.asyncio as aioredis

from consumer.errors import TransientError
from consumer.executor import Executor, ExecutorSettings
from consumer.leased_work import Lease
from consumer.steps import CampaignRun, StepSettings
from consumer.workflow import CampaignState, segment_group_name
from tests.helpers import REGISTRY, new_ref
from tests.rigs import WorkflowRig, customer_ids, workflow_rig
from textlocal_sandbox import FaultRule, SandboxHandle

pytestmark = pytest.mark.integration

INVALID_NUMBER_CONTACTS = [
    {"number": 12345, "custom1": "BAD0001", "first_name": "Short"},
    {"number": 44770090012345, "custom1": "BAD0002", "first_name": "TooLongUK"},
    {"number": 4412345678, "custom1": "BAD0003", "first_name": "TooShortUK"},
]


@pytest.fixture
async def rig(
    sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str
) -> AsyncIterator[WorkflowRig]:
    async with workflow_rig(
        sandbox, redis_client, key_prefix, extra_contacts=INVALID_NUMBER_CONTACTS
    ) as assembled:
        yield assembled


async def test_campaign_is_sent_once_to_each_matched_valid_number(rig: WorkflowRig) -> None:
    """Matched customers with valid numbers get exactly one SMS; the counts say who did not."""
    ref = new_ref()
    targeted = [*customer_ids(1, 600), "NOPE1", "NOPE2", "BAD0001", "BAD0002", "BAD0003"]
    targeted += customer_ids(1, 5)  # five repeated customer ids
    await rig.submit(ref, targeted, batches=3)
    await rig.executor.run_until_idle()

    snapshot = await rig.snapshot(ref)
    assert snapshot.state == CampaignState.SENT
    messages = await rig.sandbox.admin.messages(snapshot.batch_id)
    numbers = Counter(m.number for m in messages)
    assert len(numbers) == 600
    assert set(numbers.values()) == {1}
    assert {m.text for m in messages} == {"Hi from Shop! Your code: SAVE10"}
    statuses = await rig.statuses(ref)
    assert [s["status"] for s in statuses] == ["ACCEPTED", "SEGMENT_CREATED", "SENT"]
    assert statuses[-1]["counts"] == {
        "requested": 610,
        "matched": 600,
        "unmatched": 2,
        "invalid_numbers": 3,
        "duplicates": 5,
        "skipped": 0,
    }
    assert statuses[-1]["batch_id"] == snapshot.batch_id
    assert statuses[-1]["metadata"] == {"journey": "welcome"}
    calls = await rig.sandbox.admin.call_counts()
    assert calls["send"] == 1
    assert calls["create_group"] == 1


async def test_contacts_are_loaded_in_chunks_of_at_most_1500(rig: WorkflowRig) -> None:
    """3,200 recipients are loaded with three create_contacts_bulk calls into one segment."""
    async with workflow_rig(
        rig.sandbox, rig.store.redis, rig.store.keys.prefix + "big:", contacts=3200
    ) as big:
        ref = new_ref()
        await big.submit(ref, customer_ids(1, 3200), batches=1)
        await rig.sandbox.admin.reset_call_counts()
        await big.executor.run_until_idle()
        snapshot = await big.snapshot(ref)
        assert snapshot.state == CampaignState.SENT
        calls = await rig.sandbox.admin.call_counts()
        assert calls["create_contacts_bulk"] == 3
        assert await rig.sandbox.admin.group_size(snapshot.group_id or 0) == 3200


async def test_future_send_is_scheduled_and_cancellation_removes_it(rig: WorkflowRig) -> None:
    """A send two hours ahead is scheduled at TextLocal; cancelled, nothing is delivered."""
    ref = new_ref()
    await rig.submit(ref, customer_ids(1, 50), scheduled_at=rig.clock.now() + timedelta(hours=2))
    await rig.executor.run_until_idle()
    snapshot = await rig.snapshot(ref)
    assert snapshot.state == CampaignState.SENT
    scheduled = await rig.client.get_scheduled()
    assert [s.group_id for s in scheduled] == [snapshot.group_id]
    assert [s["status"] for s in await rig.statuses(ref)][-1] == "SCHEDULED"

    await rig.request_cancel(ref)
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.CANCELLED
    assert await rig.client.get_scheduled() == []
    rig.clock.advance(timedelta(hours=3))
    assert await rig.sandbox.admin.messages() == []
    assert [s["status"] for s in await rig.statuses(ref)][-1] == "CANCELLED"


async def test_cancel_after_the_send_is_refused_clearly(rig: WorkflowRig) -> None:
    """Cancelling a campaign already sent leaves it SENT and says CANCEL_TOO_LATE."""
    ref = new_ref()
    await rig.submit(ref, customer_ids(1, 10))
    await rig.executor.run_until_idle()
    await rig.request_cancel(ref)
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.SENT
    last = (await rig.statuses(ref))[-1]
    assert last["status"] == "SENT"
    assert last["error"] == {
        "code": "CANCEL_TOO_LATE",
        "message": "the campaign was already sent; it cannot be cancelled",
    }
    assert len(await rig.sandbox.admin.messages()) == 10


async def test_cancel_before_the_send_deletes_the_segment(rig: WorkflowRig) -> None:
    """A cancellation with the segment loaded deletes the group and sends nothing."""
    ref = new_ref()
    await rig.submit(ref, customer_ids(1, 10))
    run_snapshot = await rig.snapshot(ref)
    assert run_snapshot.state == CampaignState.READY
    # Take the campaign up to CONTACTS_LOADED by hand, then cancel.
    lease = rig.store.keys.campaign_lease(ref.key)
    assert await rig.store.acquire_lease(lease, "test-replica", 10_000)
    run = CampaignRun(run_snapshot, Lease(lease, "test-replica"))
    await rig.steps.create_segment(run)
    await rig.steps.load_contacts(run)
    await rig.store.release_lease(lease, "test-replica")
    group_id = run.snapshot.group_id
    assert group_id in await rig.sandbox.admin.groups()

    await rig.request_cancel(ref)
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.CANCELLED
    assert group_id not in await rig.sandbox.admin.groups()
    assert await rig.sandbox.admin.messages() == []


async def test_lost_send_reply_is_reconciled_not_resent(rig: WorkflowRig) -> None:
    """When TextLocal applies the send but the reply is lost, the send is adopted, not repeated."""
    await rig.sandbox.admin.set_faults([FaultRule("drop_after", command="send", limit=1)])
    ref = new_ref()
    await rig.submit(ref, customer_ids(1, 20))
    await rig.executor.run_until_idle()
    snapshot = await rig.snapshot(ref)
    assert snapshot.state == CampaignState.SENT
    assert (await rig.sandbox.admin.call_counts())["send"] == 1
    messages = await rig.sandbox.admin.messages()
    assert len(messages) == 20
    assert {m.batch_id for m in messages} == {snapshot.batch_id}


async def test_dropped_send_request_is_sent_again_after_the_grace(rig: WorkflowRig) -> None:
    """When the connection drops before TextLocal applied the send, one later resend goes out."""
    await rig.sandbox.admin.set_faults([FaultRule("drop_before", command="send", limit=1)])
    ref = new_ref()
    await rig.submit(ref, customer_ids(1, 20))
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.SEND_PENDING  # waiting out the grace
    rig.clock.advance(timedelta(seconds=5))
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.SENT
    assert (await rig.sandbox.admin.call_counts())["send"] == 2
    assert len(await rig.sandbox.admin.messages()) == 20


async def test_short_balance_fails_the_campaign_before_sending(rig: WorkflowRig) -> None:
    """A balance below parts × recipients fails the campaign with INSUFFICIENT_CREDITS."""
    await rig.sandbox.admin.set_balance(sms=5)
    ref = new_ref()
    await rig.submit(ref, customer_ids(1, 10))
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.FAILED
    last = (await rig.statuses(ref))[-1]
    assert last["status"] == "FAILED"
    assert last["error"]["code"] == "INSUFFICIENT_CREDITS"
    assert "needs 10 credits" in last["error"]["message"]
    assert (await rig.sandbox.admin.call_counts()).get("send", 0) == 0
    segment_names = [name for name, _ in (await rig.sandbox.admin.groups()).values()]
    assert not [name for name in segment_names if name.startswith("OPT_seg-")]


async def test_unknown_template_rejects_the_campaign(rig: WorkflowRig) -> None:
    """A template id TextLocal does not have rejects the campaign with UNKNOWN_TEMPLATE."""
    ref = new_ref()
    await rig.submit(ref, customer_ids(1, 5), template_id=999_999)
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.REJECTED
    assert (await rig.statuses(ref))[-1]["error"]["code"] == "UNKNOWN_TEMPLATE"


async def test_missing_promo_code_rejects_the_campaign(rig: WorkflowRig) -> None:
    """A template with a promo placeholder and a campaign without a code is rejected."""
    ref = new_ref()
    await rig.submit(ref, customer_ids(1, 5), promo_codes=())
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.REJECTED
    assert (await rig.statuses(ref))[-1]["error"]["code"] == "PROMO_CODE_MISSING"


async def test_no_matching_customer_fails_the_campaign(rig: WorkflowRig) -> None:
    """A campaign whose customers are all unknown fails with NO_RECIPIENTS; its segment goes."""
    ref = new_ref()
    await rig.submit(ref, ["X1", "X2"])
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.FAILED
    assert (await rig.statuses(ref))[-1]["error"]["code"] == "NO_RECIPIENTS"
    assert (await rig.sandbox.admin.call_counts()).get("send", 0) == 0
    names = [name for name, _ in (await rig.sandbox.admin.groups()).values()]
    assert not [name for name in names if name.startswith("OPT_seg-")]


async def test_incomplete_batches_fail_after_the_collect_timeout(rig: WorkflowRig) -> None:
    """A campaign still missing batches at its deadline fails with BATCHES_INCOMPLETE."""
    ref = new_ref()
    await rig.submit(ref, customer_ids(1, 10), batches=1)
    # Forge a second expected batch by submitting a header that wants two.
    other = new_ref()
    await rig.submit(other, customer_ids(1, 4), batches=2)
    keys = rig.store.keys
    await rig.store.redis.srem(keys.batches(other.key), "1")
    await rig.store.redis.hset(keys.campaign(other.key), "state", "COLLECTING")
    await rig.store.unschedule(keys.work_queue, other.key)
    await rig.store.reschedule(keys.collecting_queue, other.key, rig.clock.now())
    rig.clock.advance(timedelta(hours=7))
    await rig.executor.run_until_idle()
    assert await rig.state(other) == CampaignState.FAILED
    error = (await rig.statuses(other))[-1]["error"]
    assert error["code"] == "BATCHES_INCOMPLETE"
    assert "1 of 2 recipient batches" in error["message"]


async def test_two_replicas_send_each_campaign_once(
    sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """Two executors sharing Redis never both work on one campaign: each is sent once."""
    async with workflow_rig(sandbox, redis_client, key_prefix, contacts=300) as first:
        second = Executor(
            first.store,
            first.steps,
            REGISTRY,
            ExecutorSettings(lease_ttl=timedelta(seconds=10)),
            first.clock,
            first.metrics,
            owner="other-replica",
        )
        refs = [new_ref() for _ in range(8)]
        for number, ref in enumerate(refs):
            await first.submit(ref, customer_ids(number * 30 + 1, 30))
        await asyncio.gather(first.executor.run_until_idle(), second.run_until_idle())
        for ref in refs:
            assert await first.state(ref) == CampaignState.SENT
        assert (await sandbox.admin.call_counts())["send"] == 8
        numbers = Counter(m.number for m in await sandbox.admin.messages())
        assert len(numbers) == 240
        assert set(numbers.values()) == {1}


class FailAtSecondChunk:
    """A fault point that fails the step once, right after the second chunk was recorded."""

    def __init__(self) -> None:
        self.chunks = 0

    def reached(self, point: str) -> None:
        if point == "contacts.chunk_loaded":
            self.chunks += 1
            if self.chunks == 2:
                raise TransientError("test: interrupted after the second chunk")


async def test_interrupted_loading_resumes_without_reloading(
    sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """Loading stopped once the second of three chunks was recorded resumes with the chunks
    not recorded only (the third, unless a loader had it recorded too), then sends once."""
    async with workflow_rig(
        sandbox,
        redis_client,
        key_prefix,
        contacts=3200,
        faults=FailAtSecondChunk(),
        step_settings=StepSettings(contact_load_concurrency=1),
    ) as rig:
        ref = new_ref()
        await rig.submit(ref, customer_ids(1, 3200))
        await rig.executor.run_until_idle()
        assert await rig.state(ref) == CampaignState.SEGMENT_CREATED
        before = (await sandbox.admin.call_counts())["create_contacts_bulk"]
        recorded = await rig.store.loaded_chunks(ref.key)
        assert len(recorded) >= 2
        assert before >= len(recorded)
        rig.clock.advance(timedelta(minutes=1))  # past the retry backoff
        await rig.executor.run_until_idle()
        snapshot = await rig.snapshot(ref)
        assert snapshot.state == CampaignState.SENT
        after = (await sandbox.admin.call_counts())["create_contacts_bulk"]
        assert after - before == 3 - len(recorded)  # nothing recorded is loaded again
        assert await sandbox.admin.group_size(snapshot.group_id or 0) == 3200
        assert len(await sandbox.admin.messages()) == 3200


async def test_a_recorded_step_resets_the_back_off(rig: WorkflowRig) -> None:
    """Transient failures in a row grow the back-off; the next recorded step starts it afresh."""
    ref = new_ref()
    await rig.submit(ref, customer_ids(1, 20), batches=1)
    assert await rig.store.count_step_retry(ref.key) == 1
    assert await rig.store.count_step_retry(ref.key) == 2
    await rig.executor.run_until_idle()
    snapshot = await rig.snapshot(ref)
    assert snapshot.state == CampaignState.SENT
    assert "failures" not in snapshot.fields
    assert await rig.store.count_step_retry(ref.key) == 1


async def test_a_group_name_this_campaign_never_asked_for_is_not_adopted(
    rig: WorkflowRig,
) -> None:
    """A group of the campaign's name that it did not create is someone else's: FAILED."""
    ref = new_ref()
    await rig.submit(ref, customer_ids(1, 20), batches=1)
    snapshot = await rig.snapshot(ref)
    assert snapshot.header is not None
    name = segment_group_name(rig.group, ref, snapshot.header.event_id)
    await rig.client.create_group(name)
    await rig.executor.run_until_idle()
    snapshot = await rig.snapshot(ref)
    assert snapshot.state == CampaignState.FAILED
    assert snapshot.error_code == "SEGMENT_NAME_TAKEN"
    assert (await rig.sandbox.admin.call_counts()).get("send", 0) == 0
