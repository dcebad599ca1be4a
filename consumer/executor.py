"""The executor: claims due campaigns under Redis leases and drives them through their steps.

Any number of replicas may run it. A campaign is worked on only by the replica holding its lease
(an atomic SET NX with expiry, renewed while the work goes on); a replica that dies loses its
leases when they expire and another takes the campaign over from its last recorded step.

It also fails campaigns whose recipient batches never all arrived (the collecting deadline).
On stop it claims nothing new, lets running steps finish within the drain time, and hands the
rest back (lease released, campaign due at once for the next owner).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from consumer.clock import Clock, pause
from consumer.codec import SchemaRegistry
from consumer.dependencies import FailureStreak
from consumer.errors import PermanentError, TextLocalApiError, TransientError
from consumer.events import (
    CampaignRef,
    CampaignStatusEvent,
    RecipientCounts,
    StatusCode,
    StatusError,
)
from consumer.give_up import InternalErrorEnding
from consumer.leased_work import DEFAULT_MAX_FAILURES, Lease, LeasedWorkers, LeaseLost
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.outbox import status_entry
from consumer.steps import FINISHED_CAMPAIGN_RETENTION_S, CampaignRun, CampaignSteps, RetryAt
from consumer.store import CampaignStore
from consumer.workflow import CampaignState, Step, next_step, retry_delay

log = logging.getLogger("consumer.executor")

MAX_STEPS_PER_CLAIM = 12


@dataclass(frozen=True)
class ExecutorSettings:
    concurrency: int = 4
    lease_ttl: timedelta = timedelta(seconds=60)
    max_send_delay: timedelta = timedelta(hours=1)
    collect_timeout: timedelta = timedelta(hours=6)
    idle_wait_s: float = 0.25
    sweep_every_s: float = 5.0
    max_handler_failures: int = DEFAULT_MAX_FAILURES


class Executor:
    """See the module docstring."""

    def __init__(
        self,
        store: CampaignStore,
        steps: CampaignSteps,
        registry: SchemaRegistry,
        settings: ExecutorSettings,
        clock: Clock,
        metrics: Metrics,
        owner: str,
    ) -> None:
        self._store = store
        self._keys = store.keys
        self._steps = steps
        self._registry = registry
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._workers = LeasedWorkers(
            store,
            queue=store.keys.work_queue,
            lease_prefix=store.keys.campaign_lease_prefix,
            handle=self.execute,
            give_up=InternalErrorEnding(store, registry, clock, metrics, role="executor"),
            max_failures=settings.max_handler_failures,
            kind="campaign",
            concurrency=settings.concurrency,
            lease_ttl=settings.lease_ttl,
            clock=clock,
            metrics=metrics,
            owner=owner,
        )
        self._last_sweep_s = float("-inf")

    def oldest_running_since(self) -> datetime | None:
        """When the longest-running campaign in hand was claimed (for the liveness check)."""
        return self._workers.oldest_running_since()

    async def run(self, stopping: asyncio.Event, drain_timeout_s: float = 25.0) -> None:
        """Claim and execute due campaigns until `stopping`; then drain and hand back."""
        streak = FailureStreak(log, "executor.loop_error")
        try:
            while not stopping.is_set():
                try:
                    await self.sweep_collecting()
                    claimed = await self.claim_and_start()
                except TransientError as exc:
                    streak.failed(error=str(exc))
                    claimed = 0
                else:
                    streak.succeeded()
                self._metrics.loop_last_iteration.labels("executor").set(
                    self._clock.now().timestamp()
                )
                if not claimed:
                    if self._workers.full:
                        # A free slot is what to wait for: claim again as soon as one is.
                        await self._workers.wait_for_one(self._settings.idle_wait_s)
                    else:
                        await pause(stopping, self._settings.idle_wait_s)
        finally:
            await self.drain(drain_timeout_s)

    async def claim_and_start(self) -> int:
        """Claim as many due campaigns as there are free slots and start working on them."""
        return await self._workers.claim_and_start()

    async def run_until_idle(self, timeout_s: float = 60.0) -> None:
        """Claim and execute until nothing is due (for tests and one-shot runs)."""
        async with asyncio.timeout(timeout_s):
            while True:
                await self.sweep_collecting()
                await self._workers.claim_and_start()
                if not self._workers.running:
                    return
                await self._workers.wait_for_one()

    async def drain(self, timeout_s: float) -> None:
        """Let running campaigns finish their step for up to `timeout_s`; hand the rest back."""
        if self._workers.running:
            log_event(log, "executor.draining", campaigns=self._workers.running)
            handed_back = await self._workers.drain(timeout_s)
            if handed_back:
                log_event(log, "executor.handed_back", logging.WARNING, campaigns=handed_back)

    # --- one campaign ----------------------------------------------------------------------

    async def execute(self, key: str, lease: Lease) -> None:
        """Work on one campaign whose lease this replica holds, step after step."""
        snapshot = await self._store.load(key)
        if snapshot is None or snapshot.header is None:
            await self._store.unschedule(self._keys.work_queue, key)
            return
        await self._drive(CampaignRun(snapshot, lease))

    async def _drive(self, run: CampaignRun) -> None:
        for _ in range(MAX_STEPS_PER_CLAIM):
            snapshot = run.snapshot
            step = next_step(
                snapshot.state,
                cancel_requested=snapshot.cancel_requested,
                scheduled_at=run.header.scheduled_at,
                now=self._clock.now(),
                max_send_delay=self._settings.max_send_delay,
            )
            if step == Step.NONE:
                await self._store.unschedule(self._keys.work_queue, run.key)
                return
            try:
                await self._run_step(step, run)
            except LeaseLost as exc:
                log_event(
                    log, "executor.lease_lost", logging.WARNING, campaign=run.key, why=str(exc)
                )
                return
            except RetryAt as wait:
                await self._store.reschedule(self._keys.work_queue, run.key, wait.when)
                log_event(
                    log,
                    "executor.waiting",
                    campaign=run.key,
                    until=wait.when.isoformat(),
                    why=str(wait),
                )
                return
            except TransientError as exc:
                await self._retry_later(run, step, exc)
                return
            except (TextLocalApiError, PermanentError) as exc:
                await self._fail_unexpectedly(run, step, exc)
                return
            fresh = await self._store.load(run.key)
            if fresh is None:
                return
            run.snapshot = fresh
        await self._store.reschedule(self._keys.work_queue, run.key, self._clock.now())

    async def _run_step(self, step: Step, run: CampaignRun) -> None:
        steps = self._steps
        if step == Step.CREATE_SEGMENT:
            await steps.create_segment(run)
        elif step == Step.LOAD_CONTACTS:
            await steps.load_contacts(run)
        elif step == Step.SEND:
            await steps.send(run)
        elif step == Step.RECONCILE_SEND:
            await steps.reconcile_send(run)
        elif step == Step.CANCEL:
            await steps.cancel(run)
        elif step == Step.MISS_SEND_WINDOW:
            deadline = run.header.scheduled_at + self._settings.max_send_delay
            await steps.fail(
                run,
                StatusError(
                    "SEND_WINDOW_MISSED",
                    f"not sent by {deadline:%Y-%m-%d %H:%M} UTC (send time plus the allowed delay)",
                ),
            )

    async def _retry_later(self, run: CampaignRun, step: Step, error: TransientError) -> None:
        failures = await self._store.count_step_retry(run.key)
        delay = retry_delay(failures)
        await self._store.reschedule(self._keys.work_queue, run.key, self._clock.now() + delay)
        log_event(
            log,
            "executor.step_retry",
            logging.WARNING,
            campaign=run.key,
            step=step.value,
            error=str(error),
            failures=failures,
            retry_in_s=delay.total_seconds(),
        )

    async def _fail_unexpectedly(self, run: CampaignRun, step: Step, error: Exception) -> None:
        code = f"TEXTLOCAL_{error.code}" if isinstance(error, TextLocalApiError) else "FAILED"
        log_event(
            log,
            "executor.step_failed",
            logging.ERROR,
            campaign=run.key,
            step=step.value,
            error=str(error),
        )
        try:
            await self._steps.fail(run, StatusError(code, f"{step.value}: {error}"))
        except (TransientError, LeaseLost) as exc:
            log_event(
                log, "executor.fail_not_recorded", logging.ERROR, campaign=run.key, error=str(exc)
            )

    # --- collecting deadline ---------------------------------------------------------------

    async def sweep_collecting(self) -> None:
        """FAILED for campaigns whose batches (or header) did not all arrive in time."""
        now_s = self._clock.now().timestamp()
        if now_s - self._last_sweep_s < self._settings.sweep_every_s:
            return
        self._last_sweep_s = now_s
        now = self._clock.now()
        for key in await self._store.due_members(self._keys.collecting_queue, now, 100):
            snapshot = await self._store.load(key)
            if snapshot is None or snapshot.state != CampaignState.COLLECTING:
                await self._store.unschedule(self._keys.collecting_queue, key)
                continue
            hours = self._settings.collect_timeout.total_seconds() / 3600
            if snapshot.header is None:
                error = StatusError(
                    "HEADER_MISSING",
                    f"recipient batches arrived but no CampaignScheduled within {hours:g} h",
                )
                metadata: dict[str, str] = {}
            else:
                received = len(await self._store.batch_indexes(key))
                error = StatusError(
                    "BATCHES_INCOMPLETE",
                    f"{received} of {snapshot.header.batch_count} recipient batches arrived "
                    f"within {hours:g} h",
                )
                metadata = dict(snapshot.header.metadata)
            event = CampaignStatusEvent(
                ref=CampaignRef.from_key(key),
                status=StatusCode.FAILED,
                occurred_at=now,
                counts=RecipientCounts(requested=snapshot.requested),
                error=error,
                metadata=metadata,
            )
            transition = (
                self._store.transition(key)
                .expect(CampaignState.COLLECTING)
                .set_state(CampaignState.FAILED)
                .set(error_code=error.code, error_message=error.message, ended_at=now)
                .dequeue(self._keys.collecting_queue, key)
                .delete_key(self._keys.recipients(key))
                .delete_key(self._keys.batches(key))
                .emit(self._keys.outbox, status_entry(self._registry, event))
                .expire(self._keys.campaign(key), FINISHED_CAMPAIGN_RETENTION_S)
            )
            if (await self._store.apply(transition, now)).ok:
                self._metrics.campaign_transitions.labels(CampaignState.FAILED.value).inc()
                log_event(
                    log,
                    "campaign.ended",
                    logging.WARNING,
                    campaign=key,
                    status="FAILED",
                    reason=error.code,
                    detail=error.message,
                )
