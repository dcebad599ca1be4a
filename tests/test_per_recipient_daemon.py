"""Per-recipient content through the daemon as a real process: Kafka in, the sandbox over HTTP.

A campaign in three languages plus the default, with customers' own promo codes and a variant
with first names (so both segments and `bulk_json` in one campaign): SIGKILLed at every
sub-send boundary and inside the chunking, then restarted; and through 20% TextLocal faults
including replies lost after the call was applied. No number ever gets two SMS, none is missed,
and each reads its own text (the sandbox's message log, number → text).
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from consumer.events import CampaignRef, CampaignScheduled, InputEvent
from consumer.workflow import CampaignState
from tests.daemon import FIRST_NUMBER, PROMO_BODY, Stack, customer_ids
from tests.helpers import cancelled, new_ref, recipients, scheduled
from textlocal_sandbox import FaultRule

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIRST_EXTRA = 447_900_000_000
VARIANTS = {
    "fr": "Shop & Co : -20 % avec [%PROMO_CODE%] ce week-end !",
    "de": "Shop & Co: 20 % Rabatt mit [%PROMO_CODE%] am Wochenende!",
    "it": "Ciao [%FIRST_NAME|amico%], 20% con [%PROMO_CODE%]!",
}
PER_LANGUAGE = {"fr": 300, "de": 200, "it": 230, "es": 50}  # es: no variant, the default


async def prepare(stack: Stack) -> dict[str, str]:
    """Variant templates, contacts with a language (custom2), and settings that use them."""
    await stack.sandbox.admin.seed_templates(
        [{"title": f"OPT_Promo [{lang}]", "body": body} for lang, body in VARIANTS.items()]
    )
    groups = json.loads(stack.env["TEXTLOCAL_CONSUMER_CONTACT_GROUPS"])
    contacts: list[dict[str, object]] = []
    number = FIRST_EXTRA
    for language, count in PER_LANGUAGE.items():
        for i in range(count):
            contacts.append(
                {
                    "number": number,
                    "custom1": f"L-{language}-{i}",
                    "custom2": language,
                    "first_name": "" if i % 10 == 0 else f"N{i}",
                }
            )
            number += 1
    await stack.sandbox.admin.seed_contacts(groups[0]["id"], None, contacts)
    groups[0]["language_field"] = "custom2"
    return {
        "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": json.dumps(groups),
        "TEXTLOCAL_CONSUMER_WORKFLOW_BULK_CHUNK_SIZE": "50",
    }


def campaign(stack: Stack, ref: CampaignRef) -> tuple[list[InputEvent], dict[int, str]]:
    """The events and, number by number, the text each recipient must read."""
    ids = customer_ids(1, 1_000) + [
        f"L-{language}-{i}" for language, count in PER_LANGUAGE.items() for i in range(count)
    ]
    own = {cid: ("OWN-A" if n % 2 else "OWN-B") for n, cid in enumerate(ids) if n % 5 == 0}
    events = campaign_events(stack, ref, ids, own, ("WEEKEND20",))
    expected: dict[int, str] = {}
    offsets = {}
    position = 0
    for language, count in PER_LANGUAGE.items():
        offsets[language] = position
        position += count
    for cid in ids:
        code = own.get(cid, "WEEKEND20")
        if cid.startswith("C"):
            expected[FIRST_NUMBER + int(cid[1:]) - 1] = PROMO_BODY.replace("[%PROMO_CODE%]", code)
            continue
        _, language, index_text = cid.split("-")
        body = VARIANTS.get(language, PROMO_BODY)
        first = "" if int(index_text) % 10 == 0 else f"N{index_text}"
        text = body.replace("[%PROMO_CODE%]", code).replace(
            "[%FIRST_NAME|amico%]", first or "amico"
        )
        expected[FIRST_EXTRA + offsets[language] + int(index_text)] = text
    return events, expected


def campaign_events(
    stack: Stack,
    ref: CampaignRef,
    ids: list[str],
    own: dict[str, str],
    promo_codes: tuple[str, ...],
    batches: int = 4,
) -> list[InputEvent]:
    """An OPT_Promo campaign due now: its header, then the recipients in `batches` events,
    each customer with their own code if in `own`."""
    events: list[InputEvent] = [
        scheduled(
            ref,
            recipient_count=len(ids),
            batch_count=batches,
            template_id=stack.template_id,
            template_name="OPT_Promo",
            promo_codes=promo_codes,
        )
    ]
    size = -(-len(ids) // batches)
    for index in range(batches):
        chunk = ids[index * size : (index + 1) * size]
        batch = recipients(ref, index, chunk)
        events.append(
            replace(
                batch,
                customers_with_promo_code=sum(1 for c in chunk if c in own),
                promo_codes=tuple(own.get(c, "") for c in chunk),
            )
        )
    return events


async def assert_texts(stack: Stack, expected: dict[int, str]) -> None:
    messages = await stack.sandbox.admin.messages()
    per_number = Counter(m.number for m in messages)
    assert max(per_number.values()) == 1, "a number got two SMS"
    texts = {m.number: m.text for m in messages}
    assert set(texts) == set(expected), "a recipient was missed, or someone else got an SMS"
    wrong = [n for n in expected if texts[n] != expected[n]]
    assert not wrong, f"{len(wrong)} recipients read the wrong text"


def sent_event(stack: Stack, ref: CampaignRef, expected: int) -> dict[str, Any]:
    found = [s for s in stack.statuses(expected=expected) if s["campaign_id"] == ref.campaign_id]
    return next(s for s in found if s["status"] == "SENT")


@pytest.mark.parametrize(
    "kill_at",
    [
        "segment.created:3",
        "contacts.chunk_loaded:2",
        "send.returned:2",
        "personal.chunk_sent:2",
        "send.recorded",
    ],
)
async def test_sigkill_at_every_sub_send_boundary_still_sends_each_text_once(
    stack: Stack, kill_at: str
) -> None:
    """Killed at a sub-send boundary and restarted: each number one SMS, its own text."""
    settings = await prepare(stack)
    ref = new_ref()
    events, expected = campaign(stack, ref)
    first = stack.daemon("first", TEXTLOCAL_CONSUMER_TEST_KILL_AT=kill_at, **settings).start()
    await first.wait_ready()
    stack.publish(*events)
    assert await first.wait_exit(timeout_s=120) == -signal.SIGKILL
    second = stack.daemon("second", **settings).start()
    await stack.wait_for_state(ref, CampaignState.SENT, timeout_s=180)
    await assert_texts(stack, expected)
    sent = sent_event(stack, ref, expected=3)
    assert sent["counts"]["matched"] == len(expected)
    assert Counter(s["kind"] for s in sent["sends"])["personal"] == 1
    assert await second.stop() == 0


async def test_textlocal_faults_and_lost_replies_never_double_a_sub_send(stack: Stack) -> None:
    """20% faults, replies lost after the call applied included: each text once to each."""
    settings = await prepare(stack)
    await stack.sandbox.admin.set_faults(
        [
            FaultRule("http_5xx", rate=0.07, status=503),
            FaultRule("http_429", rate=0.05, retry_after_s=1),
            FaultRule("drop_before", rate=0.03),
            FaultRule("drop_after", rate=0.05),
        ],
        seed=11,
    )
    ref = new_ref()
    events, expected = campaign(stack, ref)
    daemon = stack.daemon(TEXTLOCAL_CONSUMER_TEXTLOCAL_REQUEST_TIMEOUT_S="3", **settings).start()
    await daemon.wait_ready()
    stack.publish(*events)
    await stack.wait_for_state(ref, CampaignState.SENT, timeout_s=240)
    assert len(await stack.sandbox.admin.faults_fired()) > 0
    await assert_texts(stack, expected)
    assert await daemon.stop() == 0


async def test_a_scheduled_multi_text_campaign_cancelled_delivers_nothing(stack: Stack) -> None:
    """Every scheduled sub-send (segments and bulk chunks) is cancelled: nothing arrives."""
    settings = await prepare(stack)
    ref = new_ref()
    events, _ = campaign(stack, ref)
    header = events[0]
    assert isinstance(header, CampaignScheduled)
    events[0] = replace(header, scheduled_at=datetime.now(UTC) + timedelta(hours=2))
    daemon = stack.daemon(**settings).start()
    await daemon.wait_ready()
    stack.publish(*events)
    await stack.wait_for_state(ref, CampaignState.SENT, timeout_s=120)
    scheduled_sends = len(await stack.sandbox.admin.batches())
    assert scheduled_sends > 3
    stack.publish(cancelled(ref))
    await stack.wait_for_state(ref, CampaignState.CANCELLED, timeout_s=120)
    await stack.sandbox.admin.advance_clock(timedelta(hours=3))
    assert await stack.sandbox.admin.messages() == []
    assert await daemon.stop() == 0


async def test_sigkill_while_chunks_are_sent_as_they_are_cut(stack: Stack) -> None:
    """A campaign of personal texts only (a code per customer), due now: its chunks go out
    while the rest are still being cut. Killed after the third chunk's call returned, before it
    was recorded (two more may be under way), and restarted: each number one SMS, its own code."""
    ref = new_ref()
    ids = customer_ids(1, 1_000)
    own = {cid: f"C0DE{n:04d}" for n, cid in enumerate(ids)}
    events = campaign_events(stack, ref, ids, own, ())
    expected = {
        FIRST_NUMBER + int(cid[1:]) - 1: PROMO_BODY.replace("[%PROMO_CODE%]", own[cid])
        for cid in ids
    }
    settings = {"TEXTLOCAL_CONSUMER_WORKFLOW_BULK_CHUNK_SIZE": "50"}
    first = stack.daemon(
        "first", TEXTLOCAL_CONSUMER_TEST_KILL_AT="personal.chunk_sent:3", **settings
    ).start()
    await first.wait_ready()
    stack.publish(*events)
    assert await first.wait_exit(timeout_s=120) == -signal.SIGKILL
    assert "campaign.streaming" in [event["event"] for event in first.events()]
    assert 3 <= (await stack.sandbox.admin.call_counts())["bulk_json"] < 20  # mid-stream
    second = stack.daemon("second", **settings).start()
    await stack.wait_for_state(ref, CampaignState.SENT, timeout_s=180)
    await assert_texts(stack, expected)
    sent = sent_event(stack, ref, expected=3)
    assert sent["counts"]["matched"] == len(ids)
    assert await second.stop() == 0
