#!/usr/bin/env python3
"""Benchmark: campaign history costs an idle replica nothing (DESIGN §6a).

    .venv/bin/python bench/bench_history.py [--finished 200000] [--idle-s 60]
        [--campaign-runs 5] [--daemon-code DIR]

In one run, on a redis-server started for the benchmark (same binary as the local stack, its own
free port and directory, AOF on) and against the sandbox (its own process):
1. **empty Redis**: the daemon (`python -m consumer.cli run`, every role) starts; once its daily
   jobs are done it idles for `--idle-s` seconds, and the Redis commands it causes are read from
   `INFO commandstats` deltas (commands run inside Lua scripts included; the benchmark's own INFO
   calls left out), with the CPU time Redis spent in them, scaled to a minute; then
   `--campaign-runs` new 10,000-recipient campaigns, one after the other, each timed from
   publishing its events to the campaign recorded SENT (the median is compared);
2. **200,000 finished campaigns**: the same Redis emptied, then filled with `--finished` campaigns
   as the workflow leaves them (DONE, CANCELLED, FAILED or REJECTED; ended over the last 30 days;
   hashes expiring when their retention ends), written through `CampaignStore.apply_all` in
   pipelines; the same two measurements with a fresh daemon.
Prints both side by side with their ratio (target: within 10%). `--daemon-code` runs the daemon
from another checkout (e.g. an earlier version, for comparison); the set-up uses this one.

None of the finished campaigns' retention ends during the run, so the idle window holds no
expiries; in a steady state about `finished / 30 days` campaigns leave per minute (4.6 for
200,000), a few commands each. Needs Kafka (`$KAFKA_BOOTSTRAP_SERVERS`, else the local stack);
creates its own topics and deletes them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis.asyncio as aioredis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "sandbox")]  # runnable as a plain script from any directory

from bench.common import free_port, wait_http  # noqa: E402
from consumer.codec import SchemaRegistry  # noqa: E402
from consumer.events import CampaignRecipients, CampaignRef, CampaignScheduled  # noqa: E402
from consumer.keys import RedisKeys  # noqa: E402
from consumer.steps import FINISHED_CAMPAIGN_RETENTION_S  # noqa: E402
from consumer.store import CampaignStore, Transition, as_text  # noqa: E402
from consumer.workflow import CampaignState  # noqa: E402
from textlocal_sandbox import SandboxAdminClient  # noqa: E402

RECIPIENTS = 10_000
API_KEY = "bench-key"
PREFIX = "bench-history:"
WORK = REPO / ".cache" / "bench"
RETENTION = timedelta(seconds=FINISHED_CAMPAIGN_RETENTION_S)
# How the finished campaigns ended: mostly after their last poll.
ENDINGS = (CampaignState.DONE,) * 17 + (
    CampaignState.CANCELLED,
    CampaignState.FAILED,
    CampaignState.REJECTED,
)
PIPELINE = 2_000  # transitions per apply_all


@dataclass(frozen=True)
class Figures:
    """One phase's measurements."""

    commands_per_min: float
    redis_usec_per_min: float
    by_command_per_min: Mapping[str, float]
    to_sent_s: tuple[float, ...]

    @property
    def median_to_sent_s(self) -> float:
        return statistics.median(self.to_sent_s)


def kafka_bootstrap() -> str:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    output = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "local" / "stack.py"), "env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    values = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    return values["KAFKA_BOOTSTRAP_SERVERS"]


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server of the benchmark's own (the binary `deploy/local/stack.py` runs)."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is missing: apt-get install -y redis-server (or make deps)")
    port = free_port()
    process = subprocess.Popen(
        [
            server,
            "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--logfile", str(directory / "redis.log"),
        ],
    )  # fmt: skip
    return process, f"redis://127.0.0.1:{port}/0"


async def wait_redis(redis: aioredis.Redis) -> None:
    for _ in range(100):
        try:
            await redis.ping()
            return
        except aioredis.ConnectionError:
            await asyncio.sleep(0.1)
    raise SystemExit("the benchmark's redis-server did not answer")


async def command_stats(redis: aioredis.Redis) -> dict[str, tuple[int, int]]:
    """Command → (calls, usec) since the server started; INFO itself left out."""
    info = await redis.info("commandstats")
    stats = {}
    for name, values in info.items():
        command = str(name).removeprefix("cmdstat_")
        if command != "info":
            stats[command] = (int(values["calls"]), int(values["usec"]))
    return stats


async def fill_with_finished(store: CampaignStore, count: int, now: datetime) -> None:
    """`count` campaigns as the workflow leaves them when they end, ended over the last 30 days
    (an hour's margin at each end), each hash expiring when its retention ends."""
    registry = SchemaRegistry.from_directory()
    span = RETENTION - timedelta(hours=2)
    groups = max(1, count // PIPELINE)
    for group in range(groups):
        ended_at = now - timedelta(hours=1) - span * (group / groups)
        retention_left_s = int((ended_at + RETENTION - now).total_seconds())
        transitions: list[Transition] = []
        for index in range(group * count // groups, (group + 1) * count // groups):
            ref = CampaignRef(3, f"{index // 1000}.{index % 1000}", 505)
            header = CampaignScheduled(
                event_id=f"history-{index}",
                occurred_at=ended_at - timedelta(days=7),
                ref=ref,
                template_id=1,
                template_name="OPT_Weekly",
                scheduled_at=ended_at - timedelta(days=7),
                message_type="SMS",
                recipient_count=1000,
                batch_count=1,
                metadata={"journey": "history"},
            )
            transitions.append(
                store.transition(ref.key)
                .expect(absent=True)
                .set_state(ENDINGS[index % len(ENDINGS)])
                .set_header(registry.encode("CampaignScheduled", header.to_fields()))
                .set(
                    requested=1000,
                    matched=990,
                    batch_id=100_000 + index,
                    polls_done=7,
                    ended_at=ended_at,
                )
                .expire(store.keys.campaign(ref.key), retention_left_s)
            )
        results = await store.apply_all(transitions, ended_at)
        refused = [result.reason for result in results if not result.ok]
        if refused:
            raise SystemExit(f"set-up refused {len(refused)} campaigns: {refused[:3]}")


def publish_campaign(bootstrap: str, topic: str, template_id: int) -> tuple[CampaignRef, float]:
    """A 10,000-recipient campaign sent now: header + one batch; returns it and when it went."""
    registry = SchemaRegistry.from_directory()
    ref = CampaignRef(1, f"bench-{uuid.uuid4().hex[:6]}", 505)
    ids = tuple(f"C{i:07d}" for i in range(1, RECIPIENTS + 1))
    now = datetime.now(UTC)
    header = CampaignScheduled(
        event_id=str(uuid.uuid4()),
        occurred_at=now,
        ref=ref,
        template_id=template_id,
        template_name="OPT_Bench",
        scheduled_at=now,
        message_type="SMS",
        recipient_count=len(ids),
        batch_count=1,
        promo_codes=("BENCH",),
    )
    batch = CampaignRecipients(str(uuid.uuid4()), now, ref, 0, ids)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    started = time.monotonic()
    producer.produce(
        topic,
        key=ref.key.encode(),
        value=registry.encode("CampaignScheduled", header.to_fields()),
    )
    producer.produce(
        topic,
        key=ref.key.encode(),
        value=registry.encode("CampaignRecipients", batch.to_fields()),
    )
    producer.flush(30)
    return ref, started


@dataclass(frozen=True)
class Bench:
    args: argparse.Namespace
    bootstrap: str
    redis_url: str
    redis: aioredis.Redis
    sandbox_url: str
    group_id: int
    template_id: int
    topics: Mapping[str, str]

    def daemon_env(self, http_port: int) -> dict[str, str]:
        topics = self.topics
        code = str(Path(self.args.daemon_code).resolve())
        return {
            **os.environ,
            "PYTHONPATH": code,
            "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "TEXTLOCAL_CONSUMER_KAFKA_INPUT_TOPIC": topics["input"],
            "TEXTLOCAL_CONSUMER_KAFKA_STATUS_TOPIC": topics["status"],
            "TEXTLOCAL_CONSUMER_KAFKA_METRICS_TOPIC": topics["metrics"],
            "TEXTLOCAL_CONSUMER_KAFKA_TEMPLATES_TOPIC": topics["templates"],
            "TEXTLOCAL_CONSUMER_KAFKA_DLQ_TOPIC": topics["dlq"],
            "TEXTLOCAL_CONSUMER_KAFKA_GROUP_ID": f"{topics['input']}-daemon",
            "TEXTLOCAL_CONSUMER_KAFKA_CREATE_TOPICS": "true",
            "TEXTLOCAL_CONSUMER_REDIS_URL": self.redis_url,
            "TEXTLOCAL_CONSUMER_REDIS_KEY_PREFIX": PREFIX,
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_URL": self.sandbox_url,
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": API_KEY,
            # The sandbox enforces no rate limit; the default 10/s would only slow both phases.
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_RATE_LIMIT_PER_S": "10000",
            "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": json.dumps(
                [{"id": self.group_id, "template_prefix": "OPT_", "customer_id_field": "custom1"}]
            ),
            "TEXTLOCAL_CONSUMER_HTTP_PORT": str(http_port),
            "TEXTLOCAL_CONSUMER_LOG_FORMAT": "json",
        }

    async def phase(self, label: str, finished: int) -> Figures:
        await self.redis.flushall()
        keys = RedisKeys(prefix=PREFIX)
        if finished:
            store = CampaignStore(self.redis, keys, SchemaRegistry.from_directory())
            started = time.monotonic()
            await fill_with_finished(store, finished, datetime.now(UTC))
            print(
                f"[{label}] {finished:,} finished campaigns written in"
                f" {time.monotonic() - started:.1f}s",
                flush=True,
            )
            # What a daemon starting on the empty Redis did once (it finds the mark now).
            await store.index_campaign_states()
            await self.wait_for_aof_rewrite(label)
        http_port = free_port()
        log_path = WORK / f"history-daemon-{finished or 'empty'}.log"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", "run"],
            cwd=self.args.daemon_code,
            env=self.daemon_env(http_port),
            stdout=open(log_path, "wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            await wait_http(f"http://127.0.0.1:{http_port}/readyz", 120)
            for job in ("contacts", "templates"):
                while not await self.redis.exists(keys.daily_job_last_success(job)):
                    if daemon.poll() is not None:
                        raise SystemExit(f"the daemon exited; see {log_path}")
                    await asyncio.sleep(0.5)
            await asyncio.sleep(5)  # let start-up work settle
            before = await command_stats(self.redis)
            window_started = time.monotonic()
            await asyncio.sleep(self.args.idle_s)
            after = await command_stats(self.redis)
            per_min = 60 / (time.monotonic() - window_started)
            deltas = {
                name: (calls - before.get(name, (0, 0))[0], usec - before.get(name, (0, 0))[1])
                for name, (calls, usec) in after.items()
            }
            figures_idle = (
                sum(calls for calls, _ in deltas.values()) * per_min,
                sum(usec for _, usec in deltas.values()) * per_min,
                {name: calls * per_min for name, (calls, _) in deltas.items() if calls},
            )
            print(
                f"[{label}] idle: {figures_idle[0]:,.0f} Redis commands/min",
                flush=True,
            )
            to_sent = []
            for _ in range(self.args.campaign_runs):
                to_sent.append(await self.time_to_sent(keys, daemon, log_path))
                print(f"[{label}] 10,000-recipient campaign SENT in {to_sent[-1]:.2f}s", flush=True)
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(60)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        return Figures(figures_idle[0], figures_idle[1], figures_idle[2], tuple(to_sent))

    async def wait_for_aof_rewrite(self, label: str) -> None:
        """The set-up's writes trigger an AOF rewrite (a fork and a file copy); not part of
        what is measured, so wait for it to finish."""
        started = time.monotonic()
        while True:
            info = await self.redis.info("persistence")
            if not int(info["aof_rewrite_in_progress"]) and not int(info["aof_rewrite_scheduled"]):
                break
            await asyncio.sleep(0.2)
        if time.monotonic() - started > 0.5:
            print(f"[{label}] waited {time.monotonic() - started:.1f}s for an AOF rewrite")

    async def time_to_sent(
        self, keys: RedisKeys, daemon: subprocess.Popen[bytes], log_path: Path
    ) -> float:
        ref, started = await asyncio.to_thread(
            publish_campaign, self.bootstrap, self.topics["input"], self.template_id
        )
        deadline = started + 300
        while True:
            state = as_text(await self.redis.hget(keys.campaign(ref.key), "state") or b"")
            if state == "SENT":
                return time.monotonic() - started
            if state in ("FAILED", "REJECTED") or daemon.poll() is not None:
                raise SystemExit(f"campaign {ref.key} ended {state or 'nowhere'}; see {log_path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"campaign {ref.key} not SENT in 300s; see {log_path}")
            await asyncio.sleep(0.02)


def report(empty: Figures, full: Figures, finished: int) -> None:
    def ratio(a: float, b: float) -> str:
        return f"{b / a:.2f}x" if a else "n/a"

    label = f"{finished:,} finished"
    print()
    print(f"{'':34}{'empty Redis':>16}{label:>20}{'ratio':>9}")
    print(
        f"{'idle: Redis commands / min':34}{empty.commands_per_min:>16,.0f}"
        f"{full.commands_per_min:>20,.0f}{ratio(empty.commands_per_min, full.commands_per_min):>9}"
    )
    print(
        f"{'idle: Redis CPU in commands, ms/min':34}{empty.redis_usec_per_min / 1000:>16,.1f}"
        f"{full.redis_usec_per_min / 1000:>20,.1f}"
        f"{ratio(empty.redis_usec_per_min, full.redis_usec_per_min):>9}"
    )
    print(
        f"{'new campaign to SENT, median s':34}{empty.median_to_sent_s:>16.2f}"
        f"{full.median_to_sent_s:>20.2f}"
        f"{ratio(empty.median_to_sent_s, full.median_to_sent_s):>9}"
    )
    for name, figures in (("empty", empty), ("full", full)):
        print(f"  runs, {name}: {', '.join(f'{s:.2f}' for s in figures.to_sent_s)} s")
    print("idle commands / min by command (empty → full):")
    names = sorted(
        set(empty.by_command_per_min) | set(full.by_command_per_min),
        key=lambda name: (
            -max(empty.by_command_per_min.get(name, 0), full.by_command_per_min.get(name, 0))
        ),
    )
    for name in names:
        print(
            f"  {name:<20}{empty.by_command_per_min.get(name, 0):>10,.0f}"
            f"{full.by_command_per_min.get(name, 0):>12,.0f}"
        )
    within = (
        full.commands_per_min <= empty.commands_per_min * 1.1
        and full.median_to_sent_s <= empty.median_to_sent_s * 1.1
    )
    print(f"target (both within 10%): {'met' if within else 'NOT met'}")


async def main_async(args: argparse.Namespace) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="history-redis-", dir=WORK))
    bootstrap = kafka_bootstrap()
    run_id = uuid.uuid4().hex[:8]
    topics = {
        name: f"bench-history-{run_id}-{name}"
        for name in ("input", "status", "metrics", "templates", "dlq")
    }
    redis_process, redis_url = start_redis(directory)
    redis: aioredis.Redis = aioredis.Redis.from_url(redis_url, decode_responses=False)
    sandbox_port = free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}/"
    sandbox = subprocess.Popen(
        [
            sys.executable, "-m", "textlocal_sandbox", "--port", str(sandbox_port),
            "--api-key", API_KEY, "--balance", str(RECIPIENTS * 100), "--log-level", "WARNING",
        ],
        cwd=REPO,
        stdout=open(WORK / "history-sandbox.log", "wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        await wait_redis(redis)
        await wait_http(f"{sandbox_url}_sandbox/clock", 30)
        async with SandboxAdminClient(sandbox_url) as admin:
            group_id = await admin.generate_contacts("Optimove customers", RECIPIENTS)
            (template_id,) = await admin.seed_templates(
                [{"title": "OPT_Bench", "body": "Big sale: use [%PROMO_CODE%] at Shop & Co."}]
            )
        bench = Bench(args, bootstrap, redis_url, redis, sandbox_url, group_id, template_id, topics)
        print(f"redis-server {redis_url} (AOF on, {directory}); daemon code {args.daemon_code}")
        empty = await bench.phase("empty Redis", 0)
        full = await bench.phase(f"{args.finished:,} finished", args.finished)
        report(empty, full, args.finished)
        return 0
    finally:
        await redis.aclose()
        for process in (sandbox, redis_process):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        shutil.rmtree(directory, ignore_errors=True)
        admin_client = AdminClient({"bootstrap.servers": bootstrap})
        for future in admin_client.delete_topics(list(topics.values())).values():
            with contextlib.suppress(Exception):  # a topic the daemon never created
                future.result(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--finished", type=int, default=200_000, help="finished campaigns")
    parser.add_argument("--idle-s", type=float, default=60.0, help="idle window per phase")
    parser.add_argument("--campaign-runs", type=int, default=5, help="campaigns timed per phase")
    parser.add_argument(
        "--daemon-code", default=str(REPO), help="checkout the daemon runs from (default: this)"
    )
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
