#!/usr/bin/env python3
"""Benchmark: a morning's schedule — 500 campaigns of 2,000 recipients published within a minute.

    .venv/bin/python bench/bench_load.py [--concurrency 4,8,16,32] [--campaigns 500]
        [--recipients 2000] [--publish-window-s 60] [--daemon-code DIR] [--profile]

For each concurrency setting, in one run, against a sandbox of its own (fresh process, its
master group generated) and on topics and a Redis key prefix of its own:
1. **floor**: a plain aiohttp script makes the calls the daemon makes for each campaign
   (create_group, ⌈2,000 / 1,500⌉ = 2 create_contacts_bulk in parallel, balance, send), with
   payloads prepared beforehand, never more than `concurrency` requests in flight (the daemon's
   `textlocal.max_concurrency`), each campaign starting when its events are published in the
   daemon's run (the same schedule);
2. **daemon**: `python -m consumer.cli run` (every role) with
   `workflow.executor_concurrency` = `textlocal.max_concurrency` = the setting and the TextLocal
   rate limit lifted (the sandbox has none; the default 10/s would be the whole figure). Once its
   contact index is built the campaigns are published, evenly over the window (header and the
   one batch together), and the time from the first publish to the last campaign recorded SENT
   in Redis is measured (read from the SENT set, scored by when each got there);
3. the floor again; the two floor runs are averaged.
Prints, per setting and in a closing table: time to all SENT, floor, ratio (target ≤ 1.5×),
the time after the last publish until all are SENT (daemon and floor), per-campaign latency from
publish to SENT (p50 / p95 / max) and, from the daemon's log, where it went (batch recorded by
intake; then waiting for an executor slot and creating the segment; loading; sending), the CPU
the daemon and the sandbox used meanwhile, and the TextLocal calls made next to the minimum.
`--publish-window-s 0` publishes everything at once (throughput rather than keeping up).

`--profile` runs the daemon under cProfile (written to `.cache/bench/load-daemon-<N>.prof` when
it stops); its JSON log is kept at `.cache/bench/load-daemon-<N>.log` either way. Needs the
local stack (`make stack-up`; or `$KAFKA_BOOTSTRAP_SERVERS` and `$REDIS_URL`); `make bench` runs
it. Deletes its topics and Redis keys and stops its processes at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from any directory

from bench.common import free_port, stack_services, unlink_prefix  # noqa: E402
from consumer.codec import SchemaRegistry  # noqa: E402
from consumer.events import CampaignRecipients, CampaignRef, CampaignScheduled  # noqa: E402
from consumer.keys import RedisKeys  # noqa: E402
from consumer.store import as_text  # noqa: E402
from textlocal_sandbox import SandboxAdminClient  # noqa: E402

API_KEY = "bench-key"
WORK = REPO / ".cache" / "bench"
CHUNK = 1500  # create_contacts_bulk's limit, as the daemon cuts chunks
FIRST_NUMBER = 447_000_000_000
MESSAGE = "Good morning from Shop & Co: use MORNING at the till today."
TEMPLATE_BODY = "Good morning from Shop & Co: use [%PROMO_CODE%] at the till today."


@dataclass(frozen=True)
class Plan:
    """The schedule: which customers each campaign targets and when it is published."""

    campaigns: int
    recipients: int
    master_contacts: int
    window_s: float

    def customer_indexes(self, campaign: int) -> list[int]:
        """0-based master-group positions; campaigns overlap, as a morning's schedule does."""
        stride = max(1, (self.master_contacts - self.recipients) // max(1, self.campaigns))
        start = (campaign * stride) % (self.master_contacts - self.recipients + 1)
        return list(range(start, start + self.recipients))

    def offset_s(self, campaign: int) -> float:
        return self.window_s * campaign / self.campaigns


@dataclass(frozen=True)
class Run:
    """One run (daemon or floor): per campaign, when it started and when it was SENT."""

    started_s: Sequence[float]  # wall clock (time.time), per campaign
    sent_s: Sequence[float]

    @property
    def total_s(self) -> float:
        return max(self.sent_s) - min(self.started_s)

    @property
    def after_last_publish_s(self) -> float:
        return max(self.sent_s) - max(self.started_s)

    def latencies_s(self) -> list[float]:
        return sorted(
            sent - started for started, sent in zip(self.started_s, self.sent_s, strict=True)
        )

    def latency_summary(self) -> str:
        return summary(self.latencies_s())


def summary(values_s: Sequence[float]) -> str:
    values = sorted(values_s)
    p95 = values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]
    return f"p50 {statistics.median(values):.2f}s, p95 {p95:.2f}s, max {values[-1]:.2f}s"


# The daemon's log lines marking a campaign's milestones, in order (intake.event: its batch).
MILESTONES = (
    "intake.event",
    "campaign.segment_created",
    "campaign.contacts_loaded",
    "campaign.sent",
)


def phases(log_path: Path, published_s: Mapping[str, float]) -> dict[str, str]:
    """Where each campaign's time went, from the daemon's JSON log: phase → p50/p95/max."""
    seen: dict[str, dict[str, float]] = {key: {"published": at} for key, at in published_s.items()}
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if not isinstance(entry, dict) or entry.get("campaign") not in seen:
                continue
            if entry.get("event") == "intake.event" and entry.get("type") != "CampaignRecipients":
                continue
            if entry.get("event") in MILESTONES:
                at = datetime.fromisoformat(entry["ts"]).timestamp()
                seen[entry["campaign"]][entry["event"]] = at
    steps = ("published", *MILESTONES)
    names = ("intake (batch recorded)", "to segment created", "contacts loaded", "sent")
    found = {}
    for name, before, after in zip(names, steps, steps[1:], strict=False):  # pairs of steps
        values = [m[after] - m[before] for m in seen.values() if before in m and after in m]
        if values:
            found[name] = summary(values)
    return found


@dataclass(frozen=True)
class Result:
    concurrency: int
    daemon: Run
    floors: tuple[Run, ...]
    calls: Mapping[str, int]
    minimum: Mapping[str, int]
    daemon_cpu_s: float  # while the campaigns ran, first publish to all SENT
    sandbox_cpu_s: float  # likewise
    floor_sandbox_cpu_s: float  # per floor run, averaged
    phases: Mapping[str, str]

    @property
    def floor_s(self) -> float:
        return statistics.mean(run.total_s for run in self.floors)

    @property
    def ratio(self) -> float:
        return self.daemon.total_s / self.floor_s


async def wait_http(url: str, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"{process.args!r} exited with {process.returncode}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"{url} did not answer in {timeout_s:.0f}s")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_process(process: subprocess.Popen[bytes] | None, timeout_s: float = 60) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- the floor ---------------------------------------------------------------------------------


def floor_payloads(plan: Plan) -> list[list[str]]:
    """Per campaign, its create_contacts_bulk payloads (as the daemon would cut them)."""
    payloads = []
    for campaign in range(plan.campaigns):
        indexes = plan.customer_indexes(campaign)
        chunks = []
        for start in range(0, len(indexes), CHUNK):
            contacts = [
                {
                    "number": str(FIRST_NUMBER + i),
                    "first_name": "",
                    "last_name": "",
                    "custom1": f"C{i + 1:07d}",
                }
                for i in indexes[start : start + CHUNK]
            ]
            chunks.append(json.dumps(contacts))
        payloads.append(chunks)
    return payloads


async def floor_run(
    sandbox_url: str, plan: Plan, payloads: Sequence[Sequence[str]], concurrency: int
) -> Run:
    """The daemon's calls from a plain script, on the daemon's schedule: TextLocal's own time."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    gate = asyncio.Semaphore(concurrency)
    tag = uuid.uuid4().hex[:8]
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(command: str, **params: str) -> dict[str, object]:
            async with (
                gate,
                session.post(
                    f"{sandbox_url}{command}/", data={**params, "apikey": API_KEY}
                ) as response,
            ):
                reply: dict[str, object] = await response.json(content_type=None)
            if reply.get("status") != "success":
                raise SystemExit(f"floor: {command} failed: {str(reply)[:300]}")
            return reply

        async def campaign(index: int, begin_s: float) -> tuple[float, float]:
            await asyncio.sleep(max(0.0, begin_s + plan.offset_s(index) - time.monotonic()))
            started = time.time()
            group = await call("create_group", name=f"floor-{tag}-{index}")
            group_id = str(group["group"]["id"])  # type: ignore[index]
            await asyncio.gather(
                *(
                    call("create_contacts_bulk", group_id=group_id, contacts=payload)
                    for payload in payloads[index]
                )
            )
            await call("balance")
            await call("send", group_id=group_id, message=MESSAGE)
            return started, time.time()

        begin_s = time.monotonic()
        times = await asyncio.gather(*(campaign(i, begin_s) for i in range(plan.campaigns)))
    return Run([started for started, _ in times], [sent for _, sent in times])


# --- the daemon --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    input: str
    status: str
    metrics: str
    templates: str
    dlq: str

    @classmethod
    def fresh(cls) -> Topics:
        tag = uuid.uuid4().hex[:8]
        kinds = ("input", "status", "metrics", "templates", "dlq")
        return cls(*(f"bench-load-{tag}-{kind}" for kind in kinds))

    def names(self) -> list[str]:
        return [self.input, self.status, self.metrics, self.templates, self.dlq]


def daemon_env(
    *,
    code: Path,
    bootstrap: str,
    redis_url: str,
    prefix: str,
    topics: Topics,
    sandbox_url: str,
    group_id: int,
    http_port: int,
    concurrency: int,
) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(code),
        "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TEXTLOCAL_CONSUMER_KAFKA_INPUT_TOPIC": topics.input,
        "TEXTLOCAL_CONSUMER_KAFKA_STATUS_TOPIC": topics.status,
        "TEXTLOCAL_CONSUMER_KAFKA_METRICS_TOPIC": topics.metrics,
        "TEXTLOCAL_CONSUMER_KAFKA_TEMPLATES_TOPIC": topics.templates,
        "TEXTLOCAL_CONSUMER_KAFKA_DLQ_TOPIC": topics.dlq,
        "TEXTLOCAL_CONSUMER_KAFKA_GROUP_ID": f"{topics.input}-daemon",
        "TEXTLOCAL_CONSUMER_KAFKA_CREATE_TOPICS": "true",
        "TEXTLOCAL_CONSUMER_REDIS_URL": redis_url,
        "TEXTLOCAL_CONSUMER_REDIS_KEY_PREFIX": prefix,
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_URL": sandbox_url,
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": API_KEY,
        # The sandbox enforces no rate limit; the daemon's default (10/s) would be the figure.
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_RATE_LIMIT_PER_S": "1000000",
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_MAX_CONCURRENCY": str(concurrency),
        "TEXTLOCAL_CONSUMER_WORKFLOW_EXECUTOR_CONCURRENCY": str(concurrency),
        "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": json.dumps(
            [{"id": group_id, "template_prefix": "OPT_", "customer_id_field": "custom1"}]
        ),
        "TEXTLOCAL_CONSUMER_HTTP_HOST": "127.0.0.1",
        "TEXTLOCAL_CONSUMER_HTTP_PORT": str(http_port),
        "TEXTLOCAL_CONSUMER_LOG_FORMAT": "json",
    }


def encoded_campaigns(plan: Plan, template_id: int) -> list[tuple[CampaignRef, bytes, bytes]]:
    """Each campaign's header and its one recipient batch, encoded before the clock starts."""
    registry = SchemaRegistry.from_directory()
    tag = uuid.uuid4().hex[:6]
    now = datetime.now(UTC)
    encoded = []
    for campaign in range(plan.campaigns):
        ref = CampaignRef(1, f"load-{tag}-{campaign}", 505)
        ids = tuple(f"C{i + 1:07d}" for i in plan.customer_indexes(campaign))
        header = CampaignScheduled(
            event_id=str(uuid.uuid4()),
            occurred_at=now,
            ref=ref,
            template_id=template_id,
            template_name="OPT_Morning",
            scheduled_at=now,  # send at once: within workflow.max_send_delay of any publish
            message_type="SMS",
            recipient_count=len(ids),
            batch_count=1,
            promo_codes=("MORNING",),
        )
        batch = CampaignRecipients(str(uuid.uuid4()), now, ref, 0, ids)
        encoded.append(
            (
                ref,
                registry.encode("CampaignScheduled", header.to_fields()),
                registry.encode("CampaignRecipients", batch.to_fields()),
            )
        )
    return encoded


def publish_on_schedule(
    bootstrap: str,
    topic: str,
    plan: Plan,
    campaigns: Sequence[tuple[CampaignRef, bytes, bytes]],
    published_s: list[float],
) -> None:
    """Publish campaign i at `plan.offset_s(i)` (blocking; run in a thread)."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 1,
            "message.max.bytes": 2_000_000,
        }
    )
    begin_s = time.monotonic()
    for index, (ref, header, batch) in enumerate(campaigns):
        delay_s = begin_s + plan.offset_s(index) - time.monotonic()
        if delay_s > 0:
            time.sleep(delay_s)
        published_s.append(time.time())
        producer.produce(topic, key=ref.key.encode(), value=header)
        producer.produce(topic, key=ref.key.encode(), value=batch)
        producer.poll(0)
    if producer.flush(60):
        raise SystemExit("the campaigns were not all published within 60 s")


async def wait_all_sent(
    redis: aioredis.Redis,
    keys: RedisKeys,
    refs: Sequence[CampaignRef],
    daemon: subprocess.Popen[bytes],
    log_path: Path,
    timeout_s: float,
) -> dict[str, float]:
    """Campaign key → when it was recorded SENT (the SENT set's score, ms since the epoch)."""
    wanted = {ref.key for ref in refs}
    sent = keys.campaigns_in_state("SENT")
    ended = [keys.campaigns_in_state(state) for state in ("FAILED", "REJECTED", "CANCELLED")]
    deadline = time.monotonic() + timeout_s
    while True:
        members = await redis.zrange(sent, 0, -1, withscores=True)
        found = {}
        for member, score in members:  # type: ignore[str-unpack]  # withscores: pairs
            if as_text(member) in wanted:
                found[as_text(member)] = float(score) / 1000
        if len(found) == len(wanted):
            return found
        for key in ended:
            bad = [as_text(m) for m in await redis.zrange(key, 0, -1) if as_text(m) in wanted]
            if bad:
                raise SystemExit(f"{len(bad)} campaigns ended {key}, e.g. {bad[0]}; see {log_path}")
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with {daemon.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise SystemExit(
                f"only {len(found)} of {len(wanted)} campaigns SENT in {timeout_s:.0f}s;"
                f" see {log_path}"
            )
        await asyncio.sleep(0.1)


async def measure(
    args: argparse.Namespace,
    plan: Plan,
    payloads: Sequence[Sequence[str]],
    bootstrap: str,
    redis: aioredis.Redis,
    redis_url: str,
    concurrency: int,
) -> Result:
    label = f"[concurrency {concurrency}]"
    sandbox_port = free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}/"
    sandbox = subprocess.Popen(
        [
            sys.executable, "-m", "textlocal_sandbox", "--port", str(sandbox_port),
            "--api-key", API_KEY, "--balance", str(plan.campaigns * plan.recipients * 10),
            "--log-level", "WARNING",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=open(WORK / f"load-sandbox-{concurrency}.log", "wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    daemon: subprocess.Popen[bytes] | None = None
    prefix = f"bench-load-{uuid.uuid4().hex[:8]}:"
    topics = Topics.fresh()
    log_path = WORK / f"load-daemon-{concurrency}.log"
    try:
        await wait_http(f"{sandbox_url}_sandbox/clock", 30, sandbox)
        async with SandboxAdminClient(sandbox_url) as admin:
            group_id = await admin.generate_contacts(
                "Optimove customers", plan.master_contacts, first_number=FIRST_NUMBER
            )
            (template_id,) = await admin.seed_templates(
                [{"title": "OPT_Morning", "body": TEMPLATE_BODY}]
            )
            sandbox_cpu = [cpu_s(sandbox.pid)]
            floors = [await floor_run(sandbox_url, plan, payloads, concurrency)]
            sandbox_cpu.append(cpu_s(sandbox.pid))
            print(f"{label} floor (before): {floors[0].total_s:.1f}s", flush=True)

            http_port = free_port()
            code = Path(args.daemon_code).resolve()
            command = [sys.executable, "-m", "consumer.cli", "run"]
            if args.profile:
                profile = WORK / f"load-daemon-{concurrency}.prof"
                command[1:1] = ["-m", "cProfile", "-o", str(profile)]
            daemon = subprocess.Popen(
                command,
                cwd=code,
                env=daemon_env(
                    code=code,
                    bootstrap=bootstrap,
                    redis_url=redis_url,
                    prefix=prefix,
                    topics=topics,
                    sandbox_url=sandbox_url,
                    group_id=group_id,
                    http_port=http_port,
                    concurrency=concurrency,
                ),
                stdout=open(log_path, "wb"),
                stderr=subprocess.STDOUT,
            )
            await wait_http(f"http://127.0.0.1:{http_port}/readyz", 120, daemon)
            keys = RedisKeys(prefix=prefix)
            for job in ("contacts", "templates"):
                while not await redis.exists(keys.daily_job_last_success(job)):
                    if daemon.poll() is not None:
                        raise SystemExit(f"the daemon exited; see {log_path}")
                    await asyncio.sleep(0.2)
            await asyncio.sleep(2)  # let start-up work settle
            await admin.reset_call_counts()

            campaigns = encoded_campaigns(plan, template_id)
            published_s: list[float] = []
            publisher = threading.Thread(
                target=publish_on_schedule,
                args=(bootstrap, topics.input, plan, campaigns, published_s),
                name="publisher",
            )
            cpu_before = cpu_s(daemon.pid), cpu_s(sandbox.pid)
            publisher.start()
            try:
                sent_at = await wait_all_sent(
                    redis,
                    keys,
                    [ref for ref, _, _ in campaigns],
                    daemon,
                    log_path,
                    plan.window_s + args.timeout_s,
                )
                cpu_after = cpu_s(daemon.pid), cpu_s(sandbox.pid)
            finally:
                await asyncio.to_thread(publisher.join)
            daemon_run = Run(published_s, [sent_at[ref.key] for ref, _, _ in campaigns])
            print(
                f"{label} daemon: all {plan.campaigns} SENT {daemon_run.total_s:.1f}s"
                " after the first publish",
                flush=True,
            )
            calls = {name: count for name, count in (await admin.call_counts()).items() if count}
            stop_process(daemon)

            sandbox_cpu.append(cpu_s(sandbox.pid))
            floors.append(await floor_run(sandbox_url, plan, payloads, concurrency))
            sandbox_cpu.append(cpu_s(sandbox.pid))
            print(f"{label} floor (after): {floors[1].total_s:.1f}s", flush=True)
        chunks = math.ceil(plan.recipients / CHUNK)
        minimum = {
            "balance": plan.campaigns,
            "create_contacts_bulk": plan.campaigns * chunks,
            "create_group": plan.campaigns,
            "send": plan.campaigns,
        }
        return Result(
            concurrency,
            daemon_run,
            tuple(floors),
            calls,
            minimum,
            daemon_cpu_s=cpu_after[0] - cpu_before[0],
            sandbox_cpu_s=cpu_after[1] - cpu_before[1],
            phases=phases(
                log_path,
                {ref.key: at for (ref, _, _), at in zip(campaigns, published_s, strict=True)},
            ),
            floor_sandbox_cpu_s=(sandbox_cpu[1] - sandbox_cpu[0] + sandbox_cpu[3] - sandbox_cpu[2])
            / 2,
        )
    finally:
        stop_process(daemon)
        stop_process(sandbox, 30)
        await unlink_prefix(redis, prefix)
        admin_client = AdminClient({"bootstrap.servers": bootstrap})
        for future in admin_client.delete_topics(topics.names()).values():
            with contextlib.suppress(Exception):  # a topic the daemon never created
                future.result(timeout=30)


def report(result: Result, plan: Plan) -> None:
    daemon, floors = result.daemon, result.floors
    floor_runs = ", ".join(f"{run.total_s:.1f}s" for run in floors)
    floor_tail = statistics.mean(run.after_last_publish_s for run in floors)
    verdict = "EQUAL" if dict(result.calls) == dict(result.minimum) else "DIFFERENT"
    print(
        f"\n--- executor concurrency {result.concurrency}, textlocal.max_concurrency"
        f" {result.concurrency} ---\n"
        f"campaigns            : {plan.campaigns} x {plan.recipients:,} recipients,"
        f" published over {plan.window_s:g}s\n"
        f"time to all SENT     : {daemon.total_s:.1f}s (from the first publish)\n"
        f"floor (plain aiohttp): {result.floor_s:.1f}s (runs: {floor_runs})\n"
        f"ratio                : {result.ratio:.2f}x (target <= 1.5x)\n"
        f"after last publish   : daemon {daemon.after_last_publish_s:.1f}s,"
        f" floor {floor_tail:.1f}s\n"
        f"publish -> SENT      : daemon {daemon.latency_summary()}\n"
        f"                       floor  {floors[-1].latency_summary()}\n"
        "daemon, per campaign (from its log; a phase ends at its log line):\n"
        + "".join(f"  {name:<24}: {figure}\n" for name, figure in result.phases.items())
        + f"CPU while running    : daemon {result.daemon_cpu_s:.1f}s, sandbox"
        f" {result.sandbox_cpu_s:.1f}s (sandbox, one floor run:"
        f" {result.floor_sandbox_cpu_s:.1f}s)\n"
        f"TextLocal calls made : {dict(sorted(result.calls.items()))}\n"
        f"TextLocal calls floor: {dict(sorted(result.minimum.items()))}  -> {verdict}",
        flush=True,
    )


async def main_async(args: argparse.Namespace) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    plan = Plan(args.campaigns, args.recipients, args.master_contacts, args.publish_window_s)
    bootstrap, redis_url = stack_services()
    settings = [int(part) for part in args.concurrency.split(",") if part.strip()]
    payloads = floor_payloads(plan)
    redis = aioredis.Redis.from_url(redis_url)
    results = []
    try:
        for concurrency in settings:
            results.append(
                await measure(args, plan, payloads, bootstrap, redis, redis_url, concurrency)
            )
            report(results[-1], plan)
    finally:
        await redis.aclose()
    print(
        f"\n{plan.campaigns} campaigns x {plan.recipients:,} recipients published over"
        f" {plan.window_s:g}s; daemon code {args.daemon_code}"
    )
    print("concurrency  to all SENT   floor   ratio   after last publish (daemon / floor)")
    for result in results:
        floor_tail = statistics.mean(run.after_last_publish_s for run in result.floors)
        print(
            f"{result.concurrency:>11}  {result.daemon.total_s:>10.1f}s"
            f" {result.floor_s:>6.1f}s {result.ratio:>6.2f}x"
            f"   {result.daemon.after_last_publish_s:>6.1f}s / {floor_tail:.1f}s"
        )
    best = min(results, key=lambda result: result.ratio)
    verdict = "meets" if best.ratio <= 1.5 else "misses"
    print(
        f"best: {best.ratio:.2f}x at executor concurrency {best.concurrency}"
        f" ({verdict} the 1.5x target)"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--concurrency", default="4,8,16,32", help="settings to try, e.g. 4,8")
    parser.add_argument("--campaigns", type=int, default=500)
    parser.add_argument("--recipients", type=int, default=2000, help="per campaign")
    parser.add_argument("--master-contacts", type=int, default=100_000)
    parser.add_argument("--publish-window-s", type=float, default=60.0)
    parser.add_argument(
        "--timeout-s", type=float, default=600.0, help="after the window, for all to be SENT"
    )
    parser.add_argument(
        "--daemon-code", default=str(REPO), help="checkout the daemon runs from (default: this)"
    )
    parser.add_argument("--profile", action="store_true", help="run the daemon under cProfile")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
