"""The daily jobs: their schedule, one replica per run under the day's lock, and runs on demand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from consumer.catalog import TemplateCatalog
from consumer.clock import to_millis
from consumer.contact_index import ContactIndex
from consumer.contact_store import ContactStore
from consumer.daily_jobs import (
    CONTACTS_JOB,
    JOB_NAMES,
    TEMPLATES_JOB,
    DailyJobs,
    DailyJobSettings,
    is_due,
    latest_run_time,
    next_run_time,
)
from consumer.errors import StoreUnavailable
from consumer.keys import RedisKeys
from consumer.metrics import Metrics
from consumer.optouts import OptOutImporter
from consumer.store import CampaignStore
from consumer.templates import TemplateCopy
from consumer.textlocal import TextLocalClient, TextLocalCredentials, TextLocalSettings
from consumer.workflow import ContactGroup
from tests.helpers import REGISTRY, eventually
from textlocal_sandbox import FaultRule, ManualClock, SandboxHandle

AT_3 = time(3, 0)


def utc(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2025, 3, day, hour, minute, tzinfo=UTC)


# --- pure schedule -------------------------------------------------------------------------------


def test_latest_run_time_is_today_once_the_time_has_passed() -> None:
    """At 03:00 or later it is today's 03:00; before, yesterday's."""
    assert latest_run_time(utc(5, 3), AT_3) == utc(5, 3)
    assert latest_run_time(utc(5, 2, 59), AT_3) == utc(4, 3)
    assert next_run_time(utc(5, 2, 59), AT_3) == utc(5, 3)
    assert next_run_time(utc(5, 3), AT_3) == utc(6, 3)


def test_a_job_that_never_succeeded_is_due_at_once() -> None:
    """No last success: due whatever the time, so a fresh deployment runs it at start."""
    assert is_due(utc(5, 14), AT_3, None)


def test_a_job_is_due_again_at_the_next_scheduled_time() -> None:
    """Succeeded at yesterday's run: not due at 02:59, due at 03:00."""
    last = utc(4, 3, 2)
    assert not is_due(utc(5, 2, 59), AT_3, last)
    assert is_due(utc(5, 3), AT_3, last)


def test_a_missed_run_is_caught_up() -> None:
    """A replica back after two days without a run finds the job due."""
    assert is_due(utc(7, 11), AT_3, utc(4, 3, 5))


# --- against Redis and the sandbox -------------------------------------------------------------

UK_CONTACTS = 2_500  # three get_contacts pages
VIP_CONTACTS = 1_200  # two pages


@dataclass
class JobsRig:
    sandbox: SandboxHandle
    store: CampaignStore
    client: TextLocalClient
    index: ContactIndex
    groups: tuple[ContactGroup, ...]
    clock: ManualClock

    def replica(
        self,
        owner: str,
        retry_after: timedelta = timedelta(minutes=15),
        outage_retry_after: timedelta = timedelta(seconds=30),
        index: ContactIndex | None = None,
    ) -> tuple[DailyJobs, Metrics]:
        metrics = Metrics(CollectorRegistry())
        copy = TemplateCopy(self.store, self.client)
        catalog = TemplateCatalog(self.store, copy, self.client, REGISTRY, self.groups, self.clock)
        jobs = DailyJobs(
            self.store,
            catalog,
            index or self.index,
            self.client,
            self.groups,
            DailyJobSettings(
                run_at=AT_3,
                retry_after=retry_after,
                outage_retry_after=outage_retry_after,
                wake_every_s=0.02,
            ),
            self.clock,
            metrics,
            owner,
            OptOutImporter(
                self.store, self.index, self.client, REGISTRY, self.groups, self.clock, metrics
            ),
        )
        return jobs, metrics

    async def calls(self, command: str) -> int:
        return (await self.sandbox.admin.call_counts()).get(command, 0)

    async def record_success(self, job: str, at: datetime) -> None:
        await self.store.redis.set(self.store.keys.daily_job_last_success(job), to_millis(at))


@pytest.fixture
async def rig(
    sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str
) -> AsyncIterator[JobsRig]:
    uk_id = await sandbox.admin.generate_contacts("UK customers", UK_CONTACTS)
    vip_id = await sandbox.admin.generate_contacts(
        "VIP customers", VIP_CONTACTS, first_number=447_800_000_000, id_field="custom2"
    )
    await sandbox.admin.seed_templates(
        [{"title": "OPT_Welcome", "body": "Hi"}, {"title": "VIP_Gold", "body": "Gold"}]
    )
    groups = (
        ContactGroup(uk_id, "UK customers", "OPT_", "custom1"),
        ContactGroup(vip_id, "VIP customers", "VIP_", "custom2"),
    )
    store = CampaignStore(redis_client, RedisKeys(prefix=key_prefix), REGISTRY)
    settings = TextLocalSettings(
        api_url=sandbox.url, rate_limit_per_s=1000, backoff_base_s=0.01, backoff_cap_s=0.02
    )
    async with TextLocalClient(settings, TextLocalCredentials.from_api_key(sandbox.api_key)) as c:
        yield JobsRig(
            sandbox,
            store,
            c,
            ContactIndex(ContactStore(redis_client, store.keys)),
            groups,
            sandbox.clock,
        )


@pytest.mark.integration
async def test_a_fresh_deployment_runs_every_job_at_start(rig: JobsRig) -> None:
    """No success recorded: the loop imports templates, indexes both groups and reads the
    opt-outs at once, once each."""
    rig.clock.set(utc(5, 14))
    jobs, metrics = rig.replica("replica-1")
    stopping = asyncio.Event()
    loop = asyncio.create_task(jobs.run(stopping))

    async def both_succeeded() -> bool:
        return None not in [await jobs.last_success(job) for job in JOB_NAMES]

    await eventually(both_succeeded, timeout_s=15)
    await asyncio.sleep(0.2)  # ten more wakes: nothing runs again
    stopping.set()
    await asyncio.wait_for(loop, timeout=5)

    assert await rig.calls("get_templates") == 1
    assert await rig.calls("get_contacts") == 5
    assert await rig.calls("get_optouts") == 1
    assert await rig.index.size(rig.groups[0].group_id) == UK_CONTACTS
    assert await rig.index.size(rig.groups[1].group_id) == VIP_CONTACTS
    assert len(await TemplateCopy(rig.store, rig.client).stored_all()) == 2
    for job in JOB_NAMES:
        assert (
            metrics.registry.get_sample_value(
                "textlocal_consumer_daily_job_runs_total", {"daily_job": job, "outcome": "ok"}
            )
            == 1
        )
        gauge = metrics.registry.get_sample_value(
            "textlocal_consumer_daily_job_last_success_timestamp_seconds", {"daily_job": job}
        )
        assert gauge is not None
        assert gauge >= utc(5, 14).timestamp()


@pytest.mark.integration
async def test_two_replicas_at_the_scheduled_time_run_each_job_once(rig: JobsRig) -> None:
    """Both replicas wake at 03:00; the day's lock lets one import and one index refresh run."""
    for job in (TEMPLATES_JOB, CONTACTS_JOB):
        await rig.record_success(job, utc(4, 3, 1))
    rig.clock.set(utc(5, 2, 59))
    (first, first_metrics), (second, second_metrics) = rig.replica("r1"), rig.replica("r2")
    stopping = asyncio.Event()
    loops = [asyncio.create_task(j.run(stopping)) for j in (first, second)]
    await asyncio.sleep(0.1)  # several wakes before the time: nothing runs
    assert await rig.calls("get_templates") == 0

    rig.clock.advance(timedelta(minutes=1))

    async def both_ran_today() -> bool:
        times = [await first.last_success(TEMPLATES_JOB), await first.last_success(CONTACTS_JOB)]
        return all(t is not None and t >= utc(5, 3) for t in times)

    await eventually(both_ran_today, timeout_s=15)
    await asyncio.sleep(0.2)
    stopping.set()
    await asyncio.wait_for(asyncio.gather(*loops), timeout=5)

    assert await rig.calls("get_templates") == 1
    assert await rig.calls("get_contacts") == 5
    for job in (TEMPLATES_JOB, CONTACTS_JOB):
        runs = [
            m.registry.get_sample_value(
                "textlocal_consumer_daily_job_runs_total", {"daily_job": job, "outcome": "ok"}
            )
            or 0
            for m in (first_metrics, second_metrics)
        ]
        assert sum(runs) == 1


@pytest.mark.integration
async def test_a_failed_run_backs_off_then_runs_again(rig: JobsRig) -> None:
    """get_templates failing: the job reports it, is locked for the back-off, then succeeds."""
    await rig.sandbox.admin.set_faults([FaultRule("http_5xx", command="get_templates", limit=5)])
    rig.clock.set(utc(5, 3, 30))
    jobs, metrics = rig.replica("r1", retry_after=timedelta(milliseconds=300))
    failed = await jobs.run_job(TEMPLATES_JOB)
    assert (failed.ran, failed.ok, failed.reason) == (True, False, "failed")
    assert "HTTP 503" in failed.detail
    other, _ = rig.replica("r2")
    assert (await other.run_job(TEMPLATES_JOB)).reason == "locked"  # backing off
    assert await jobs.last_success(TEMPLATES_JOB) is None

    async def ran_again() -> bool:
        return (await other.run_job(TEMPLATES_JOB)).reason == "done"

    await eventually(ran_again, timeout_s=5, interval_s=0.05)
    assert await rig.calls("get_templates") == 6
    assert (
        metrics.registry.get_sample_value(
            "textlocal_consumer_daily_job_runs_total",
            {"daily_job": TEMPLATES_JOB, "outcome": "failed"},
        )
        == 1
    )


class IndexWithRedisAway(ContactIndex):
    """The contact index whose first rebuild meets Redis away (as a SIGKILLed Redis would
    make it fail), then works."""

    failed = False

    async def rebuild(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise StoreUnavailable("Redis HSET contact index: ConnectionError (test)")
        return await super().rebuild(*args, **kwargs)


@pytest.mark.integration
async def test_a_run_failed_by_a_redis_outage_goes_again_soon_after(rig: JobsRig) -> None:
    """A contact refresh that failed because Redis was away holds the job only for the short
    outage back-off, not `retry_after` (15 min): campaigns may be waiting for its index."""
    rig.clock.set(utc(5, 3, 30))
    away = IndexWithRedisAway(ContactStore(rig.store.redis, rig.store.keys))
    jobs, _ = rig.replica("r1", outage_retry_after=timedelta(milliseconds=300), index=away)
    failed = await jobs.run_job(CONTACTS_JOB)
    assert (failed.ran, failed.ok, failed.reason) == (True, False, "failed")
    other, _ = rig.replica("r2")
    assert (await other.run_job(CONTACTS_JOB)).reason == "locked"  # the short back-off

    async def ran_again() -> bool:
        return (await other.run_job(CONTACTS_JOB)).reason == "done"

    await eventually(ran_again, timeout_s=5, interval_s=0.05)
    assert await rig.index.size(rig.groups[0].group_id) == UK_CONTACTS


@pytest.mark.integration
async def test_on_demand_run_reports_progress_even_when_not_due(rig: JobsRig) -> None:
    """A forced contacts refresh runs though it ran today, reporting each group's progress."""
    rig.clock.set(utc(5, 9))
    await rig.record_success(CONTACTS_JOB, utc(5, 3, 2))
    jobs, _ = rig.replica("cli")
    assert (await jobs.run_job(CONTACTS_JOB)).reason == "not-due"
    seen: list[tuple[str, int, int]] = []
    outcome = await jobs.run_job(
        CONTACTS_JOB,
        force=True,
        progress=lambda stage, done, total: seen.append((stage, done, total)),
    )
    assert (outcome.ran, outcome.ok, outcome.reason) == (True, True, "done")
    uk, vip = (f"group {g.group_id}" for g in rig.groups)
    assert (uk, UK_CONTACTS, UK_CONTACTS) in seen
    assert (vip, VIP_CONTACTS, VIP_CONTACTS) in seen
    assert [done for stage, done, _ in seen if stage == uk] == sorted(
        done for stage, done, _ in seen if stage == uk
    )
    assert dict(outcome.summary) == {
        f"group_{rig.groups[0].group_id}_contacts": UK_CONTACTS,
        f"group_{rig.groups[1].group_id}_contacts": VIP_CONTACTS,
    }
    last = await jobs.last_success(CONTACTS_JOB)
    assert last is not None
    assert last >= utc(5, 9)


@pytest.mark.integration
async def test_an_on_demand_run_waits_for_a_running_one(rig: JobsRig) -> None:
    """While another replica holds the day's lock, a forced run does nothing and says so."""
    rig.clock.set(utc(5, 9))
    lock = rig.store.keys.daily_job_lock(TEMPLATES_JOB, "2025-03-05")
    assert await rig.store.acquire_lease(lock, "busy-replica", 60_000)
    jobs, _ = rig.replica("cli")
    outcome = await jobs.run_job(TEMPLATES_JOB, force=True)
    assert (outcome.ran, outcome.reason) == (False, "locked")
    assert await rig.calls("get_templates") == 0


@pytest.mark.integration
async def test_the_template_import_reads_the_credit_balance(rig: JobsRig) -> None:
    """After importing the templates the job reads the balance (for the credit gauge) and
    reports the SMS credits; a balance TextLocal does not give does not fail the import."""
    rig.clock.set(utc(5, 9))
    jobs, _ = rig.replica("r1")
    await rig.sandbox.admin.set_balance(sms=7_654)
    done = await jobs.run_job(TEMPLATES_JOB, force=True)
    assert (done.ok, done.reason) == (True, "done")
    assert done.summary["sms_credits"] == 7_654
    assert await rig.calls("balance") == 1

    await rig.sandbox.admin.set_faults([FaultRule("http_5xx", command="balance")])
    still_done = await jobs.run_job(TEMPLATES_JOB, force=True)
    await rig.sandbox.admin.clear_faults()
    assert (still_done.ok, still_done.reason) == (True, "done")
    assert "sms_credits" not in still_done.summary
    assert still_done.summary["templates"] == 2


@pytest.mark.integration
async def test_an_unknown_job_name_is_refused(rig: JobsRig) -> None:
    """Only "templates", "contacts" and "optouts" exist."""
    jobs, _ = rig.replica("cli")
    with pytest.raises(ValueError, match="unknown daily job 'invoices'"):
        await jobs.run_job("invoices")
