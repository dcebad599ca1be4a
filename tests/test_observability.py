"""Metrics move as a campaign runs and pass promtool; /metrics is prometheus_client's own
exposition (with the process collectors, and OpenMetrics on request); health and readiness say
what is wrong."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from consumer.clock import ManualClock
from consumer.health import HEALTH_PATH, METRICS_PATH, READY_PATH, HealthState, health_app
from consumer.metrics import Metrics
from tests.helpers import new_ref
from tests.rigs import WorkflowRig, customer_ids, workflow_rig
from textlocal_sandbox import SandboxHandle

PREFIX = "textlocal_consumer_"


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(PREFIX + name, labels or {})
    return 0.0 if value is None else value


@pytest.fixture
async def rig(
    sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str
) -> AsyncIterator[WorkflowRig]:
    async with workflow_rig(sandbox, redis_client, key_prefix, contacts=2000) as assembled:
        yield assembled


@pytest.mark.integration
async def test_metrics_move_as_a_campaign_runs(rig: WorkflowRig) -> None:
    """Running one campaign moves the contact, SMS, credit, transition and request metrics."""
    metrics = rig.metrics
    assert sample(metrics, "sms_accepted_total") == 0
    assert (
        metrics.registry.get_sample_value(PREFIX + "textlocal_credit_balance", {"kind": "sms"})
        is None
    )
    await rig.sandbox.admin.set_balance(sms=54_321)
    ref = new_ref()
    await rig.submit(ref, [*customer_ids(1, 1600), "NOBODY"])
    await rig.executor.run_until_idle()

    assert sample(metrics, "contacts_loaded_total") == 1600
    assert sample(metrics, "sms_accepted_total") == 1600
    assert sample(metrics, "credits_spent_total") == 1600
    assert sample(metrics, "unmatched_customers_total", {"reason": "unmatched"}) == 1
    assert sample(metrics, "campaign_transitions_total", {"state": "SENT"}) == 1
    send_requests = {"command": "send", "outcome": "ok"}
    assert sample(metrics, "textlocal_request_duration_seconds_count", send_requests) == 1
    bulk = {"command": "create_contacts_bulk", "outcome": "ok"}
    assert sample(metrics, "textlocal_request_duration_seconds_count", bulk) == 2
    # The balance checked before the send.
    assert sample(metrics, "textlocal_credit_balance", {"kind": "sms"}) == 54_321
    assert sample(metrics, "textlocal_credit_balance_checked_timestamp_seconds") > 0


@pytest.mark.integration
async def test_exposition_passes_promtool(rig: WorkflowRig) -> None:
    """The /metrics text after a campaign is valid exposition (`promtool check metrics`)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is required in CI (Debian package `prometheus`)")
        pytest.skip("promtool not installed")
    await rig.submit(new_ref(), customer_ids(1, 10))
    await rig.executor.run_until_idle()
    exposition = generate_latest(rig.metrics.registry)
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_registry_carries_the_process_platform_and_gc_collectors() -> None:
    """The registry passed to Metrics also holds prometheus_client's process, platform and GC
    collectors, so /metrics shows memory, CPU, file descriptors and the Python version."""
    registry = CollectorRegistry()
    Metrics(registry)
    assert registry.get_sample_value("process_cpu_seconds_total") is not None
    assert registry.get_sample_value("process_resident_memory_bytes") is not None
    assert any(s.name == "python_info" for m in registry.collect() for s in m.samples)
    assert registry.get_sample_value("python_gc_objects_collected_total", {"generation": "0"})
    assert (
        sample(Metrics(CollectorRegistry()), "campaign_transitions_total", {"state": "FAILED"}) == 0
    )


def health_state(clock: ManualClock, metrics: Metrics) -> HealthState:
    return HealthState(
        clock,
        metrics.registry,
        ("intake", "executor"),
        loop_stall_after=timedelta(minutes=2),
        work_stuck_after=timedelta(hours=1),
        started_at=clock.now(),
    )


def test_silent_loop_is_unhealthy() -> None:
    """A role whose loop has not come round within the bound makes /healthz fail."""
    clock = ManualClock(datetime(2026, 11, 27, tzinfo=UTC))
    metrics = Metrics(CollectorRegistry())
    health = health_state(clock, metrics)
    assert health.problems() == []
    clock.advance(timedelta(minutes=3))
    metrics.loop_last_iteration.labels("intake").set(clock.now().timestamp())
    assert health.problems() == ["executor loop silent for 180s"]


def test_stuck_work_is_unhealthy() -> None:
    """A unit of work running longer than the bound makes /healthz fail."""
    clock = ManualClock(datetime(2026, 11, 27, tzinfo=UTC))
    metrics = Metrics(CollectorRegistry())
    health = health_state(clock, metrics)
    started = clock.now()
    health.work_probes["campaign"] = lambda: started
    clock.advance(timedelta(minutes=61))
    for role in ("intake", "executor"):
        metrics.loop_last_iteration.labels(role).set(clock.now().timestamp())
    assert health.problems() == ["campaign running for 3660s"]


async def test_endpoints_answer_200_or_503_with_reasons() -> None:
    """/healthz, /readyz and /metrics answer over HTTP; a failing check gives 503 and its reason."""
    clock = ManualClock(datetime.now(UTC))
    metrics = Metrics(CollectorRegistry())
    health = health_state(clock, metrics)
    redis_up = True

    async def redis_check() -> str | None:
        return None if redis_up else "Redis does not answer"

    runner = web.AppRunner(health_app(health, {"redis": redis_check}, metrics.registry))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get(HEALTH_PATH) as response:
                assert response.status == 200
            async with http.get(READY_PATH) as response:
                assert response.status == 200
            redis_up = False
            async with http.get(READY_PATH) as response:
                assert response.status == 503
                assert (await response.json())["failing"] == {"redis": "Redis does not answer"}
            clock.advance(timedelta(minutes=5))
            async with http.get(HEALTH_PATH) as response:
                assert response.status == 503
                assert "intake loop silent" in (await response.json())["problems"][0]
            async with http.get(METRICS_PATH) as response:
                assert response.status == 200
                assert response.content_type == "text/plain"
                assert "textlocal_consumer_sms_accepted_total" in await response.text()
    finally:
        await runner.cleanup()


async def test_metrics_endpoint_answers_openmetrics_when_asked() -> None:
    """An OpenMetrics Accept header gets OpenMetrics (ending in `# EOF`); without one, the
    Prometheus text format; `name[]` selects metrics."""
    clock = ManualClock(datetime.now(UTC))
    metrics = Metrics(CollectorRegistry())
    metrics.sms_accepted.inc(3)
    runner = web.AppRunner(health_app(health_state(clock, metrics), {}, metrics.registry))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    openmetrics = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get(METRICS_PATH, headers={"Accept": openmetrics}) as response:
                assert response.status == 200
                assert response.content_type == "application/openmetrics-text"
                text = await response.text()
                assert text.endswith("# EOF\n")
                assert "textlocal_consumer_sms_accepted_total 3.0" in text
            async with http.get(METRICS_PATH) as response:
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                assert "# EOF" not in await response.text()
            selected = {"name[]": "textlocal_consumer_sms_accepted_total"}
            async with http.get(METRICS_PATH, params=selected) as response:
                text = await response.text()
                assert "textlocal_consumer_sms_accepted_total 3.0" in text
                assert "process_cpu_seconds_total" not in text
    finally:
        await runner.cleanup()
