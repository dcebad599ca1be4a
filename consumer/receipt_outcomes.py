"""The receipt drain: recorded delivery receipts become CustomerOutcomes within seconds.

The listener (consumer.receipts) appends each accepted receipt to the Redis stream
`keys.receipts`. Here one replica at a time (a lease, as for the outbox) reads the stream from
its head in batches, and for each campaign and outcome in a batch hands the numbers to the shared
`OutcomeRecorder` (consumer.outcomes) with source RECEIPT. The recorder publishes, through the
outbox, the outcome of those numbers' customers who have no final outcome yet, atomically with
marking them; so a customer's final outcome is published once whether a receipt or a poll saw
it first, and a receipt for a customer a poll already settled changes nothing. Only then are the
receipts deleted from the stream.

A crash between the two (the `receipts.outcomes_recorded` fault point) leaves the receipts in the
stream: the next holder reads them again, the recorder finds their customers marked and
publishes nothing new, and the outbox publishes the records already written, with their own
event ids. Receipts never touch DeliveryMetrics, which the daily polls alone compute.

A `U` receipt is left to the polls (counted `left_to_poll`): TextLocal's receipts know only D, U,
I and ?, so an expired message arrives as U, while `status_batch` tells E (EXPIRED) from U; were
the receipt taken, a customer's final outcome would depend on whether receipts are on. D, I
and ? mean the same in both. A record's `observed_at` is the latest receipt time among its
receipts. A receipt whose
reference has expired since it was accepted is dropped (counted `campaign_gone`). The loop is the
project's single-holder loop (`consumer.leased_work.SingleHolder`): an unexpected error is
logged there (never with a receipt's content) and counted; after `max_failures` in a row the
receipt at the head of the stream is dropped here (`given_up`), so one bad entry cannot stop the
rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from consumer.clock import Clock
from consumer.events import CampaignRef
from consumer.fault_points import FaultPoints, NoFaultPoints
from consumer.leased_work import HolderLog, SingleHolder
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.outcomes import (
    Outcome,
    OutcomeRecorder,
    OutcomeSource,
    OutcomeTarget,
    outcome_of_status,
)
from consumer.store import CampaignStore, ReceiptEntry

log = logging.getLogger("consumer.receipts")

ROLE = "receipts"
APPLIED_RESULTS = ("outcome", "no_change", "left_to_poll", "campaign_gone", "given_up")
# Receipt statuses taken as final outcomes; U is left to the polls (see above).
TAKEN_STATUSES = frozenset({"D", "I", "?", "E"})


class ReceiptOutcomes:
    """Drains the receipts stream into CustomerOutcomes, one replica at a time."""

    def __init__(
        self,
        store: CampaignStore,
        recorder: OutcomeRecorder,
        metrics: Metrics,
        clock: Clock,
        owner: str,
        faults: FaultPoints | None = None,
        *,
        batch_size: int = 2_000,
        lease_ttl_ms: int = 10_000,
        max_failures: int = 5,
    ) -> None:
        self._store = store
        self._recorder = recorder
        self._metrics = metrics
        self._faults = faults or NoFaultPoints()
        self._batch_size = batch_size
        self._targets: dict[str, OutcomeTarget] = {}
        for result in APPLIED_RESULTS:
            metrics.receipts_applied.labels(result)
        self._holder = SingleHolder(
            store,
            role=ROLE,
            lease_key=store.keys.receipts_lease,
            work=self.drain,
            wait_for_more=self._wait_for_more,
            give_up_head=self._drop_head,
            events=HolderLog(
                log,
                retrying="receipts.drain_failed",
                failed="receipts.drain_error",
                gave_up="receipts.head_dropped",
                give_up_failed="receipts.drop_failed",
                with_error_text=False,  # it might carry a receipt's content
            ),
            metrics=metrics,
            clock=clock,
            owner=owner,
            lease_ttl_ms=lease_ttl_ms,
            max_failures=max_failures,
        )

    async def run(self, stopping: asyncio.Event) -> None:
        await self._holder.run(stopping)

    async def drain(self) -> int:
        """Turn every receipt recorded so far into outcomes; returns how many receipts."""
        total = 0
        while True:
            entries = await self._store.receipts_read(self._batch_size)
            if not entries:
                self._metrics.receipts_backlog.set(0)
                return total
            await self.apply(entries)
            total += len(entries)
            self._metrics.receipts_backlog.set(await self._store.receipts_backlog())

    async def apply(self, entries: Sequence[ReceiptEntry]) -> None:
        """Record the outcomes of one batch of receipts, then delete the receipts."""
        campaigns = await self._store.receipt_campaigns([e.reference for e in entries])
        groups: dict[tuple[str, Outcome], list[ReceiptEntry]] = {}
        gone = left = 0
        for entry in entries:
            key = campaigns.get(entry.reference)
            outcome = outcome_of_status(entry.status)
            if key is None or outcome is None or not outcome.is_final:
                gone += 1
                continue
            if entry.status not in TAKEN_STATUSES:
                left += 1
                continue
            groups.setdefault((key, outcome), []).append(entry)
        published = 0
        for (key, outcome), group in groups.items():
            target = await self._target(key)
            observed_at = datetime.fromtimestamp(max(e.at_s for e in group), UTC)
            numbers = [e.number for e in group]
            published += await self._recorder.record(
                target, outcome, numbers, observed_at, OutcomeSource.RECEIPT
            )
        self._faults.reached("receipts.outcomes_recorded")
        await self._store.receipts_done([e.entry_id for e in entries])
        applied = self._metrics.receipts_applied
        applied.labels("outcome").inc(published)
        applied.labels("no_change").inc(len(entries) - gone - left - published)
        applied.labels("left_to_poll").inc(left)
        applied.labels("campaign_gone").inc(gone)
        log_event(
            log,
            "receipts.applied",
            receipts=len(entries),
            campaigns=len({key for key, _ in groups}),
            customers_published=published,
            left_to_poll=left,
            campaign_gone=gone,
        )

    async def _target(self, key: str) -> OutcomeTarget:
        target = self._targets.get(key)
        if target is None:
            snapshot = await self._store.load(key)
            target = (
                OutcomeTarget.of(snapshot)
                if snapshot is not None
                else OutcomeTarget(CampaignRef.from_key(key))
            )
            if len(self._targets) >= 1_000:
                self._targets.clear()
            self._targets[key] = target
        return target

    async def _wait_for_more(self) -> None:
        await self._store.wait_for_receipts("$", timeout_ms=500)

    async def _drop_head(self, error: Exception) -> str | None:
        """Drop the receipt at the head of the stream after repeated unexpected errors."""
        head = await self._store.receipts_read(1)
        await self._store.receipts_done([e.entry_id for e in head])
        if not head:
            return None
        self._metrics.receipts_applied.labels("given_up").inc()
        return head[0].entry_id
