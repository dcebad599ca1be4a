"""No record, however strange or large, stops the pipeline or crosses two campaigns.

The daemon runs as a real process against the real broker, Redis and the sandbox over HTTP; the
records are what a hostile or buggy producer could publish: validly encoded events with values
the daemon cannot compute with, ids that differ only in characters a name drops, records near
the broker's size limit, forged headers, reused event ids, and a campaign whose stored record
no longer decodes.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from confluent_kafka import Producer

from consumer.events import CampaignRef
from consumer.outbox import STATUS
from consumer.store import OutboxEntry
from consumer.workflow import CampaignState
from tests.daemon import FIRST_NUMBER, Stack, customer_ids
from tests.helpers import consume, encode, eventually, new_ref, scheduled

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The broker's default record-batch limit (message.max.bytes) on the local stack.
BROKER_LIMIT_BYTES = 1_048_588


def produce_raw(
    bootstrap: str, topic: str, records: list[tuple[bytes, bytes, list[tuple[str, Any]]]]
) -> None:
    """Publish raw records with headers, allowing records up to the broker's own limit."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "message.max.bytes": BROKER_LIMIT_BYTES + 1_000}
    )
    for key, value, headers in records:
        producer.produce(topic, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0


def statuses_of(stack: Stack, expected: int) -> list[dict[str, Any]]:
    return stack.statuses(expected=expected)


async def test_ids_differing_only_in_dropped_characters_never_share_a_segment(
    stack: Stack,
) -> None:
    """Campaign ids alike but for unsafe, non-ASCII or late characters: own group, own SMS."""
    ids = ["col:1", "col 1", "col_1", "Ä", "Ö", "x" * 50 + "a", "x" * 50 + "b"]
    refs = [CampaignRef(77, campaign_id, 505) for campaign_id in ids]
    customers = {ref: customer_ids(1 + 15 * i, 15) for i, ref in enumerate(refs)}
    daemon = stack.daemon().start()
    await daemon.wait_ready()
    for ref in refs:
        stack.publish(*stack.campaign(ref, customers[ref], batches=1))
    for ref in refs:
        await stack.wait_for_state(ref, CampaignState.SENT)

    sent = {s["campaign_id"]: s for s in statuses_of(stack, 3 * len(refs)) if s["status"] == "SENT"}
    assert set(sent) == set(ids)
    assert len({s["textlocal_group_id"] for s in sent.values()}) == len(ids)
    all_numbers: Counter[int] = Counter()
    for ref in refs:
        messages = await stack.sandbox.admin.messages(sent[ref.campaign_id]["batch_id"])
        numbers = {m.number for m in messages}
        # C0000001 has the first generated number; each campaign reaches exactly its own 15.
        first = int(customers[ref][0][1:])
        assert numbers == {FIRST_NUMBER + first - 1 + i for i in range(15)}
        assert sent[ref.campaign_id]["cost_credits"] == 15
        all_numbers.update(m.number for m in messages)
    assert max(all_numbers.values()) == 1
    assert await daemon.stop() == 0


async def test_values_nothing_can_compute_with_are_rejected_and_the_next_campaign_goes_out(
    stack: Stack,
) -> None:
    """Far-future send times, absurd batch counts, big metadata, reused ids: each REJECTED."""
    now = datetime.now(UTC)
    bad: dict[str, tuple[CampaignRef, dict[str, Any]]] = {
        "SEND_TIME_TOO_FAR": (
            new_ref(),
            {"scheduled_at": datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)},
        ),
        "SEND_TIME_TOO_FAR/400d": (new_ref(), {"scheduled_at": now + timedelta(days=400)}),
        "INVALID_FIELD": (new_ref(), {"batch_count": 10**9}),
        "METADATA_TOO_LARGE": (new_ref(), {"metadata": {"blob": "m" * 20_000}}),
    }
    first, reuser, good = new_ref(), new_ref(), new_ref()
    daemon = stack.daemon().start()
    await daemon.wait_ready()
    for ref, header in bad.values():
        stack.publish(stack.campaign(ref, customer_ids(1, 5), 1, **header)[0])
    stack.publish(*stack.campaign(first, customer_ids(1, 5), 1, event_id="shared-event-id"))
    stack.publish(stack.campaign(reuser, customer_ids(6, 5), 1, event_id="shared-event-id")[0])
    stack.publish(*stack.campaign(good, customer_ids(100, 20), batches=1))

    await stack.wait_for_state(good, CampaignState.SENT)
    await stack.wait_for_state(first, CampaignState.SENT)
    for ref, _ in bad.values():
        await stack.wait_for_state(ref, CampaignState.REJECTED)
    await stack.wait_for_state(reuser, CampaignState.REJECTED)
    rejected = {s["campaign_id"]: s for s in statuses_of(stack, 13) if s["status"] == "REJECTED"}
    for reason, (ref, _) in bad.items():
        assert rejected[ref.campaign_id]["error"]["code"] == reason.split("/")[0]
    assert rejected[reuser.campaign_id]["error"]["code"] == "EVENT_ID_REUSED"
    # Metadata over the bound is not echoed: the REJECTED event stays small.
    assert rejected[bad["METADATA_TOO_LARGE"][0].campaign_id]["metadata"] == {}
    calls = await stack.sandbox.admin.call_counts()
    assert calls["send"] == 2  # first and good; nothing built for the rejected ones
    assert calls["create_group"] == 2
    status, _ = await daemon.health("/healthz")
    assert status == 200
    assert await daemon.stop() == 0


async def test_records_near_the_size_limit_do_not_stop_intake_or_the_outbox(stack: Stack) -> None:
    """Records near the broker's limit are dead-lettered or rejected; later campaigns flow."""
    big_garbage = os.urandom(BROKER_LIMIT_BYTES - 2_000)
    big_metadata_ref, good = new_ref(), new_ref()
    big_metadata = scheduled(
        big_metadata_ref,
        recipient_count=5,
        batch_count=1,
        template_id=stack.template_id,
        template_name="OPT_Promo",
        metadata={"blob": "m" * 1_000_000},
    )
    daemon = stack.daemon().start()
    await daemon.wait_ready()
    # An event Kafka refuses on the way out (too large for any topic) sits in the outbox
    # ahead of everything the campaigns below produce: it must not hold them up.
    await stack.store.add_to_outbox(
        [OutboxEntry(topic=STATUS, key="1:huge:1", value=b"h" * 2_000_000, event_id="huge")]
    )
    produce_raw(
        stack.bootstrap,
        stack.topics.input,
        [
            (b"big", big_garbage, [("dlq.error.class", b"Forged"), ("trace", None)]),
            (big_metadata_ref.key.encode(), encode(big_metadata), []),
        ],
    )
    stack.publish(*stack.campaign(good, customer_ids(1, 30), batches=1))

    await stack.wait_for_state(good, CampaignState.SENT)
    await stack.wait_for_state(big_metadata_ref, CampaignState.REJECTED)
    codes = [
        (s["campaign_id"], s["status"], (s["error"] or {}).get("code"))
        for s in statuses_of(stack, 4)
    ]
    assert (big_metadata_ref.campaign_id, "REJECTED", "METADATA_TOO_LARGE") in codes
    assert [status for cid, status, _ in codes if cid == good.campaign_id] == [
        "ACCEPTED",
        "SEGMENT_CREATED",
        "SENT",
    ]
    (dead,) = consume(stack.bootstrap, stack.topics.dlq, expected=1)
    headers = dict(dead.headers())
    assert dead.key() == b"big"
    assert headers["dlq.error.class"] == b"CodecError"
    assert headers["input.dlq.error.class"] == b"Forged"
    assert headers["trace"] is None
    assert headers["dlq.truncated"] == b"true"
    assert headers["dlq.original.value.bytes"] == str(len(big_garbage)).encode()
    assert dead.value() == big_garbage[: len(dead.value())]
    assert int(headers["dlq.source.offset"]) >= 0

    set_aside = await stack.store.outbox_set_aside_entries()
    assert [entry.event_id for entry in set_aside] == ["huge"]
    status, _ = await daemon.health("/healthz")
    assert status == 200
    metrics = await daemon_metrics(daemon.http_port)
    assert 'textlocal_consumer_outbox_set_aside_total{kind="status"} 1.0' in metrics
    assert await daemon.stop() == 0


async def test_a_campaign_whose_handler_keeps_failing_ends_failed_and_others_go_out(
    stack: Stack, redis_client: aioredis.Redis
) -> None:
    """A stored campaign that no longer decodes fails K times, then ends FAILED INTERNAL_ERROR."""
    broken, good = new_ref(), new_ref()
    keys = stack.store.keys
    await redis_client.hset(
        keys.campaign(broken.key),
        mapping={"state": "READY", "header": b"\xc3\x01not-a-record", "requested": 3},
    )
    await redis_client.zadd(keys.work_queue, {broken.key: 0})
    daemon = stack.daemon(
        TEXTLOCAL_CONSUMER_WORKFLOW_MAX_HANDLER_FAILURES="3",
        TEXTLOCAL_CONSUMER_WORKFLOW_LEASE_TTL_S="2",
    ).start()
    await daemon.wait_ready()
    stack.publish(*stack.campaign(good, customer_ids(1, 10), batches=1))
    await stack.wait_for_state(good, CampaignState.SENT)

    async def broken_failed() -> bool:
        state = await redis_client.hget(keys.campaign(broken.key), "state")
        return bool(state == b"FAILED")

    await eventually(broken_failed, timeout_s=60, interval_s=0.2)
    failed = [s for s in statuses_of(stack, 4) if s["campaign_id"] == broken.campaign_id]
    assert [s["status"] for s in failed] == ["FAILED"]
    assert failed[0]["error"]["code"] == "INTERNAL_ERROR"
    assert "CodecError" in failed[0]["error"]["message"]
    assert failed[0]["counts"]["requested"] == 3
    failures = [e for e in daemon.events() if e.get("event") == "work.handler_failed"]
    assert [e["failures"] for e in failures] == [1, 2, 3]
    assert {e["member"] for e in failures} == {broken.key}
    assert {e["error_class"] for e in failures} == {"CodecError"}
    assert "Task exception was never retrieved" not in daemon.output()
    assert await redis_client.zscore(keys.work_queue, broken.key) is None
    assert await daemon.stop() == 0


async def daemon_metrics(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()
