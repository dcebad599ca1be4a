"""Ending a campaign whose handler keeps failing: FAILED with reason INTERNAL_ERROR.

`LeasedWorkers` calls this after a role's handler raised an unexpected error several times in a
row for one campaign (DESIGN §6a): a bug or a value nothing anticipated must end the campaign
with a status Optimove sees, never be retried forever. The campaign's own record may be what
fails to load (a header that no longer decodes), so this reads as little as it can and writes one
fenced transition. TextLocal is not called: the segment group, if any, is left in place and its
id logged, for the operator to look at before deleting it.
"""

from __future__ import annotations

import logging

from consumer.clock import Clock
from consumer.codec import SchemaRegistry
from consumer.errors import ConsumerError
from consumer.events import (
    CampaignRef,
    CampaignStatusEvent,
    RecipientCounts,
    StatusCode,
    StatusError,
)
from consumer.leased_work import Lease
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.outbox import status_entry
from consumer.steps import FINISHED_CAMPAIGN_RETENTION_S
from consumer.store import CampaignStore
from consumer.workflow import FINAL_STATES, CampaignState

log = logging.getLogger("consumer.give_up")

_UNFINISHED_STATES = tuple(state for state in CampaignState if state not in FINAL_STATES)


class InternalErrorEnding:
    """The `give_up` of the executor and the poller."""

    def __init__(
        self,
        store: CampaignStore,
        registry: SchemaRegistry,
        clock: Clock,
        metrics: Metrics,
        role: str,
    ) -> None:
        self._store = store
        self._registry = registry
        self._clock = clock
        self._metrics = metrics
        self._role = role

    async def __call__(self, key: str, lease: Lease, error: Exception) -> None:
        keys = self._store.keys
        now = self._clock.now()
        plain = await self._store.load_without_header(key)
        if plain is None or plain.state.is_final:
            return
        try:
            snapshot = await self._store.load(key)
        except ConsumerError:
            snapshot = None  # the header no longer decodes: end it without its metadata
        metadata = dict(snapshot.header.metadata) if snapshot and snapshot.header else {}
        requested = plain.requested
        group_id = plain.group_id
        problem = StatusError(
            "INTERNAL_ERROR",
            f"the {self._role} failed repeatedly: {type(error).__name__}: {str(error)[:200]}",
        )
        event = CampaignStatusEvent(
            ref=CampaignRef.from_key(key),
            status=StatusCode.FAILED,
            occurred_at=now,
            qualifier="internal-error",
            counts=RecipientCounts(requested=requested),
            textlocal_group_id=group_id,
            error=problem,
            metadata=metadata,
        )
        transition = (
            self._store.transition(key)
            .expect(*_UNFINISHED_STATES)
            .fenced(lease.key, lease.token)
            .set_state(CampaignState.FAILED)
            .set(error_code=problem.code, error_message=problem.message, ended_at=now)
            .dequeue(keys.work_queue, key)
            .dequeue(keys.poll_queue, key)
            .dequeue(keys.collecting_queue, key)
            .delete_key(keys.recipients(key))
            .delete_key(keys.batches(key))
            .delete_key(keys.chunks_loaded(key))
            .delete_key(keys.recipient_codes(key))
            .delete_key(keys.distinct_codes(key))
            .delete_key(keys.sub_sends(key))
            .delete_key(keys.personal_chunks(key))
            .emit(keys.outbox, status_entry(self._registry, event))
            .expire(keys.campaign(key), FINISHED_CAMPAIGN_RETENTION_S)
        )
        result = await self._store.apply(transition, now)
        if not result.ok:
            log_event(
                log, "campaign.give_up_skipped", logging.WARNING, campaign=key, why=result.reason
            )
            return
        self._metrics.campaign_transitions.labels(CampaignState.FAILED.value).inc()
        log_event(
            log,
            "campaign.ended",
            logging.ERROR,
            campaign=key,
            status="FAILED",
            reason=problem.code,
            detail=problem.message,
            segment_group_left=group_id,
        )
