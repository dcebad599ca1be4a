"""In-process assemblies of the real parts (Redis, the sandbox over HTTP) for workflow tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from consumer.contact_index import ContactIndex
from consumer.contact_store import ContactStore
from consumer.events import CampaignRef, CampaignStatusEvent, RecipientCounts, StatusCode
from consumer.executor import Executor, ExecutorSettings
from consumer.fault_points import FaultPoints, NoFaultPoints
from consumer.keys import RedisKeys
from consumer.metrics import Metrics
from consumer.outbox import status_entry
from consumer.steps import CampaignSteps, StepSettings
from consumer.store import CampaignSnapshot, CampaignStore
from consumer.templates import TemplateCopy
from consumer.textlocal import TextLocalClient, TextLocalCredentials, TextLocalSettings
from consumer.workflow import CampaignState, ContactGroup
from tests.helpers import REGISTRY, recipients, scheduled
from textlocal_sandbox import ManualClock, SandboxHandle

WELCOME_BODY = "Hi from Shop! Your code: [%PROMO_CODE%]"


@dataclass
class WorkflowRig:
    sandbox: SandboxHandle
    store: CampaignStore
    client: TextLocalClient
    index: ContactIndex
    templates: TemplateCopy
    steps: CampaignSteps
    executor: Executor
    metrics: Metrics
    clock: ManualClock
    group: ContactGroup
    template_id: int

    async def submit(
        self,
        ref: CampaignRef,
        customer_ids: Sequence[str],
        *,
        batches: int = 1,
        scheduled_at: datetime | None = None,
        promo_codes: Sequence[str] = ("SAVE10",),
        template_id: int | None = None,
        customer_codes: Mapping[str, str] | None = None,
        **header: object,
    ) -> None:
        """Record a campaign as intake would: header (with ACCEPTED) and its batches
        (`customer_codes`: customers' own promo codes)."""
        size = -(-len(customer_ids) // batches)
        event = scheduled(
            ref,
            recipient_count=len(customer_ids),
            batch_count=batches,
            scheduled_at=scheduled_at or self.clock.now(),
            template_id=template_id or self.template_id,
            promo_codes=promo_codes,
            **header,  # type: ignore[arg-type]
        )
        now = self.clock.now()
        accepted = CampaignStatusEvent(
            ref=ref,
            status=StatusCode.ACCEPTED,
            occurred_at=now,
            counts=RecipientCounts(requested=len(customer_ids)),
            metadata=event.metadata,
        )
        await self.store.record_header(
            event,
            status_entry(REGISTRY, accepted),
            now,
            now + timedelta(hours=6),
            fingerprint=f"header|{event.event_id}",
        )
        for index in range(batches):
            ids = customer_ids[index * size : (index + 1) * size]
            batch = recipients(ref, index, ids)
            if customer_codes and any(i in customer_codes for i in ids):
                batch = replace(
                    batch,
                    promo_codes=tuple(customer_codes.get(i, "") for i in ids),
                    customers_with_promo_code=sum(1 for i in ids if customer_codes.get(i)),
                )
            await self.store.record_batch(
                batch, now, now + timedelta(hours=6), fingerprint=f"batch|{batch.event_id}"
            )

    async def snapshot(self, ref: CampaignRef) -> CampaignSnapshot:
        snapshot = await self.store.load(ref.key)
        assert snapshot is not None
        return snapshot

    async def state(self, ref: CampaignRef) -> CampaignState:
        return (await self.snapshot(ref)).state

    async def statuses(self, ref: CampaignRef) -> list[dict[str, Any]]:
        """The campaign's status events in the outbox, decoded, in order."""
        found = []
        for entry in await self.store.outbox_read(100_000):
            if entry.key == ref.key and entry.topic == "status":
                found.append(REGISTRY.decode(entry.value or b"").fields)
        return found

    async def request_cancel(self, ref: CampaignRef, reason: str = "stop") -> None:
        """What intake records for a cancellation of a campaign past COLLECTING."""
        snapshot = await self.snapshot(ref)
        keys = self.store.keys
        transition = (
            self.store.transition(ref.key)
            .expect(snapshot.state)
            .set(cancel_requested=True, cancel_reason=reason)
            .enqueue(keys.work_queue, ref.key, self.clock.now())
        )
        assert (await self.store.apply(transition, self.clock.now())).ok


@asynccontextmanager
async def workflow_rig(
    sandbox: SandboxHandle,
    redis_client: aioredis.Redis,
    key_prefix: str,
    *,
    contacts: int = 1000,
    extra_contacts: Sequence[dict[str, object]] = (),
    step_settings: StepSettings | None = None,
    executor_settings: ExecutorSettings | None = None,
    faults: FaultPoints | None = None,
    client_settings: TextLocalSettings | None = None,
    more_templates: Sequence[Mapping[str, object]] = (),
    language_field: str | None = None,
    default_language: str = "",
) -> AsyncIterator[WorkflowRig]:
    """A sandbox account with a master group of generated contacts, and the executor's parts."""
    group_id = await sandbox.admin.generate_contacts(
        "Optimove customers", contacts, first_number=447_700_000_000
    )
    if extra_contacts:
        await sandbox.admin.seed_contacts(group_id, None, list(extra_contacts))
    template_id, *_ = await sandbox.admin.seed_templates(
        [{"title": "OPT_Welcome", "body": WELCOME_BODY}, *more_templates]
    )
    group = ContactGroup(
        group_id,
        "Optimove customers",
        "OPT_",
        "custom1",
        language_field=language_field,
        default_language=default_language,
    )
    clock = sandbox.clock
    metrics = Metrics(CollectorRegistry())
    store = CampaignStore(redis_client, RedisKeys(prefix=key_prefix), REGISTRY)
    settings = client_settings or TextLocalSettings(
        api_url=sandbox.url,
        rate_limit_per_s=1000,
        max_concurrency=8,
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
    )
    async with TextLocalClient(
        settings, TextLocalCredentials.from_api_key(sandbox.api_key), observer=metrics
    ) as client:
        index = ContactIndex(ContactStore(redis_client, store.keys))
        await index.rebuild(client, group, clock.now())
        templates = TemplateCopy(store, client)
        steps = CampaignSteps(
            store,
            index,
            client,
            templates,
            REGISTRY,
            [group],
            step_settings or StepSettings(send_reconcile_grace=timedelta(seconds=1)),
            clock,
            metrics,
            faults or NoFaultPoints(),
        )
        executor = Executor(
            store,
            steps,
            REGISTRY,
            executor_settings or ExecutorSettings(lease_ttl=timedelta(seconds=10)),
            clock,
            metrics,
            owner="test-replica",
        )
        yield WorkflowRig(
            sandbox,
            store,
            client,
            index,
            templates,
            steps,
            executor,
            metrics,
            clock,
            group,
            template_id,
        )


def customer_ids(first: int, count: int) -> list[str]:
    """Ids as the sandbox generates them: C0000001, C0000002, ..."""
    return [f"C{i:07d}" for i in range(first, first + count)]
