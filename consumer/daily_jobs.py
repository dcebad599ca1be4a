"""The daily jobs: the template import ("templates"), the contact-index refresh ("contacts") and
the opt-out import ("optouts", `consumer.optouts`; after the refresh, so a contact added since
yesterday who opted out is found).

Each runs once a day at a configured UTC time, on one replica: at a job's time every replica
tries its lock for that day (`keys.daily_job_lock(job, "YYYY-MM-DD")`, SET NX with an expiry,
renewed while the job runs), and the holder checks the job's last success again before running,
so a replica that arrives after another finished does not run it twice. A run counts for the
latest scheduled time at or before its start; a job is due when its last success is older than
that time, which also makes a fresh deployment (no success recorded) and a replica coming back
after missing the time run it at once.

The template import also reads the account's credit balance (the `textlocal_credit_balance`
gauge, and `sms_credits` in the job's summary), so the gauge is at most a day old even on days
without a send; a failed read is logged (`daily.balance_check_failed`) and does not fail the
import.

On success the job records its last success (`keys.daily_job_last_success`, Unix ms, and the
`daily_job_last_success_timestamp_seconds` gauge) and releases the lock. On failure it keeps the
lock for `retry_after`, so no replica tries again before then; the next attempt is that much
later — `outage_retry_after` (30 s) when the failure was Redis being away, which is waited out
like any outage. After `max_failures` failed runs in a row (whatever the error: a bug is
reported like an outage) it keeps the lock until the next scheduled time and logs
`daily.job_given_up`. The CLI runs a job on demand with `force=True`: due or not, but still
under the lock, so it never runs beside a scheduled run (it answers "locked" instead, as it does
during a failed run's back-off).

The loop sleeps on the injected clock's terms: it wakes every `wake_every_s` (real seconds) and
compares the clock with the next scheduled time, so a test that moves the clock is noticed within
one wake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta

from consumer.catalog import TemplateCatalog
from consumer.clock import Clock, monotonic_s, pause
from consumer.contact_index import ContactIndex
from consumer.dependencies import FailureStreak
from consumer.errors import ConsumerError, StoreUnavailable
from consumer.leased_work import Lease, keep_lease
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.optouts import OptOutImporter
from consumer.store import CampaignStore
from consumer.textlocal import TextLocalClient
from consumer.workflow import ContactGroup

log = logging.getLogger("consumer.daily")

TEMPLATES_JOB = "templates"
CONTACTS_JOB = "contacts"
OPTOUTS_JOB = "optouts"
JOB_NAMES = (TEMPLATES_JOB, CONTACTS_JOB, OPTOUTS_JOB)  # in this order, each day

# (stage, done, total): "templates" or "group <id>", and how far it has got.
JobProgress = Callable[[str, int, int], None]


# --- pure: when a job is due -------------------------------------------------------------------


def latest_run_time(now: datetime, run_at: time) -> datetime:
    """The latest scheduled time (UTC) at or before `now`."""
    today = datetime.combine(now.astimezone(UTC).date(), run_at, tzinfo=UTC)
    return today if today <= now else today - timedelta(days=1)


def next_run_time(now: datetime, run_at: time) -> datetime:
    """The first scheduled time (UTC) after `now`."""
    return latest_run_time(now, run_at) + timedelta(days=1)


def is_due(now: datetime, run_at: time, last_success: datetime | None) -> bool:
    """Due when it never succeeded, or not since the latest scheduled time."""
    return last_success is None or last_success < latest_run_time(now, run_at)


# --- running -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DailyJobSettings:
    run_at: time = time(3, 0)  # UTC
    # Renewed every third of it while running; short, so a replica that died mid-job (its
    # lock not released) holds the job up for half a minute, not ten.
    lock_ttl: timedelta = timedelta(seconds=30)
    retry_after: timedelta = timedelta(minutes=15)
    # The back-off after a run that failed because Redis was away (StoreUnavailable): the job
    # goes again soon after the outage, not `retry_after` later, since campaigns may be waiting
    # for its contact index (DESIGN §6a: outages are waited out).
    outage_retry_after: timedelta = timedelta(seconds=30)
    wake_every_s: float = 5.0
    # Failed runs in a row after which a job is not tried again before its next run time.
    max_failures: int = 5


@dataclass(frozen=True)
class JobOutcome:
    """What asking for a job did."""

    job: str
    ran: bool
    ok: bool
    # "done", "failed", "not-due" (succeeded since its last scheduled time) or "locked"
    # (another replica runs it, or a failed run is backing off)
    reason: str
    detail: str = ""
    duration_s: float = 0.0
    summary: Mapping[str, int] = field(default_factory=dict)


class DailyJobs:
    """Runs the daily jobs on schedule (`run`) or on demand (`run_job`); see the docstring."""

    def __init__(
        self,
        store: CampaignStore,
        catalog: TemplateCatalog,
        index: ContactIndex,
        client: TextLocalClient,
        groups: Sequence[ContactGroup],
        settings: DailyJobSettings,
        clock: Clock,
        metrics: Metrics,
        owner: str,
        optouts: OptOutImporter,
    ) -> None:
        self._store = store
        self._optouts = optouts
        self._keys = store.keys
        self._catalog = catalog
        self._index = index
        self._client = client
        self._groups = tuple(groups)
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._owner = owner
        # At 0 from the start, so the first failure is an increase (see consumer.metrics).
        metrics.handler_failures.labels("daily")
        metrics.handler_gave_up.labels("daily")

    async def run(self, stopping: asyncio.Event) -> None:
        """Run each job when due, until `stopping` (a job in progress is finished first)."""
        await self._publish_last_successes()
        streak = FailureStreak(log, "daily.loop_error")
        while not stopping.is_set():
            for name in JOB_NAMES:
                if stopping.is_set():
                    break
                try:
                    await self.run_job(name)
                except ConsumerError as exc:  # Redis unreachable for the lock or the record
                    streak.failed(job=name, error=str(exc))
                else:
                    streak.succeeded()
            self._metrics.loop_last_iteration.labels("daily").set(self._clock.now().timestamp())
            now = self._clock.now()
            until_next_s = (next_run_time(now, self._settings.run_at) - now).total_seconds()
            await pause(stopping, max(0.0, min(self._settings.wake_every_s, until_next_s)))

    async def run_job(
        self, name: str, *, force: bool = False, progress: JobProgress | None = None
    ) -> JobOutcome:
        """Run job `name` if due (always with `force`), under its lock for the current day."""
        if name not in JOB_NAMES:
            raise ValueError(f"unknown daily job {name!r}; one of {', '.join(JOB_NAMES)}")
        run_time = latest_run_time(self._clock.now(), self._settings.run_at)
        if not force and not await self._due(name):
            return JobOutcome(name, ran=False, ok=True, reason="not-due")
        lock = self._keys.daily_job_lock(name, run_time.date().isoformat())
        token = f"{self._owner}:{uuid.uuid4().hex[:8]}"
        if not await self._store.acquire_lease(lock, token, _ms(self._settings.lock_ttl)):
            return JobOutcome(
                name,
                ran=False,
                ok=False,
                reason="locked",
                detail="another replica is running it, or a failed run is backing off",
            )
        try:
            if not force and not await self._due(name):  # another replica just finished it
                await self._store.release_lease(lock, token)
                return JobOutcome(name, ran=False, ok=True, reason="not-due")
            return await self._run_locked(name, lock, token, force, progress)
        except BaseException:
            with contextlib.suppress(ConsumerError):
                await self._store.release_lease(lock, token)
            raise

    async def last_success(self, name: str) -> datetime | None:
        return await self._store.daily_job_last_success(name)

    async def _due(self, name: str) -> bool:
        return is_due(self._clock.now(), self._settings.run_at, await self.last_success(name))

    async def _run_locked(
        self, name: str, lock: str, token: str, force: bool, progress: JobProgress | None
    ) -> JobOutcome:
        self._metrics.leases_held.labels("daily").inc()
        renewal = asyncio.create_task(
            keep_lease(self._store, Lease(lock, token), _ms(self._settings.lock_ttl))
        )
        started_s = monotonic_s()
        log_event(log, "daily.job_started", job=name, forced=force)
        try:
            summary = await self._work(name, progress)
        except Exception as exc:  # noqa: BLE001 - a job's failure, whatever it is, is reported
            duration_s = monotonic_s() - started_s
            failures = await self._count_failure(name)
            given_up = failures >= self._settings.max_failures
            # Keep the lock as the back-off: no replica tries again before `retry_after`, or
            # before the next run time once the job failed `max_failures` times in a row.
            if force:
                await self._store.release_lease(lock, token)
            else:
                hold = self._settings.retry_after
                if isinstance(exc, StoreUnavailable):
                    hold = min(hold, self._settings.outage_retry_after)
                if given_up:
                    now = self._clock.now()
                    hold = next_run_time(now, self._settings.run_at) - now
                await self._store.renew_lease(lock, token, _ms(hold))
            self._metrics.daily_job_runs.labels(name, "failed").inc()
            log_event(
                log,
                "daily.job_given_up" if given_up else "daily.job_failed",
                logging.ERROR,
                job=name,
                error_class=type(exc).__name__,
                error=str(exc)[:500],
                failures=failures,
                duration_s=round(duration_s, 3),
            )
            if given_up:
                self._metrics.handler_gave_up.labels("daily").inc()
                with contextlib.suppress(ConsumerError):
                    await self._store.clear_handler_failures("daily", name)
            return JobOutcome(name, True, False, "failed", str(exc), duration_s)
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            self._metrics.leases_held.labels("daily").dec()
        duration_s = monotonic_s() - started_s
        finished_at = self._clock.now()
        await self._store.record_daily_job_success(name, finished_at)
        await self._store.release_lease(lock, token)
        with contextlib.suppress(ConsumerError):
            await self._store.clear_handler_failures("daily", name)
        self._metrics.daily_job_last_success.labels(name).set(finished_at.timestamp())
        self._metrics.daily_job_runs.labels(name, "ok").inc()
        log_event(log, "daily.job_done", job=name, duration_s=round(duration_s, 3), **dict(summary))
        return JobOutcome(name, True, True, "done", "", duration_s, summary)

    async def _work(self, name: str, progress: JobProgress | None) -> dict[str, int]:
        if name == TEMPLATES_JOB:
            imported = await self._catalog.import_templates()
            if progress is not None:
                progress(TEMPLATES_JOB, imported.templates, imported.templates)
            return {**vars(imported), **await self._read_balance()}
        if name == OPTOUTS_JOB:
            found = await self._optouts.import_optouts()
            if progress is not None:
                progress(OPTOUTS_JOB, found.optouts_new, found.optouts_new)
            return dict(vars(found))
        summary: dict[str, int] = {}
        for group in self._groups:
            stage = f"group {group.group_id}"

            def report(done: int, total: int, stage: str = stage) -> None:
                if progress is not None:
                    progress(stage, done, total)

            build = await self._index.rebuild(self._client, group, self._clock.now(), report)
            summary[f"group_{group.group_id}_contacts"] = build.contacts
        return summary

    async def _read_balance(self) -> dict[str, int]:
        """The account's SMS credits, read once a day so the balance gauge is never older than
        a day even when nothing is sent; not being able to read it does not fail the import."""
        try:
            balance = await self._client.balance()
        except ConsumerError as exc:
            log_event(
                log,
                "daily.balance_check_failed",
                logging.WARNING,
                error_class=type(exc).__name__,
                error=str(exc)[:500],
            )
            return {}
        return {"sms_credits": int(balance.sms)}

    async def _count_failure(self, name: str) -> int:
        self._metrics.handler_failures.labels("daily").inc()
        try:
            return await self._store.count_handler_failure("daily", name)
        except ConsumerError:
            return 0  # Redis away: not counted, and the lock's back-off holds anyway

    async def _publish_last_successes(self) -> None:
        """Set the gauges from Redis, so a restarted replica reports what others did."""
        for name in JOB_NAMES:
            with contextlib.suppress(ConsumerError):
                last = await self.last_success(name)
                if last is not None:
                    self._metrics.daily_job_last_success.labels(name).set(last.timestamp())


def _ms(duration: timedelta) -> int:
    return int(duration.total_seconds() * 1000)
