#!/usr/bin/env python3
"""Benchmark: how soon a killed replica's input partitions are read again.

    .venv/bin/python bench/bench_takeover.py [--session-timeout-ms 10000] [--no-librdkafka-default]

Two daemons (`python -m consumer.cli run`, every role) share a 6-partition input topic. Before
anything is stopped, a probe CampaignScheduled is published to each partition and the daemons'
logs say which replica reads which. Then replica B is stopped and, at once, a CampaignScheduled
is published to each of B's partitions. Measured from the signal, polling every 0.2 s:
- **takeover**: until the survivor A holds all 6 partitions (its /metrics gauge
  `textlocal_consumer_partitions_assigned`);
- **handled**: until every event published to B's partitions is recorded in Redis (the campaign
  hash appears, COLLECTING: it is handled by whichever replica reads the partition by then).

Scenarios, each on topics and a consumer group of its own:
1. dynamic membership, B SIGKILLed — with `kafka.session_timeout_ms` (default 10,000) and, for
   comparison, with librdkafka's default 45,000 (skip with `--no-librdkafka-default`);
2. static membership (`kafka.group_instance_id` per daemon), B SIGKILLed and started again at
   once with the same instance id: until B holds its partitions again, and whether A saw a
   rebalance (A's gauge leaving 3, or A logging a change of assignment);
3. static membership, B SIGKILLed and not started again: A's takeover (the session timeout);
4. SIGTERM, not started again (a scale-down), dynamic and static: a dynamic member leaves the
   group as it closes, a static one does not.
Needs the local stack (`make stack-up`; or `$KAFKA_BOOTSTRAP_SERVERS` and `$REDIS_URL`) and runs
its own sandbox; `make bench` runs it. Deletes its topics and Redis keys and stops its processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from any directory

from bench.common import free_port, stack_services  # noqa: E402
from consumer.codec import SchemaRegistry  # noqa: E402
from consumer.events import CampaignRef, CampaignScheduled  # noqa: E402
from consumer.keys import RedisKeys  # noqa: E402
from textlocal_sandbox import SandboxAdminClient  # noqa: E402

API_KEY = "bench-key"
WORK = REPO / ".cache" / "bench"
PARTITIONS = 6
POLL_S = 0.2
GAUGE = "textlocal_consumer_partitions_assigned"
REGISTRY = SchemaRegistry.from_directory()


@dataclass
class Replica:
    """One daemon process, its settings and its JSON log."""

    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def http_port(self) -> int:
        return int(self.env["TEXTLOCAL_CONSUMER_HTTP_PORT"])

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consumer.cli", "run"],
                cwd=self.env["PYTHONPATH"],
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    async def partitions(self, session: aiohttp.ClientSession) -> int | None:
        """Its gauge of assigned input partitions; None while it does not answer."""
        try:
            async with session.get(
                f"http://127.0.0.1:{self.http_port}/metrics",
                timeout=aiohttp.ClientTimeout(total=1),
            ) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        for line in text.splitlines():
            if line.startswith(GAUGE + " ") or line.startswith(GAUGE + "{"):
                return int(float(line.rsplit(" ", 1)[1]))
        return None

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    lines.append(entry)
        return lines

    def partitions_read(self, campaigns: set[str]) -> set[int]:
        """The partitions from which it handled any of `campaigns` (its intake.event lines)."""
        return {
            int(str(entry["partition"]))
            for entry in self.log_lines()
            if entry.get("event") == "intake.event" and entry.get("campaign") in campaigns
        }

    def assignment_changes_since(self, since: datetime) -> int:
        return sum(
            1
            for entry in self.log_lines()
            if entry.get("event") in ("kafka.partitions_assigned", "kafka.partitions_revoked")
            and datetime.fromisoformat(str(entry["ts"])) >= since
        )


@dataclass(frozen=True)
class Scenario:
    title: str
    session_timeout_ms: int
    static: bool
    stop_signal: signal.Signals
    restart: bool = False


@dataclass
class Figures:
    scenario: Scenario
    killed_partitions: tuple[int, ...] = ()
    takeover_s: float | None = None  # until A holds all 6
    handled_s: float | None = None  # until every event on B's partitions is in Redis
    rejoined_s: float | None = None  # until restarted B holds its partitions again
    survivor_gauges: list[int] = field(default_factory=list)  # A's distinct readings, in order
    survivor_changes: int = 0  # A's assignment log lines after the stop


@dataclass(frozen=True)
class World:
    code: Path
    bootstrap: str
    redis: aioredis.Redis
    redis_url: str
    prefix: str
    sandbox_url: str
    group_id: int
    template_id: int

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(prefix=self.prefix)

    def replica(self, name: str, scenario: Scenario, topics: Mapping[str, str]) -> Replica:
        env = {
            **os.environ,
            "PYTHONPATH": str(self.code),
            "TEXTLOCAL_CONSUMER_INSTANCE_ID": name,
            "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "TEXTLOCAL_CONSUMER_KAFKA_INPUT_TOPIC": topics["input"],
            "TEXTLOCAL_CONSUMER_KAFKA_STATUS_TOPIC": topics["status"],
            "TEXTLOCAL_CONSUMER_KAFKA_METRICS_TOPIC": topics["metrics"],
            "TEXTLOCAL_CONSUMER_KAFKA_TEMPLATES_TOPIC": topics["templates"],
            "TEXTLOCAL_CONSUMER_KAFKA_DLQ_TOPIC": topics["dlq"],
            "TEXTLOCAL_CONSUMER_KAFKA_GROUP_ID": f"{topics['input']}-daemon",
            "TEXTLOCAL_CONSUMER_KAFKA_CREATE_TOPICS": "true",
            "TEXTLOCAL_CONSUMER_KAFKA_TOPIC_PARTITIONS": str(PARTITIONS),
            "TEXTLOCAL_CONSUMER_KAFKA_SESSION_TIMEOUT_MS": str(scenario.session_timeout_ms),
            "TEXTLOCAL_CONSUMER_REDIS_URL": self.redis_url,
            "TEXTLOCAL_CONSUMER_REDIS_KEY_PREFIX": self.prefix,
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_URL": self.sandbox_url,
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": API_KEY,
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_RATE_LIMIT_PER_S": "1000",
            "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": json.dumps(
                [{"id": self.group_id, "template_prefix": "OPT_", "customer_id_field": "custom1"}]
            ),
            "TEXTLOCAL_CONSUMER_HTTP_HOST": "127.0.0.1",
            "TEXTLOCAL_CONSUMER_HTTP_PORT": str(free_port()),
            "TEXTLOCAL_CONSUMER_LOG_FORMAT": "json",
        }
        env.pop("TEXTLOCAL_CONSUMER_KAFKA_GROUP_INSTANCE_ID", None)
        if scenario.static:
            env["TEXTLOCAL_CONSUMER_KAFKA_GROUP_INSTANCE_ID"] = f"{topics['input']}-{name}"
        return Replica(name, env, WORK / f"takeover-{topics['input']}-{name}.log")

    def publish(self, topic: str, partitions: Sequence[int]) -> list[CampaignRef]:
        """A CampaignScheduled (one batch to come) to each partition; their campaigns."""
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 0})
        refs = []
        now = datetime.now(UTC)
        for partition in partitions:
            ref = CampaignRef(7, f"takeover-{uuid.uuid4().hex[:8]}-p{partition}", 505)
            header = CampaignScheduled(
                event_id=str(uuid.uuid4()),
                occurred_at=now,
                ref=ref,
                template_id=self.template_id,
                template_name="OPT_Takeover",
                scheduled_at=now,
                message_type="SMS",
                recipient_count=1,
                batch_count=1,
            )
            value = REGISTRY.encode("CampaignScheduled", header.to_fields())
            producer.produce(topic, key=ref.key.encode(), value=value, partition=partition)
            refs.append(ref)
        if producer.flush(30):
            raise SystemExit("Kafka did not take the events within 30 s")
        return refs

    async def recorded(self, refs: Sequence[CampaignRef]) -> bool:
        found = await asyncio.gather(*(self.redis.exists(self.keys.campaign(r.key)) for r in refs))
        return all(found)


async def until(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float, interval_s: float = POLL_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout_s:.0f}s")
        await asyncio.sleep(interval_s)


async def run_scenario(world: World, scenario: Scenario) -> Figures:
    tag = uuid.uuid4().hex[:8]
    kinds = ("input", "status", "metrics", "templates", "dlq")
    topics = {kind: f"bench-takeover-{tag}-{kind}" for kind in kinds}
    a, b = (world.replica(name, scenario, topics) for name in ("a", "b"))
    figures = Figures(scenario)
    print(f"[{scenario.title}] starting two daemons ...", flush=True)
    try:
        async with aiohttp.ClientSession() as session:
            a.start()
            await until(lambda: _holds(a, session, PARTITIONS), "A holds 6 partitions", 120)
            b.start()
            await until(
                lambda: _both_hold(a, b, session, PARTITIONS // 2), "A and B hold 3 each", 120
            )
            probes = world.publish(topics["input"], range(PARTITIONS))
            await until(lambda: world.recorded(probes), "probes handled", 60)
            probe_keys = {ref.key for ref in probes}
            killed = sorted(b.partitions_read(probe_keys))
            if len(killed) != PARTITIONS // 2 or set(killed) & a.partitions_read(probe_keys):
                raise SystemExit(f"unexpected assignment: B read {killed}")
            figures.killed_partitions = tuple(killed)
            await asyncio.sleep(1)  # nothing in flight

            stopped_at = datetime.now(UTC)
            started_s = time.monotonic()
            b.signal(scenario.stop_signal)
            if scenario.stop_signal == signal.SIGKILL:
                assert b.process is not None
                b.process.wait(10)
                if scenario.restart:
                    b.start()
            events = await asyncio.to_thread(world.publish, topics["input"], killed)
            deadline_s = started_s + scenario.session_timeout_ms / 1000 + 60
            while time.monotonic() < deadline_s:
                elapsed_s = time.monotonic() - started_s
                held = await a.partitions(session)
                if held is not None and (
                    not figures.survivor_gauges or figures.survivor_gauges[-1] != held
                ):
                    figures.survivor_gauges.append(held)
                if figures.takeover_s is None and held == PARTITIONS:
                    figures.takeover_s = elapsed_s
                if (
                    scenario.restart
                    and figures.rejoined_s is None
                    and await b.partitions(session) == PARTITIONS // 2
                ):
                    figures.rejoined_s = elapsed_s
                if figures.handled_s is None and await world.recorded(events):
                    figures.handled_s = elapsed_s
                settled = figures.handled_s is not None and (
                    figures.rejoined_s is not None
                    if scenario.restart
                    else figures.takeover_s is not None
                )
                if settled:
                    break
                await asyncio.sleep(max(0.0, started_s + elapsed_s + POLL_S - time.monotonic()))
            if scenario.restart:
                # Long enough for a rebalance to show if the rejoin caused one.
                await asyncio.sleep(3)
                held = await a.partitions(session)
                if held is not None and figures.survivor_gauges[-1] != held:
                    figures.survivor_gauges.append(held)
            figures.survivor_changes = a.assignment_changes_since(stopped_at)
    finally:
        for replica in (b, a):
            replica.stop()
        admin = AdminClient({"bootstrap.servers": world.bootstrap})
        for future in admin.delete_topics(list(topics.values())).values():
            with contextlib.suppress(Exception):  # a topic that was never created
                future.result(timeout=30)
    print(f"[{scenario.title}] {describe(figures)}", flush=True)
    return figures


async def _holds(replica: Replica, session: aiohttp.ClientSession, count: int) -> bool:
    return await replica.partitions(session) == count


async def _both_hold(a: Replica, b: Replica, session: aiohttp.ClientSession, count: int) -> bool:
    return await a.partitions(session) == count and await b.partitions(session) == count


def _seconds(value: float | None) -> str:
    return "not within the wait" if value is None else f"{value:.1f}s"


def describe(figures: Figures) -> str:
    scenario = figures.scenario
    parts = [f"B's partitions {list(figures.killed_partitions)}"]
    if scenario.restart:
        rebalanced = figures.survivor_gauges != [PARTITIONS // 2] or figures.survivor_changes
        parts += [
            f"B holds them again after {_seconds(figures.rejoined_s)}",
            f"events on them handled after {_seconds(figures.handled_s)}",
            f"A's gauge {figures.survivor_gauges}, A's assignment changes"
            f" {figures.survivor_changes} -> {'a rebalance' if rebalanced else 'no rebalance'}",
        ]
    else:
        parts += [
            f"A holds all {PARTITIONS} after {_seconds(figures.takeover_s)}",
            f"events on them handled after {_seconds(figures.handled_s)}",
        ]
    return "; ".join(parts)


async def main_async(args: argparse.Namespace) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    bootstrap, redis_url = stack_services()
    timeout_ms = args.session_timeout_ms
    scenarios = [
        Scenario(f"dynamic, SIGKILL, session {timeout_ms} ms", timeout_ms, False, signal.SIGKILL)
    ]
    if not args.no_librdkafka_default:
        scenarios.append(
            Scenario(
                "dynamic, SIGKILL, session 45000 ms (librdkafka)", 45000, False, signal.SIGKILL
            )
        )
    scenarios += [
        Scenario(
            f"static, SIGKILL + restart, session {timeout_ms} ms",
            timeout_ms,
            True,
            signal.SIGKILL,
            restart=True,
        ),
        Scenario(f"static, SIGKILL, session {timeout_ms} ms", timeout_ms, True, signal.SIGKILL),
        Scenario(f"dynamic, SIGTERM, session {timeout_ms} ms", timeout_ms, False, signal.SIGTERM),
        Scenario(f"static, SIGTERM, session {timeout_ms} ms", timeout_ms, True, signal.SIGTERM),
    ]
    sandbox_port = free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}/"
    sandbox = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "textlocal_sandbox",
            "--port",
            str(sandbox_port),
            "--api-key",
            API_KEY,
            "--log-level",
            "WARNING",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=open(WORK / "takeover-sandbox.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    redis = aioredis.Redis.from_url(redis_url)
    prefix = f"bench-takeover-{uuid.uuid4().hex[:8]}:"
    results = []
    try:
        async with SandboxAdminClient(sandbox_url) as admin:
            for _ in range(100):
                with contextlib.suppress(aiohttp.ClientError):
                    await admin.now()
                    break
                await asyncio.sleep(0.2)
            group_id = await admin.generate_contacts("Optimove customers", 100)
            (template_id,) = await admin.seed_templates(
                [{"title": "OPT_Takeover", "body": "Hello from Shop & Co."}]
            )
        code = Path(args.daemon_code).resolve()
        world = World(code, bootstrap, redis, redis_url, prefix, sandbox_url, group_id, template_id)
        for scenario in scenarios:
            results.append(await run_scenario(world, scenario))
    finally:
        batch = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
        if batch:
            await redis.unlink(*batch)
        await redis.aclose()
        if sandbox.poll() is None:
            sandbox.terminate()
            sandbox.wait(30)
    print("\nscenario                                              takeover / rejoin   handled")
    for figures in results:
        figure = figures.rejoined_s if figures.scenario.restart else figures.takeover_s
        print(
            f"{figures.scenario.title:<53} {_seconds(figure):>17} {_seconds(figures.handled_s):>9}"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--session-timeout-ms", type=int, default=10_000, help="kafka.session_timeout_ms"
    )
    parser.add_argument(
        "--no-librdkafka-default",
        action="store_true",
        help="skip the comparison run with librdkafka's default session timeout (45 s)",
    )
    parser.add_argument(
        "--daemon-code", default=str(REPO), help="checkout the daemon runs from (default: this)"
    )
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
