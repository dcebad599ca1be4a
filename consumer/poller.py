"""The poller: delivery polls of sent campaigns, one per interval, for the window after the send.

    SENT ─poll 1─► POLLING ─poll 2─► … ─final poll (is_final)─► DONE ─(retention)─► segment deleted

The executor registers the window when it records SENT: `sent_at`, `window_ends_at`,
`polls_done = 0`, and the campaign in `keys.poll_queue` scored by its first poll (send time +
interval). Slots follow `workflow.poll_slot`; the one reaching the window's end is final.

Each due member of the poll queue is claimed under its own lease (`CampaignStore.claim_due`, an
atomic Lua claim), so with any number of replicas one replica at a time polls a campaign; a
crashed replica's claim falls due again when its lease expires. A poll is `status_batch` for the
campaign's batch, then ONE fenced transition (the poll lease, state SENT or POLLING) that records
`polls_done`, the new state (POLLING, or DONE after the final slot), the `DeliveryMetrics` event
in the outbox and the next slot in the queue. A crash before the transition repeats the
`status_batch` call but never the event; after it, nothing is repeated. The event id is derived
from the batch id and poll number, so downstream can recognise any duplicate anyway.

Decisions where the design is silent:
- **Late polls.** A poller that was down for several intervals makes one poll now, for the latest
  slot due, instead of several in a row reporting the same counts (`workflow.due_poll`); the
  skipped poll numbers are absent downstream. `polls_done` is the last slot number consumed.
- **Transient TextLocal errors** (network, 5xx, 429, after the client's own retries) and Redis
  errors: the slot is kept and tried again after a backoff (`workflow.retry_delay` on the
  campaign's `poll_failures`). If the retries last past the next slot, the next slot is taken.
- **Permanent TextLocal errors** (an error code, e.g. an unknown batch): the slot is consumed
  with NO metrics event (there are no counts to report, and zeros would read as a real result);
  the error is logged, counted in `polls_total{outcome="failed"}` and kept on the campaign
  (`poll_error`). The window goes on; if it was the final slot, the window closes (DONE) without
  an `is_final` event, and downstream takes `window_ends_at` of the earlier events as the end.
- **Cancellation.** Only SENT and POLLING campaigns are polled. A campaign in any other state
  (CANCELLED, FAILED, DONE without a pending clean-up) found in the queue is removed from it
  without a TextLocal call.
- **Segment retention.** After the final poll the campaign stays in the poll queue, DONE with
  `segment_cleanup = 1`, due at final poll + `segment_retention`; the clean-up deletes the
  segment group and removes it from the queue. With retention 0 the clean-up runs at once, in
  the same task, under the same lease; either way a crash or a TextLocal outage only delays it.
  Campaigns without a segment id are simply dequeued.
- **`polls_overdue` gauge**: members of the poll queue (polls or clean-ups) due more than
  `overdue_after` (default one hour) ago and not claimed by anyone. Claimed and retrying members
  are scored in the future, so a non-zero value means polling is not keeping up, or stopped.
- On the final poll `delivery_outcomes_total` counts each message by status (pending included).
- **Per-customer outcomes** (`consumer.outcomes`, when enabled): each poll reads the messages of
  every batch (`status_batch_messages`: each reply read whole, compactly, then visited, so the
  Redis work is outside the request timeout whatever the campaign's size) and publishes, in
  `CustomerOutcomes` records of up to 10,000, the customers whose final outcome was not
  published yet; the window's last poll also publishes PENDING for those still without one.
  They are recorded (each record atomically with its customers' marks) before the poll's
  transition, so a crash between them repeats the poll, which publishes only what is still
  missing. The final poll's transition deletes the campaign's numbers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from consumer.clock import Clock, pause
from consumer.codec import SchemaRegistry
from consumer.dependencies import FailureStreak
from consumer.errors import ConsumerError, PermanentError, TextLocalApiError, TransientError
from consumer.events import CampaignRef, DeliveryMetricsEvent
from consumer.fault_points import FaultPoints, NoFaultPoints
from consumer.give_up import InternalErrorEnding
from consumer.leased_work import DEFAULT_MAX_FAILURES, Lease, LeasedWorkers, LeaseLost
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.outbox import metrics_entry
from consumer.outcomes import OutcomeBatch, OutcomeRecorder, OutcomeSource, OutcomeTarget
from consumer.steps import FINISHED_CAMPAIGN_RETENTION_S
from consumer.store import CampaignSnapshot, CampaignStore, Transition
from consumer.textlocal import MessageVisitor
from consumer.textlocal_types import BatchStatus, MessageStatuses
from consumer.workflow import (
    CampaignState,
    PollSlot,
    due_poll,
    poll_count,
    poll_slot,
    retry_delay,
)

log = logging.getLogger("consumer.poller")

POLLABLE_STATES = (CampaignState.SENT, CampaignState.POLLING)
DELIVERY_STATUSES = ("delivered", "undelivered", "pending", "invalid", "expired", "unknown")


class BatchStatusSource(Protocol):
    """What the poller needs of the TextLocal client."""

    async def status_batch(self, batch_id: int) -> BatchStatus: ...

    async def status_batch_messages(self, batch_id: int, visit: MessageVisitor) -> BatchStatus: ...


class SegmentDeleter(Protocol):
    """Deletes a campaign's segment group, one already gone being fine (CampaignSteps does)."""

    async def delete_segment(self, group_id: int | None) -> None: ...


@dataclass(frozen=True)
class PollerSettings:
    # Must equal the executor's StepSettings.poll_interval, which places the first poll.
    poll_interval: timedelta = timedelta(days=1)
    default_window_days: float = 7.0
    segment_retention: timedelta = timedelta(0)
    concurrency: int = 4
    lease_ttl: timedelta = timedelta(seconds=60)
    idle_wait_s: float = 1.0
    overdue_after: timedelta = timedelta(hours=1)
    max_handler_failures: int = DEFAULT_MAX_FAILURES


@dataclass(frozen=True)
class PollWindow:
    """A sent campaign's batch and polling window, as the executor recorded them."""

    batch_id: int
    sent_at: datetime
    ends_at: datetime

    @property
    def length(self) -> timedelta:
        return self.ends_at - self.sent_at


class Poller:
    """See the module docstring."""

    def __init__(
        self,
        store: CampaignStore,
        client: BatchStatusSource,
        segments: SegmentDeleter,
        registry: SchemaRegistry,
        settings: PollerSettings,
        clock: Clock,
        metrics: Metrics,
        owner: str,
        *,
        outcomes: OutcomeRecorder | None = None,
        faults: FaultPoints | None = None,
    ) -> None:
        self._store = store
        self._outcomes = outcomes
        self._faults = faults or NoFaultPoints()
        self._keys = store.keys
        self._client = client
        self._segments = segments
        self._registry = registry
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._owner = owner
        self._workers = LeasedWorkers(
            store,
            queue=store.keys.poll_queue,
            lease_prefix=store.keys.poll_lease_prefix,
            handle=self.poll,
            give_up=InternalErrorEnding(store, registry, clock, metrics, role="poller"),
            max_failures=settings.max_handler_failures,
            kind="poll",
            concurrency=settings.concurrency,
            lease_ttl=settings.lease_ttl,
            clock=clock,
            metrics=metrics,
            owner=owner,
        )
        self._polls_recorded = 0

    @property
    def running(self) -> int:
        return self._workers.running

    async def run(self, stopping: asyncio.Event, drain_timeout_s: float = 25.0) -> None:
        """Claim and make due polls until `stopping`; then drain and hand the rest back."""
        streak = FailureStreak(log, "poller.loop_error")
        try:
            while not stopping.is_set():
                try:
                    claimed = await self.claim_and_start()
                    await self.update_overdue()
                except TransientError as exc:
                    streak.failed(error=str(exc))
                    claimed = 0
                else:
                    streak.succeeded()
                self._metrics.loop_last_iteration.labels("poller").set(
                    self._clock.now().timestamp()
                )
                if not claimed:
                    await pause(stopping, self._settings.idle_wait_s)
        finally:
            await self.drain(drain_timeout_s)

    async def run_due(self) -> int:
        """Make every poll due now (claimed among any other replicas); returns how many slots
        this poller recorded (with or without an event). For tests, the benchmark, one-shots."""
        recorded_before = self._polls_recorded
        while True:
            await self._workers.claim_and_start()
            if not self._workers.running:
                break
            await self._workers.wait_for_one()
        await self.update_overdue()
        return self._polls_recorded - recorded_before

    async def claim_and_start(self) -> int:
        """Claim as many due polls as there are free slots and start them."""
        return await self._workers.claim_and_start()

    async def update_overdue(self) -> None:
        """Set the `polls_overdue` gauge (see the module docstring)."""
        horizon = self._clock.now() - self._settings.overdue_after
        overdue = await self._store.count_due(self._keys.poll_queue, horizon)
        self._metrics.polls_overdue.set(overdue)

    async def drain(self, timeout_s: float) -> None:
        """Let running polls finish for up to `timeout_s`; hand the rest back at once."""
        if self._workers.running:
            log_event(log, "poller.draining", polls=self._workers.running, timeout_s=timeout_s)
            handed_back = await self._workers.drain(timeout_s)
            if handed_back:
                log_event(log, "poller.handed_back", logging.WARNING, polls=handed_back)

    # --- one claimed campaign ----------------------------------------------------------------

    async def poll(self, key: str, lease: Lease) -> None:
        """Work on one campaign whose poll lease this replica holds."""
        try:
            await self._handle(key, lease)
        except LeaseLost as exc:
            self._metrics.polls.labels("lease_lost").inc()
            log_event(log, "poll.lease_lost", logging.WARNING, campaign=key, why=str(exc))
        except TransientError as exc:
            # Redis could not record the retry either: the lease runs out and the claim's
            # requeue time makes the poll due again.
            log_event(log, "poll.not_recorded", logging.WARNING, campaign=key, error=str(exc))
        except ConsumerError:
            # E.g. a stored header that no longer decodes: counted here, and handed to the
            # workers' one failure handler, which ends the campaign after repeated failures.
            self._metrics.polls.labels("error").inc()
            raise

    async def _handle(self, key: str, lease: Lease) -> None:
        snapshot = await self._store.load(key)
        if snapshot is None:
            await self._store.unschedule(self._keys.poll_queue, key)
            return
        if snapshot.state == CampaignState.DONE and snapshot.segment_cleanup:
            await self._clean_up(snapshot, lease)
            return
        window = self._window(snapshot)
        if snapshot.state not in POLLABLE_STATES or window is None:
            if window is None and snapshot.state in POLLABLE_STATES:
                log_event(log, "poll.no_batch", logging.ERROR, campaign=key)
            await self._skip(snapshot, lease)
            return
        polls_done = snapshot.polls_done
        slot = due_poll(
            window.sent_at,
            self._settings.poll_interval,
            window.length,
            polls_done,
            self._clock.now(),
        )
        if slot is None:
            await self._not_due_yet(snapshot, lease, window, polls_done)
            return
        outcomes = self._outcome_batch(snapshot, slot)
        try:
            status = await self._batch_status(snapshot, window.batch_id, outcomes)
            published = 0 if outcomes is None else await outcomes.finish()
        except TransientError as exc:
            await self._retry_later(snapshot, lease, exc, poll_number=slot.number)
            return
        except (TextLocalApiError, PermanentError) as exc:
            await self._record_failed_poll(snapshot, lease, window, slot, exc)
        else:
            await self._record_poll(snapshot, lease, window, slot, status, published)
        if slot.is_final and self._settings.segment_retention <= timedelta(0):
            fresh = await self._store.load(key)
            if fresh is not None and fresh.segment_cleanup:
                await self._clean_up(fresh, lease)

    def _outcome_batch(self, snapshot: CampaignSnapshot, slot: PollSlot) -> OutcomeBatch | None:
        """Where this poll's per-customer outcomes go (None when they are off)."""
        if self._outcomes is None:
            return None
        return self._outcomes.batch(
            OutcomeTarget.of(snapshot),
            self._clock.now(),
            OutcomeSource.POLL,
            slot.number,
            include_pending=slot.is_final,
        )

    async def _batch_status(
        self, snapshot: CampaignSnapshot, batch_id: int, outcomes: OutcomeBatch | None = None
    ) -> BatchStatus:
        """The campaign's delivery counts: one batch, or the sum over all of its sub-sends;
        with `outcomes`, every message's status goes there once each reply is read."""
        batch_ids = snapshot.batch_ids or [batch_id]
        if outcomes is None:
            read = self._client.status_batch
        else:
            batch = outcomes

            async def visit(run: MessageStatuses) -> None:
                await batch.add_statuses(run.numbers, run.statuses)

            async def read(batch_id: int) -> BatchStatus:
                return await self._client.status_batch_messages(batch_id, visit)

        if len(batch_ids) == 1:
            return await read(int(batch_ids[0]))
        statuses = [await read(int(b)) for b in batch_ids]
        return BatchStatus(
            batch_id=batch_id,
            **{
                name: sum(getattr(status, name) for status in statuses)
                for name in (
                    "num_messages",
                    "delivered",
                    "undelivered",
                    "pending",
                    "invalid",
                    "expired",
                    "unknown",
                )
            },
        )

    def _window(self, snapshot: CampaignSnapshot) -> PollWindow | None:
        """The window as the executor recorded it at the send (None without a batch id)."""
        batch_id = snapshot.batch_id
        sent_at = snapshot.sent_at
        if batch_id is None or sent_at is None:
            return None
        ends_at = snapshot.window_ends_at
        if ends_at is None:
            days = snapshot.header.metrics_window_days if snapshot.header else None
            ends_at = sent_at + timedelta(days=days or self._settings.default_window_days)
        return PollWindow(batch_id, sent_at, ends_at)

    # --- recording ---------------------------------------------------------------------------

    async def _record_poll(
        self,
        snapshot: CampaignSnapshot,
        lease: Lease,
        window: PollWindow,
        slot: PollSlot,
        status: BatchStatus,
        customers_published: int = 0,
    ) -> None:
        event = DeliveryMetricsEvent(
            ref=snapshot.header.ref if snapshot.header else CampaignRef.from_key(snapshot.key),
            batch_id=window.batch_id,
            poll_number=slot.number,
            polled_at=self._clock.now(),
            sent_at=window.sent_at,
            window_ends_at=window.ends_at,
            is_final=slot.is_final,
            num_messages=status.num_messages,
            delivered=status.delivered,
            undelivered=status.undelivered,
            pending=status.pending,
            invalid=status.invalid,
            expired=status.expired,
            unknown=status.unknown,
            metadata=snapshot.header.metadata if snapshot.header else {},
        )
        transition = self._advance(snapshot, lease, window, slot).emit(
            self._keys.outbox, metrics_entry(self._registry, event)
        )
        if slot.is_final:
            transition.delete_key(self._keys.recipient_numbers(snapshot.key))
        await self._apply(snapshot.key, transition)
        self._faults.reached("poll.recorded")
        self._polls_recorded += 1
        self._metrics.polls.labels("ok").inc()
        if slot.is_final:
            for name in DELIVERY_STATUSES:
                self._metrics.delivery_outcomes.labels(name).inc(getattr(status, name))
        log_event(
            log,
            "poll.done",
            campaign=snapshot.key,
            batch_id=window.batch_id,
            poll_number=slot.number,
            is_final=slot.is_final,
            num_messages=status.num_messages,
            delivered=status.delivered,
            pending=status.pending,
            customers_published=customers_published,
        )

    async def _record_failed_poll(
        self,
        snapshot: CampaignSnapshot,
        lease: Lease,
        window: PollWindow,
        slot: PollSlot,
        error: Exception,
    ) -> None:
        """A permanent error: the slot is consumed without an event (module docstring)."""
        code = f"TEXTLOCAL_{error.code}" if isinstance(error, TextLocalApiError) else "FAILED"
        transition = self._advance(snapshot, lease, window, slot).set(poll_error=f"{code}: {error}")
        await self._apply(snapshot.key, transition)
        self._polls_recorded += 1
        self._metrics.polls.labels("failed").inc()
        log_event(
            log,
            "poll.failed",
            logging.ERROR,
            campaign=snapshot.key,
            poll_number=slot.number,
            is_final=slot.is_final,
            error=str(error),
        )

    def _advance(
        self, snapshot: CampaignSnapshot, lease: Lease, window: PollWindow, slot: PollSlot
    ) -> Transition:
        """The fenced transition recording `slot` as made: next slot queued, or window closed."""
        key = snapshot.key
        now = self._clock.now()
        transition = (
            self._fenced(key, lease, *POLLABLE_STATES)
            .set(polls_done=slot.number, last_polled_at=now)
            .delete_fields(CampaignSnapshot.poll_failures)
        )
        if not slot.is_final:
            following = poll_slot(
                window.sent_at, self._settings.poll_interval, window.length, slot.number + 1
            )
            return transition.set_state(CampaignState.POLLING).enqueue(
                self._keys.poll_queue, key, following.due_at
            )
        transition.set_state(CampaignState.DONE).set(ended_at=now)
        if not _group_ids(snapshot):
            return transition.dequeue(self._keys.poll_queue, key).expire(
                self._keys.campaign(key), FINISHED_CAMPAIGN_RETENTION_S
            )
        return transition.set(segment_cleanup=True).enqueue(
            self._keys.poll_queue, key, now + self._settings.segment_retention
        )

    async def _retry_later(
        self,
        snapshot: CampaignSnapshot,
        lease: Lease,
        error: Exception,
        *,
        poll_number: int | None = None,
    ) -> None:
        """Keep the slot (or the clean-up) and try again after a backoff."""
        failures = snapshot.poll_failures + 1
        delay = retry_delay(failures)
        transition = (
            self._fenced(snapshot.key, lease, snapshot.state)
            .set(poll_failures=failures)
            .enqueue(self._keys.poll_queue, snapshot.key, self._clock.now() + delay)
        )
        await self._apply(snapshot.key, transition)
        if poll_number is not None:
            self._metrics.polls.labels("retry").inc()
        log_event(
            log,
            "poll.retry" if poll_number is not None else "poll.segment_delete_retry",
            logging.WARNING,
            campaign=snapshot.key,
            poll_number=poll_number,
            error=str(error),
            failures=failures,
            retry_in_s=delay.total_seconds(),
        )

    async def _not_due_yet(
        self, snapshot: CampaignSnapshot, lease: Lease, window: PollWindow, polls_done: int
    ) -> None:
        """Claimed before its next slot: put it back at the slot's due time."""
        if polls_done >= poll_count(self._settings.poll_interval, window.length):
            # Every slot made but still SENT/POLLING: nothing left to poll.
            log_event(log, "poll.window_exhausted", logging.ERROR, campaign=snapshot.key)
            await self._skip(snapshot, lease)
            return
        following = poll_slot(
            window.sent_at, self._settings.poll_interval, window.length, polls_done + 1
        )
        await self._store.reschedule_if_queued(
            self._keys.poll_queue, snapshot.key, following.due_at
        )

    async def _skip(self, snapshot: CampaignSnapshot, lease: Lease) -> None:
        """Not pollable (cancelled, failed, over): leave the queue without a TextLocal call."""
        transition = self._fenced(snapshot.key, lease, snapshot.state).dequeue(
            self._keys.poll_queue, snapshot.key
        )
        await self._apply(snapshot.key, transition)
        self._metrics.polls.labels("skipped").inc()
        log_event(log, "poll.skipped", campaign=snapshot.key, state=snapshot.state.value)

    async def _clean_up(self, snapshot: CampaignSnapshot, lease: Lease) -> None:
        """Delete the segment group of a campaign whose window closed, then forget it."""
        key = snapshot.key
        group_ids = _group_ids(snapshot)
        group_id = group_ids[0] if group_ids else None
        error: str | None = None
        try:
            for group_id in group_ids:
                await self._segments.delete_segment(group_id)
        except TransientError as exc:
            await self._retry_later(snapshot, lease, exc)
            return
        except (TextLocalApiError, PermanentError) as exc:
            # Retrying will not help: report it and forget the segment.
            error = str(exc)
            log_event(
                log,
                "poll.segment_not_deleted",
                logging.ERROR,
                campaign=key,
                group_id=group_id,
                error=error,
            )
        transition = (
            self._fenced(key, lease, CampaignState.DONE)
            .delete_fields(CampaignSnapshot.segment_cleanup, CampaignSnapshot.poll_failures)
            .set(segment_error=error)
            .dequeue(self._keys.poll_queue, key)
            .expire(self._keys.campaign(key), FINISHED_CAMPAIGN_RETENTION_S)
        )
        await self._apply(key, transition)
        log_event(log, "poll.segment_cleaned_up", campaign=key, group_id=group_id)

    # --- helpers -----------------------------------------------------------------------------

    def _fenced(self, key: str, lease: Lease, *states: CampaignState) -> Transition:
        return self._store.transition(key).expect(*states).fenced(lease.key, lease.token)

    async def _apply(self, key: str, transition: Transition) -> None:
        result = await self._store.apply(transition, self._clock.now())
        if not result.ok:
            raise LeaseLost(f"{key}: {result.reason}")


def _group_ids(snapshot: CampaignSnapshot) -> list[int]:
    """The campaign's segment groups: every sub-send's, or the one of a one-text campaign."""
    recorded = snapshot.group_ids
    if recorded:
        return [int(group_id) for group_id in recorded]
    group_id = snapshot.group_id
    return [] if group_id is None else [group_id]
