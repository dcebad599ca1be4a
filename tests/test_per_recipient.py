"""Per-recipient content against real Redis and the sandbox over HTTP: each SMS still once.

Language variants, customers' own promo codes and personal fields: the executor plans the
campaign's texts, sends each group text to its own segment and the personal ones through
`bulk_json`, and every number gets exactly one SMS, in its language, with its own code and name
(checked from the sandbox's message log, number → text).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import redis.asyncio as aioredis

from consumer.events import CampaignRef
from consumer.steps import StepSettings
from consumer.workflow import CampaignState
from tests.helpers import new_ref
from tests.rigs import WorkflowRig, customer_ids, workflow_rig
from textlocal_sandbox import FaultRule, SandboxHandle

pytestmark = pytest.mark.integration

FIRST_EXTRA = 447_800_000_000
BODIES = {
    "": "Hi from Shop! Your code: [%PROMO_CODE%]",
    "fr": "Bonjour de Shop ! Votre code : [%PROMO_CODE%]",
    "de": "Hallo von Shop! Ihr Code: [%PROMO_CODE%]",
    "it": "Ciao [%FIRST_NAME|amico%]! Codice [%PROMO_CODE%]",
}
LANGUAGES = {"fr": 30, "de": 20, "es": 10, "it": 12}  # es has no variant: the default


def extra_contacts() -> list[dict[str, object]]:
    contacts: list[dict[str, object]] = []
    number = FIRST_EXTRA
    for language, count in LANGUAGES.items():
        for i in range(count):
            contacts.append(
                {
                    "number": number,
                    "custom1": f"L-{language}-{i}",
                    "custom2": language.upper() if i % 2 else language,
                    "first_name": "" if i == 0 else f"N{language}{i}",
                }
            )
            number += 1
    return contacts


@pytest.fixture
async def rig(
    sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str
) -> AsyncIterator[WorkflowRig]:
    async with workflow_rig(
        sandbox,
        redis_client,
        key_prefix,
        contacts=200,
        extra_contacts=extra_contacts(),
        more_templates=[
            {"title": f"OPT_Welcome [{language}]", "body": body}
            for language, body in BODIES.items()
            if language
        ],
        language_field="custom2",
        step_settings=StepSettings(
            send_reconcile_grace=timedelta(seconds=1), max_group_texts=3, bulk_chunk_size=7
        ),
    ) as assembled:
        await assembled.templates.refresh()
        yield assembled


def targeted() -> list[str]:
    ids = customer_ids(1, 50)
    for language, count in LANGUAGES.items():
        ids += [f"L-{language}-{i}" for i in range(count)]
    return ids


def number_of(customer_id: str) -> int:
    if customer_id.startswith("C"):
        return 447_700_000_000 + int(customer_id[1:]) - 1
    _, language, index = customer_id.split("-")
    offset = 0
    for name, count in LANGUAGES.items():
        if name == language:
            return FIRST_EXTRA + offset + int(index)
        offset += count
    raise AssertionError(customer_id)


def expected_text(customer_id: str, code: str) -> str:
    language = customer_id.split("-")[1] if customer_id.startswith("L-") else ""
    body = BODIES.get(language, BODIES[""])
    first = "" if customer_id.endswith("-0") else f"N{language}{customer_id.split('-')[-1]}"
    return body.replace("[%PROMO_CODE%]", code).replace("[%FIRST_NAME|amico%]", first or "amico")


async def texts_by_number(rig: WorkflowRig) -> dict[int, str]:
    messages = await rig.sandbox.admin.messages()
    per_number = Counter(m.number for m in messages)
    assert max(per_number.values()) == 1, "a number got two SMS"
    return {m.number: m.text for m in messages}


async def test_languages_codes_and_names_each_reach_their_recipient_once(
    rig: WorkflowRig,
) -> None:
    """Four variants plus default, own codes and a campaign code: one SMS each, all correct."""
    ref = new_ref()
    ids = targeted()
    own = {cid: f"OWN{i % 2}" for i, cid in enumerate(ids) if i % 3 == 0}
    await rig.submit(ref, ids, batches=3, promo_codes=("SAVE10",), customer_codes=own)
    await rig.executor.run_until_idle()

    snapshot = await rig.snapshot(ref)
    assert snapshot.state == CampaignState.SENT
    texts = await texts_by_number(rig)
    assert len(texts) == len(ids)
    for cid in ids:
        assert texts[number_of(cid)] == expected_text(cid, own.get(cid, "SAVE10")), cid
    calls = await rig.sandbox.admin.call_counts()
    # Group texts: (default, fr, de) × (OWN0, OWN1, SAVE10); Italian has names: personal.
    assert calls["create_group"] == 9
    assert calls["send"] == 9
    assert calls["bulk_json"] == 2  # 12 Italian recipients in chunks of 7
    assert calls["balance"] == 1
    sent = (await rig.statuses(ref))[-1]
    assert sent["status"] == "SENT"
    assert sent["counts"]["matched"] == len(ids)
    kinds = Counter(send["kind"] for send in sent["sends"])
    assert kinds == {"group": 9, "personal": 1}
    assert sum(send["recipients"] for send in sent["sends"]) == len(ids)
    assert {send["language"] for send in sent["sends"] if send["kind"] == "group"} == {
        "",
        "fr",
        "de",
    }


async def test_many_distinct_codes_go_out_personally(rig: WorkflowRig) -> None:
    """More distinct own codes than max_group_texts: each recipient's text through bulk_json."""
    ref = new_ref()
    ids = customer_ids(1, 20)
    own = {cid: f"U{i}" for i, cid in enumerate(ids)}
    await rig.submit(ref, ids, promo_codes=(), customer_codes=own)
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.SENT
    texts = await texts_by_number(rig)
    assert {texts[number_of(cid)] for cid in ids} == {expected_text(cid, own[cid]) for cid in ids}
    calls = await rig.sandbox.admin.call_counts()
    assert calls.get("send", 0) == 0
    assert calls.get("create_group", 0) == 0
    assert calls["bulk_json"] == 3  # 20 in chunks of 7


async def test_customers_without_a_code_are_skipped_and_counted(rig: WorkflowRig) -> None:
    """No campaign code: customers without their own are not sent to, and counted as skipped."""
    ref = new_ref()
    ids = customer_ids(1, 10)
    own = {cid: "ONLY" for cid in ids[:4]}
    await rig.submit(ref, ids, promo_codes=(), customer_codes=own)
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.SENT
    texts = await texts_by_number(rig)
    assert set(texts) == {number_of(cid) for cid in ids[:4]}
    sent = (await rig.statuses(ref))[-1]
    assert sent["counts"]["skipped"] == 6
    assert sent["counts"]["matched"] == 4


async def test_a_campaign_that_would_send_nothing_is_rejected(rig: WorkflowRig) -> None:
    """Codes only for customers nobody can reach: nothing to send, REJECTED NO_PROMO_CODE."""
    ref = new_ref()
    ids = [*customer_ids(1, 5), "UNKNOWN-1"]
    await rig.submit(ref, ids, promo_codes=(), customer_codes={"UNKNOWN-1": "LOST"})
    await rig.executor.run_until_idle()
    snapshot = await rig.snapshot(ref)
    assert snapshot.state == CampaignState.REJECTED
    assert snapshot.error_code == "NO_PROMO_CODE"
    calls = await rig.sandbox.admin.call_counts()
    assert calls.get("send", 0) == 0
    assert calls.get("bulk_json", 0) == 0


async def test_lost_replies_of_sub_sends_are_reconciled_not_resent(rig: WorkflowRig) -> None:
    """A group send and a bulk chunk applied but their replies lost: adopted, never repeated."""
    await rig.sandbox.admin.set_faults(
        [
            FaultRule("drop_after", command="send", limit=1),
            FaultRule("drop_after", command="bulk_json", limit=1),
        ]
    )
    ref = new_ref()
    ids = targeted()
    await rig.submit(ref, ids, batches=2, promo_codes=("SAVE10",))
    for _ in range(6):
        await rig.executor.run_until_idle()
        if await rig.state(ref) == CampaignState.SENT:
            break
        rig.clock.advance(timedelta(seconds=5))
    assert await rig.state(ref) == CampaignState.SENT
    texts = await texts_by_number(rig)
    assert len(texts) == len(ids)
    for cid in ids:
        assert texts[number_of(cid)] == expected_text(cid, "SAVE10"), cid
    calls = await rig.sandbox.admin.call_counts()
    assert calls["send"] == 3  # default, fr, de: the lost one adopted
    assert calls["bulk_json"] == 2  # the Italian chunks: the lost one adopted


async def test_cancelling_a_scheduled_multi_text_campaign_sends_nothing(rig: WorkflowRig) -> None:
    """Scheduled sub-sends are all cancelled at TextLocal; nothing is ever delivered."""
    ref = new_ref()
    ids = targeted()
    await rig.submit(
        ref,
        ids,
        promo_codes=("SAVE10",),
        scheduled_at=rig.clock.now() + timedelta(hours=2),
    )
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.SENT
    assert (await rig.statuses(ref))[-1]["status"] == "SCHEDULED"
    await rig.request_cancel(ref)
    await rig.executor.run_until_idle()
    snapshot = await rig.snapshot(ref)
    assert snapshot.state == CampaignState.CANCELLED
    await rig.sandbox.admin.advance_clock(timedelta(hours=3))
    assert await rig.sandbox.admin.messages() == []


async def test_personal_chunks_go_out_as_kept_at_loading(
    rig: WorkflowRig, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """The send step posts the chunks the load step kept: it needs no contact index, and the
    kept chunks are deleted once the campaign is SENT. (Scheduled: a campaign due now would
    send its chunks as they are cut, see the streaming tests.)"""
    await rig.sandbox.admin.set_faults([FaultRule("http_5xx", command="balance")])
    ref = new_ref()
    ids = customer_ids(1, 20)
    own = {cid: f"U{i}" for i, cid in enumerate(ids)}
    send_at = rig.clock.now() + timedelta(hours=1)
    await rig.submit(ref, ids, promo_codes=(), customer_codes=own, scheduled_at=send_at)
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.CONTACTS_LOADED  # the credit check cannot run
    kept = [await rig.store.personal_chunk(ref.key, number) for number in range(3)]
    assert [len(json.loads(chunk)) for chunk in kept] == [7, 7, 6]
    index_keys = [key async for key in redis_client.scan_iter(match=f"{key_prefix}contacts:*")]
    await redis_client.delete(*index_keys)  # the index is gone (expired, rebuilt elsewhere)
    await rig.sandbox.admin.set_faults([])
    for _ in range(6):
        rig.clock.advance(timedelta(minutes=5))
        await rig.executor.run_until_idle()
        if await rig.state(ref) == CampaignState.SENT:
            break
    assert await rig.state(ref) == CampaignState.SENT
    await rig.sandbox.admin.advance_clock(timedelta(hours=2))
    texts = await texts_by_number(rig)
    assert {texts[number_of(cid)] for cid in ids} == {expected_text(cid, own[cid]) for cid in ids}
    assert (await rig.sandbox.admin.call_counts())["bulk_json"] == 3
    assert not await redis_client.exists(rig.store.keys.personal_chunks(ref.key))


async def test_personal_texts_due_now_go_out_as_they_are_cut(
    rig: WorkflowRig, redis_client: aioredis.Redis
) -> None:
    """A campaign of personal texts only, due now, with credits for the most it could cost:
    SEGMENT_CREATED goes straight to SEND_PENDING after one balance call, each chunk is sent as
    it is cut and none is kept in Redis; the statuses still say SEGMENT_CREATED (with the
    counts, the cost exact) before SENT."""
    ref = new_ref()
    ids = customer_ids(1, 20)
    own = {cid: f"U{i}" for i, cid in enumerate(ids)}
    await rig.submit(ref, ids, batches=2, promo_codes=(), customer_codes=own)
    await rig.executor.run_until_idle()
    snapshot = await rig.snapshot(ref)
    assert snapshot.state == CampaignState.SENT
    assert snapshot.estimated_cost == 20
    texts = await texts_by_number(rig)
    assert {texts[number_of(cid)] for cid in ids} == {expected_text(cid, own[cid]) for cid in ids}
    calls = await rig.sandbox.admin.call_counts()
    assert (calls["balance"], calls["bulk_json"]) == (1, 3)
    assert [s["status"] for s in await rig.statuses(ref)] == ["ACCEPTED", "SEGMENT_CREATED", "SENT"]
    assert (await rig.statuses(ref))[1]["counts"]["matched"] == 20
    assert not await redis_client.exists(rig.store.keys.personal_chunks(ref.key))
    assert transitions(rig, CampaignState.CONTACTS_LOADED) == 0  # never loaded before sending
    assert transitions(rig, CampaignState.SEND_PENDING) == 1


def transitions(rig: WorkflowRig, state: CampaignState) -> float:
    value = rig.metrics.registry.get_sample_value(
        "textlocal_consumer_campaign_transitions_total", {"state": state.value}
    )
    assert value is not None
    return value


async def test_credits_short_of_the_bound_load_first_and_check_the_exact_total(
    rig: WorkflowRig,
) -> None:
    """Credits enough for the texts but not for the most they could cost: no chunk goes out
    before every one is cut and the exact total checked (a second balance call)."""
    await rig.sandbox.admin.set_balance(sms=20)
    ref = new_ref()
    ids = customer_ids(1, 20)
    await rig.submit(
        ref, ids, promo_codes=(), customer_codes={c: f"U{i}" for i, c in enumerate(ids)}
    )
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.SENT
    calls = await rig.sandbox.admin.call_counts()
    assert (calls["balance"], calls["bulk_json"]) == (2, 3)
    assert len(await texts_by_number(rig)) == 20
    assert transitions(rig, CampaignState.CONTACTS_LOADED) == 1


async def stream_with_a_lost_reply(
    rig: WorkflowRig,
) -> tuple[CampaignRef, list[str], dict[str, str]]:
    """A stream of 20 personal texts (chunks of 7) whose first bulk_json is applied and its
    reply lost: the step stops in SEND_PENDING, to be retried after the grace."""
    ref = new_ref()
    ids = customer_ids(1, 20)
    own = {cid: f"U{i}" for i, cid in enumerate(ids)}
    await rig.sandbox.admin.set_faults([FaultRule("drop_after", command="bulk_json", limit=1)])
    await rig.submit(ref, ids, batches=3, promo_codes=(), customer_codes=own)
    await rig.executor.run_until_idle()
    assert await rig.state(ref) == CampaignState.SEND_PENDING
    return ref, ids, own


async def test_a_stream_whose_reply_was_lost_resumes_without_a_second_sms(
    rig: WorkflowRig, redis_client: aioredis.Redis
) -> None:
    """The first bulk_json applied and its reply lost, mid-stream: the step stops starting
    chunks and is retried after the grace; resumed, the chunks are cut the same, the lost one
    found in TextLocal's history and adopted, the others sent once."""
    ref, ids, own = await stream_with_a_lost_reply(rig)
    for _ in range(6):
        rig.clock.advance(timedelta(seconds=30))
        await rig.executor.run_until_idle()
        if await rig.state(ref) == CampaignState.SENT:
            break
    assert await rig.state(ref) == CampaignState.SENT
    texts = await texts_by_number(rig)  # no number twice
    assert {texts[number_of(cid)] for cid in ids} == {expected_text(cid, own[cid]) for cid in ids}
    assert len(texts) == 20
    assert (await rig.sandbox.admin.call_counts())["bulk_json"] == 3
    assert (await rig.sandbox.admin.faults_fired()) == [1]
    # every recipient's number kept for CustomerOutcomes, across both runs of the stream
    assert await redis_client.hlen(rig.store.keys.recipient_numbers(ref.key)) == 20


async def test_a_cancel_during_a_stream_is_refused_once_every_chunk_is_out(
    rig: WorkflowRig,
) -> None:
    """Chunks already gone cannot be told apart from the rest until cut: a cancel arriving
    while the stream waits out a lost reply finishes the stream (each number once), then is
    refused (SENT, CANCEL_TOO_LATE)."""
    ref, _, _ = await stream_with_a_lost_reply(rig)
    await rig.request_cancel(ref)
    for _ in range(6):
        rig.clock.advance(timedelta(seconds=30))
        await rig.executor.run_until_idle()
        if not (await rig.snapshot(ref)).cancel_requested:
            break
    assert await rig.state(ref) == CampaignState.SENT
    assert len(await texts_by_number(rig)) == 20
    last = (await rig.statuses(ref))[-1]
    assert (last["status"], last["error"]["code"]) == ("SENT", "CANCEL_TOO_LATE")
