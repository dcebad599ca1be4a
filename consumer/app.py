"""The daemon: builds every part from the settings, runs the chosen roles, stops gracefully.

    roles          tasks
    intake         Intake.run                       (Kafka input → Redis)
    executor       Executor.run                     (campaign steps against TextLocal)
    poller         Poller.run                       (daily delivery polls)
    daily          DailyJobs.run                    (templates, contact index, opt-outs)
    (always)       OutboxPublisher.run, campaign index upkeep and campaigns-by-state gauge,
                   HTTP /metrics /healthz /readyz

SIGTERM or SIGINT sets the stop event: intake stops taking records and commits what it handled,
the executor and poller finish their steps within the drain time and hand the rest back, the
outbox publishes what is recorded, then every client closes. Exit status 0 on a clean stop.

Redis and Kafka outages are waited out by every role (DESIGN §6a; `consumer.dependencies`
watches both for `/readyz` and the metrics). A role other than intake that fails unexpectedly
is restarted in-process after a growing back-off (1 s to 60 s), counted and logged; one that
keeps failing (5 times within 10 minutes) makes `/healthz` fail, so Kubernetes restarts the pod.
Intake is not restarted in-process: its consumer may hold records it has read but not handled,
so it stops the process with status 1, and the partitions are read again from the committed
offsets by the next process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from consumer.catalog import TemplateCatalog, templates_topic_spec
from consumer.clock import Clock, SystemClock, pause
from consumer.codec import SchemaRegistry
from consumer.config import Settings
from consumer.contact_index import ContactIndex
from consumer.contact_store import ContactStore
from consumer.daily_jobs import DailyJobs, DailyJobSettings
from consumer.dependencies import DependencyMonitor, FailureStreak
from consumer.errors import ConsumerError, TransientError
from consumer.executor import Executor, ExecutorSettings
from consumer.fault_points import FaultPoints, NoFaultPoints
from consumer.health import HealthState, health_app
from consumer.intake import Intake, IntakeSettings
from consumer.kafka_io import KafkaEventSource, KafkaPublisher, TopicSpec, ensure_topics
from consumer.keys import RedisKeys
from consumer.leased_work import holding
from consumer.logs import SCRUBBER, log_event
from consumer.metrics import Metrics
from consumer.optouts import OptOutImporter
from consumer.outbox import OutboxPublisher
from consumer.outcomes import OutcomeRecorder
from consumer.poller import Poller, PollerSettings
from consumer.rate_limit import AccountRateLimiter
from consumer.receipt_outcomes import ReceiptOutcomes
from consumer.receipts import receipts_app
from consumer.steps import FINISHED_CAMPAIGN_RETENTION_S, CampaignSteps, StepSettings
from consumer.store import CampaignStore, connect_redis
from consumer.templates import TemplateCopy
from consumer.textlocal import TextLocalClient
from consumer.workflow import CampaignState

log = logging.getLogger("consumer.app")

CAMPAIGN_GAUGE_EVERY_S = 30.0
FINISHED_CAMPAIGN_RETENTION = timedelta(seconds=FINISHED_CAMPAIGN_RETENTION_S)
# Held while one replica files the campaigns of an older version's index in their state sets.
CAMPAIGN_STATES_LEASE_MS = 10 * 60 * 1000
ROLE_RESTART_FIRST_S = 1.0
ROLE_RESTART_MAX_S = 60.0


@dataclass
class Parts:
    """Everything the roles share, built once."""

    settings: Settings
    clock: Clock
    metrics: Metrics
    registry: SchemaRegistry
    store: CampaignStore
    client: TextLocalClient
    publisher: KafkaPublisher
    index: ContactIndex
    templates: TemplateCopy
    steps: CampaignSteps
    owner: str
    faults: FaultPoints = field(default_factory=NoFaultPoints)
    closers: list[Callable[[], Awaitable[object]]] = field(default_factory=list)

    async def close(self) -> None:
        for close in reversed(self.closers):
            try:
                await close()
            except Exception as exc:  # noqa: BLE001 - closing must go on whatever failed
                log_event(log, "daemon.close_failed", logging.WARNING, error=repr(exc))


async def build_parts(
    settings: Settings,
    *,
    clock: Clock | None = None,
    faults: FaultPoints | None = None,
    metrics_registry: CollectorRegistry | None = None,
) -> Parts:
    """Connect to Redis, Kafka and TextLocal; refuses a Redis without persistence."""
    clock = clock or SystemClock()
    SCRUBBER.add_secrets(settings.secrets())
    metrics = Metrics(metrics_registry or CollectorRegistry())
    registry = SchemaRegistry.from_directory()
    redis = connect_redis(settings.redis.url)
    closers: list[Callable[[], Awaitable[object]]] = [redis.aclose]
    try:
        store = CampaignStore(redis, RedisKeys(prefix=settings.redis.key_prefix), registry)
        if not await store.check_persistence(allow_without=settings.redis.allow_no_persistence):
            log_event(log, "daemon.redis_without_persistence", logging.WARNING)
        kafka_config = settings.kafka.client_config()
        if settings.kafka.create_topics:
            await asyncio.to_thread(ensure_topics, kafka_config, topic_specs(settings))
        publisher = KafkaPublisher(kafka_config, settings.kafka.max_record_bytes)
        closers.append(publisher.close)
        textlocal = settings.textlocal
        rate_limiter = AccountRateLimiter(
            store,
            settings.credentials.account_id(textlocal.api_url),
            textlocal.rate_limit_per_s,
            burst=textlocal.rate_limit_burst,
            max_store_wait_s=textlocal.max_total_s,
            observer=metrics,
        )
        client = TextLocalClient(
            textlocal, settings.credentials, observer=metrics, rate_limiter=rate_limiter
        )
        await client.open()
        closers.append(client.close)
    except BaseException:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                await close()
        raise
    index = ContactIndex(ContactStore(redis, store.keys))
    templates = TemplateCopy(store, client)
    workflow = settings.workflow
    steps = CampaignSteps(
        store,
        index,
        client,
        templates,
        registry,
        settings.contact_groups,
        StepSettings(
            contact_load_concurrency=workflow.contact_load_concurrency,
            poll_interval=workflow.poll_interval,
            default_window_days=workflow.metrics_window_days,
            send_reconcile_grace=workflow.send_reconcile_grace,
            max_group_texts=workflow.max_group_texts,
            bulk_chunk_size=workflow.bulk_chunk_size,
            receipts=settings.receipts.enabled,
            receipt_url=settings.receipts.receipt_url,
            receipt_retention=settings.receipts.retention,
            outcomes_enabled=workflow.outcomes_enabled,
        ),
        clock,
        metrics,
        faults or NoFaultPoints(),
    )
    return Parts(
        settings=settings,
        clock=clock,
        metrics=metrics,
        registry=registry,
        store=store,
        client=client,
        publisher=publisher,
        index=index,
        templates=templates,
        steps=steps,
        owner=settings.instance_id,
        faults=faults or NoFaultPoints(),
        closers=closers,
    )


def topic_specs(settings: Settings) -> list[TopicSpec]:
    kafka = settings.kafka
    partitions = kafka.topic_partitions
    return [
        TopicSpec(kafka.input_topic, partitions, {}),
        TopicSpec(kafka.status_topic, partitions, {}),
        TopicSpec(kafka.metrics_topic, partitions, {}),
        TopicSpec(kafka.outcomes_topic, partitions, {}),
        TopicSpec(kafka.dlq_topic, partitions, {}),
        TopicSpec(kafka.optouts_topic, partitions, {}),
        templates_topic_spec(kafka.templates_topic, partitions),
    ]


class Daemon:
    """Runs the configured roles over shared parts until stopped."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.stopping = asyncio.Event()
        self._source: KafkaEventSource | None = None
        self._health: HealthState | None = None

    async def run(self, *, install_signal_handlers: bool = True) -> int:
        parts = self.parts
        settings = parts.settings
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop_on_signal, signum)
        roles = self._roles()
        health = HealthState(
            parts.clock,
            parts.metrics.registry,
            tuple(
                name
                for name in ("intake", "executor", "poller", "outbox", "receipts")
                if name in roles
            ),
            started_at=parts.clock.now(),
        )
        executor = roles.get("executor")
        if isinstance(executor, _Draining) and isinstance(executor.runner, Executor):
            health.work_probes["campaign"] = executor.runner.oldest_running_since
        self._health = health
        monitor = DependencyMonitor(
            {"redis": parts.store.ping, "kafka": parts.publisher.reachable}, parts.metrics
        )
        await monitor.probe_all()
        runner = await self._serve_http(health, monitor)
        receipt_runner = await self._serve_receipts()
        log_event(
            log,
            "daemon.started",
            roles=sorted(settings.roles),
            instance=parts.owner,
            http_port=settings.http_port,
            receipts_port=settings.receipts.port if receipt_runner else None,
            receipt_url_on_sends=settings.receipts.receipt_url is not None,
        )
        tasks = {
            asyncio.create_task(self._supervise(name, role), name=name): name
            for name, role in roles.items()
        }
        tasks[asyncio.create_task(self._refresh_campaign_gauge(), name="gauge")] = "gauge"
        watcher = asyncio.create_task(monitor.watch(self.stopping), name="dependencies")
        tasks[watcher] = "dependencies"
        exit_code = 0
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                exit_code = 1
                log_event(
                    log,
                    "daemon.role_crashed",
                    logging.ERROR,
                    role=tasks[task],
                    error=repr(task.exception()),
                )
        self.stopping.set()
        if receipt_runner is not None:
            await receipt_runner.cleanup()  # first: no receipt is accepted while stopping
        await self._finish(tasks)
        await runner.cleanup()
        await parts.close()
        log_event(log, "daemon.stopped", exit_code=exit_code)
        return exit_code

    async def _supervise(self, name: str, role: _Role) -> None:
        """Run a role; restart it after an unexpected failure (intake excepted, see above)."""
        delay_s = ROLE_RESTART_FIRST_S
        while True:
            try:
                await role.run(self.stopping)
                return
            except Exception as exc:
                if name == "intake" or self.stopping.is_set():
                    raise
                self.parts.metrics.role_restarts.labels(name).inc()
                if self._health is not None:
                    self._health.note_crash(name)
                log_event(
                    log,
                    "daemon.role_restarting",
                    logging.ERROR,
                    role=name,
                    error_class=type(exc).__name__,
                    error=str(exc)[:500],
                    restart_in_s=delay_s,
                    traceback="".join(traceback.format_exception(exc))[-4000:],
                )
            if await pause(self.stopping, delay_s):
                return
            delay_s = min(delay_s * 2, ROLE_RESTART_MAX_S)

    def _stop_on_signal(self, signum: int) -> None:
        log_event(log, "daemon.stopping", signal=signal.Signals(signum).name)
        self.stopping.set()

    async def _finish(self, tasks: Mapping[asyncio.Task[None], str]) -> None:
        """Wait for the roles to drain (they bound themselves); the outbox goes last."""
        drain_s = self.parts.settings.workflow.drain_timeout_s
        last = ("outbox", "receipts", "gauge", "dependencies")
        roles = [t for t, name in tasks.items() if name not in last]
        if roles:
            await asyncio.wait(roles, timeout=drain_s + 5)
        for task in roles:
            task.cancel()
        others = [t for t, name in tasks.items() if name in last]
        if others:
            await asyncio.wait(others, timeout=10)
        for task in others:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _roles(self) -> dict[str, _Role]:
        parts = self.parts
        settings = parts.settings
        workflow = settings.workflow
        roles: dict[str, _Role] = {
            "outbox": OutboxPublisher(
                parts.store,
                parts.publisher,
                settings.kafka.output_topics(),
                parts.metrics,
                parts.clock,
                parts.owner,
            )
        }
        if settings.receipts.enabled:
            # Wherever the listener runs; one replica at a time drains (a lease).
            roles["receipts"] = ReceiptOutcomes(
                parts.store,
                OutcomeRecorder(parts.store, parts.registry, parts.metrics.customer_outcomes),
                parts.metrics,
                parts.clock,
                parts.owner,
                parts.faults,
            )
        if "intake" in settings.roles:
            self._source = KafkaEventSource(
                settings.kafka.consumer_config(),
                [settings.kafka.input_topic],
                parts.metrics,
            )
            parts.closers.append(self._source.close)
            roles["intake"] = Intake(
                self._source,
                parts.publisher,
                parts.store,
                parts.registry,
                settings.contact_groups,
                IntakeSettings(
                    dlq_topic=settings.kafka.dlq_topic,
                    consumer_group=settings.kafka.group_id,
                    collect_timeout=workflow.collect_timeout,
                    limits=workflow.intake_limits,
                ),
                parts.clock,
                parts.metrics,
            )
        if "executor" in settings.roles:
            roles["executor"] = _Draining(
                Executor(
                    parts.store,
                    parts.steps,
                    parts.registry,
                    ExecutorSettings(
                        concurrency=workflow.executor_concurrency,
                        lease_ttl=workflow.lease_ttl,
                        max_send_delay=workflow.max_send_delay,
                        collect_timeout=workflow.collect_timeout,
                        max_handler_failures=workflow.max_handler_failures,
                    ),
                    parts.clock,
                    parts.metrics,
                    parts.owner,
                ),
                workflow.drain_timeout_s,
            )
        if "poller" in settings.roles:
            roles["poller"] = _Draining(
                Poller(
                    parts.store,
                    parts.client,
                    parts.steps,
                    parts.registry,
                    PollerSettings(
                        poll_interval=workflow.poll_interval,
                        default_window_days=workflow.metrics_window_days,
                        segment_retention=workflow.segment_retention,
                        lease_ttl=workflow.lease_ttl,
                        max_handler_failures=workflow.max_handler_failures,
                    ),
                    parts.clock,
                    parts.metrics,
                    parts.owner,
                    outcomes=(
                        OutcomeRecorder(
                            parts.store, parts.registry, parts.metrics.customer_outcomes
                        )
                        if workflow.outcomes_enabled
                        else None
                    ),
                    faults=parts.faults,
                ),
                workflow.drain_timeout_s,
            )
        if "daily" in settings.roles:
            roles["daily"] = daily_jobs(parts)
        return roles

    async def _serve_http(self, health: HealthState, monitor: DependencyMonitor) -> web.AppRunner:
        parts = self.parts

        async def redis_ready() -> str | None:
            return None if monitor.is_up("redis") else "Redis does not answer"

        async def kafka_ready() -> str | None:
            if not monitor.is_up("kafka"):
                return "no Kafka broker answers"
            if self._source is None or self._source.has_joined_group:
                return None
            return "not yet a member of the consumer group"

        app = health_app(
            health, {"redis": redis_ready, "kafka": kafka_ready}, parts.metrics.registry
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, parts.settings.http_host, parts.settings.http_port)
        await site.start()
        return runner

    async def _serve_receipts(self) -> web.AppRunner | None:
        """The receipt listener on its own port, when a receipt token is configured."""
        receipts = self.parts.settings.receipts
        if not receipts.enabled:
            return None
        app = receipts_app(receipts, self.parts.store, self.parts.metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, receipts.host, receipts.port).start()
        return runner

    async def _refresh_campaign_gauge(self) -> None:
        """`refresh_campaign_gauge` every `CAMPAIGN_GAUGE_EVERY_S`, until stopped."""
        parts = self.parts
        streak = FailureStreak(log, "daemon.gauge_failed")
        while not self.stopping.is_set():
            try:
                await refresh_campaign_gauge(
                    parts.store, parts.metrics, parts.clock.now(), parts.owner
                )
            except TransientError as exc:
                streak.failed(error=str(exc))
            else:
                streak.succeeded()
            await pause(self.stopping, CAMPAIGN_GAUGE_EVERY_S)


def daily_jobs(parts: Parts) -> DailyJobs:
    settings = parts.settings
    catalog = TemplateCatalog(
        parts.store,
        parts.templates,
        parts.client,
        parts.registry,
        settings.contact_groups,
        parts.clock,
    )
    optouts = OptOutImporter(
        parts.store,
        parts.index,
        parts.client,
        parts.registry,
        settings.contact_groups,
        parts.clock,
        parts.metrics,
    )
    return DailyJobs(
        parts.store,
        catalog,
        parts.index,
        parts.client,
        settings.contact_groups,
        DailyJobSettings(run_at=settings.workflow.daily_jobs_at),
        parts.clock,
        parts.metrics,
        parts.owner,
        optouts,
    )


async def refresh_campaign_gauge(
    store: CampaignStore, metrics: Metrics, now: datetime, owner: str
) -> dict[CampaignState, int]:
    """One cycle: trim the campaigns whose retention ended from the index, then set the
    campaigns-by-state gauge (the same figure on every replica: aggregate by max). The work is
    the same however many campaigns ever ran (DESIGN §6a)."""
    await index_campaign_states_once(store, owner)
    await store.trim_campaign_index(now, FINISHED_CAMPAIGN_RETENTION)
    counts = await store.campaign_counts()
    for state, count in counts.items():
        metrics.campaigns.labels(state.value).set(count)
    return counts


async def index_campaign_states_once(store: CampaignStore, owner: str) -> None:
    """On a Redis written by a version without the campaign state sets, one replica (lease)
    files the index's campaigns in them; afterwards this is one EXISTS."""
    if await store.campaign_states_indexed():
        return
    token = f"{owner}:{uuid.uuid4().hex[:8]}"
    async with holding(
        store, store.keys.campaign_states_lease, token, CAMPAIGN_STATES_LEASE_MS
    ) as held:
        if held is not None:
            dropped = await store.index_campaign_states()
            log_event(log, "daemon.campaign_states_indexed", dropped_from_index=dropped)


class _Role(Protocol):
    async def run(self, stopping: asyncio.Event) -> None: ...


class _DrainingRunner(Protocol):
    async def run(self, stopping: asyncio.Event, drain_timeout_s: float) -> None: ...


@dataclass
class _Draining:
    """A role (executor, poller) that drains within the configured time when stopped."""

    runner: _DrainingRunner
    drain_timeout_s: float

    async def run(self, stopping: asyncio.Event) -> None:
        await self.runner.run(stopping, self.drain_timeout_s)


async def run_daemon(settings: Settings, faults: FaultPoints | None = None) -> int:
    """Build the parts and run until a signal; the exit status for the CLI."""
    try:
        parts = await build_parts(settings, faults=faults)
    except ConsumerError as exc:
        log_event(log, "daemon.start_failed", logging.ERROR, error=str(exc))
        return 2
    return await Daemon(parts).run()
