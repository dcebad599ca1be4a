"""Per-customer outcomes of whole campaigns, in process: real Redis, the sandbox over HTTP.

A multi-text campaign (language variants as group texts, personal texts through `bulk_json`
chunks: several batch ids) gets every customer's outcome, across all its batches, once; with
`outcomes.enabled` off, the load step keeps no numbers, so nothing can be published.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from consumer.outcomes import OUTCOMES, OutcomeRecorder
from consumer.poller import Poller, PollerSettings
from consumer.steps import StepSettings
from consumer.textlocal_types import MessageStatuses
from consumer.workflow import CampaignState
from tests.helpers import REGISTRY, new_ref
from tests.rigs import WorkflowRig, customer_ids, workflow_rig
from tests.test_per_recipient import BODIES, extra_contacts, number_of, targeted
from textlocal_sandbox import SandboxHandle

pytestmark = pytest.mark.integration

DAY = timedelta(days=1)
LETTERS = {"D": "DELIVERED", "U": "UNDELIVERED", "I": "INVALID", "E": "EXPIRED", "?": "UNKNOWN"}


def rig_for(
    sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str, *, outcomes: bool
) -> Any:
    return workflow_rig(
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
            send_reconcile_grace=timedelta(seconds=1),
            max_group_texts=3,
            bulk_chunk_size=7,
            outcomes_enabled=outcomes,
        ),
    )


@pytest.fixture
async def rig(
    sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str
) -> AsyncIterator[WorkflowRig]:
    async with rig_for(sandbox, redis_client, key_prefix, outcomes=True) as assembled:
        await assembled.templates.refresh()
        yield assembled


@pytest.fixture
async def rig_without_outcomes(
    sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str
) -> AsyncIterator[WorkflowRig]:
    async with rig_for(sandbox, redis_client, key_prefix, outcomes=False) as assembled:
        await assembled.templates.refresh()
        yield assembled


def poller_with_recorder(rig: WorkflowRig) -> Poller:
    """The poller as the daemon builds it when outcomes are on (a recorder given)."""
    return Poller(
        rig.store,
        rig.client,
        rig.steps,
        REGISTRY,
        PollerSettings(lease_ttl=timedelta(seconds=10)),
        rig.clock,
        rig.metrics,
        "poller-1",
        outcomes=OutcomeRecorder(rig.store, REGISTRY, rig.metrics.customer_outcomes),
    )


async def outcome_records(rig: WorkflowRig) -> list[dict[str, Any]]:
    return [
        REGISTRY.decode(entry.value or b"").fields
        for entry in await rig.store.outbox_read(100_000)
        if entry.topic == OUTCOMES
    ]


async def test_a_multi_text_campaign_gets_every_customer_s_outcome_once(rig: WorkflowRig) -> None:
    """Group texts per language and personal bulk_json chunks (several batch ids): the final
    poll publishes, across every batch, each customer's own final outcome exactly once."""
    ids = targeted()
    ref = new_ref()
    await rig.submit(ref, ids, batches=3, metrics_window_days=1)
    await rig.executor.run_until_idle()
    snapshot = await rig.snapshot(ref)
    assert snapshot.state == CampaignState.SENT
    batch_ids = [int(b) for b in snapshot.batch_ids]
    assert len(batch_ids) >= 4, "the campaign should span several batches"
    rig.clock.advance(DAY)
    assert await poller_with_recorder(rig).run_due() == 1
    assert (await rig.snapshot(ref)).state == CampaignState.DONE

    truth: dict[int, str] = {}  # number → the sandbox's final letter, over every batch

    async def note(run: MessageStatuses) -> None:
        truth.update(zip(map(int, run.numbers), run.statuses, strict=True))

    for batch_id in batch_ids:
        await rig.client.status_batch_messages(batch_id, note)
    assert len(truth) == len(ids)
    assert set(truth.values()) <= set(LETTERS), "every message should have settled"
    records = await outcome_records(rig)
    assert all(0 < len(r["customer_ids"]) <= 10_000 for r in records)
    assert len({r["event_id"] for r in records}) == len(records)
    published = Counter((c, r["outcome"]) for r in records for c in r["customer_ids"])
    assert max(published.values()) == 1, "a customer's outcome was published twice"
    assert dict(published) == {(c, LETTERS[truth[number_of(c)]]): 1 for c in ids}
    assert not await rig.store.redis.exists(rig.store.keys.recipient_numbers(ref.key))


async def test_with_outcomes_off_no_numbers_are_kept_and_none_published(
    rig_without_outcomes: WorkflowRig,
) -> None:
    """outcomes.enabled=false: the load step writes no numbers hash, so even a poller given a
    recorder publishes no CustomerOutcomes; DeliveryMetrics still go out."""
    rig = rig_without_outcomes
    ref = new_ref()
    await rig.submit(ref, customer_ids(1, 40), metrics_window_days=1)
    await rig.executor.run_until_idle()
    assert (await rig.snapshot(ref)).state == CampaignState.SENT
    assert not await rig.store.redis.exists(rig.store.keys.recipient_numbers(ref.key))
    rig.clock.advance(DAY)
    assert await poller_with_recorder(rig).run_due() == 1
    assert (await rig.snapshot(ref)).state == CampaignState.DONE
    assert await outcome_records(rig) == []
    topics = [entry.topic for entry in await rig.store.outbox_read(100_000)]
    assert "metrics" in topics
    numbers_keys = [
        key async for key in rig.store.redis.scan_iter(match=f"{rig.store.keys.prefix}*numbers*")
    ]
    assert numbers_keys == []
