"""One daily poll cycle over 10,000 campaigns inside their windows: calls, events, time, memory.

    .venv/bin/python bench/bench_polls.py [--campaigns 10000]
        [--rate-limit-per-s 10] [--max-concurrency 4] [--poll-concurrency 4]

1. Starts the sandbox as its own process (`python -m textlocal_sandbox`), so the memory measured
   here is the poller's alone, and makes one real `send` per campaign (two numbers each) with a
   fast set-up client.
2. Records each campaign in Redis as the executor leaves it at SENT (state, encoded header,
   batch id, send time, window end, `polls_done = 0`, first poll in the poll queue), under a
   unique key prefix that is removed at the end.
3. Moves both clocks (this process's and the sandbox's) one poll interval ahead and runs
   `Poller.run_due()` once, with the production settings by default: TextLocal client at 10
   requests/s and 4 in flight, poller concurrency 4, 60 s leases.
4. Prints the status_batch calls the sandbox received, the DeliveryMetrics events in the outbox
   (and how many distinct event ids), the cycle's wall time, and this process's RSS: before the
   cycle, the peak sampled during it (psutil, every 50 ms) and the lifetime peak (ru_maxrss).

Redis: $REDIS_URL, else the local stack (`deploy/local/stack.py up`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import psutil  # type: ignore[import-untyped]  # dev extra, no stubs installed
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "sandbox")]  # runnable as a plain script from any directory

from consumer.clock import ManualClock  # noqa: E402
from consumer.codec import SchemaRegistry  # noqa: E402
from consumer.events import CampaignRef, CampaignScheduled  # noqa: E402
from consumer.keys import RedisKeys  # noqa: E402
from consumer.metrics import Metrics  # noqa: E402
from consumer.poller import Poller, PollerSettings  # noqa: E402
from consumer.store import CampaignStore, as_text  # noqa: E402
from consumer.textlocal import (  # noqa: E402
    TextLocalClient,
    TextLocalCredentials,
    TextLocalSettings,
)
from consumer.workflow import CampaignState, poll_slot  # noqa: E402
from textlocal_sandbox import SandboxAdminClient  # noqa: E402

INTERVAL = timedelta(days=1)
WINDOW = timedelta(days=7)
FIRST_NUMBER = 447_700_000_000


class NoSegments:
    """Campaigns sent to listed numbers have no segment group to delete."""

    async def delete_segment(self, group_id: int | None) -> None:
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_url() -> str:
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    result = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "local" / "stack.py"), "up"],
        capture_output=True,
        text=True,
        check=True,
    )
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if line.count("=") == 1)
    return values["REDIS_URL"]


def rss_mib() -> float:
    rss: int = psutil.Process().memory_info().rss
    return rss / 2**20


async def wait_for_sandbox(admin: SandboxAdminClient) -> None:
    for _ in range(200):
        try:
            await admin.now()
            return
        except aiohttp.ClientError:  # not listening yet
            await asyncio.sleep(0.05)
    raise RuntimeError("the sandbox did not start")


async def send_batches(url: str, api_key: str, count: int) -> list[tuple[int, datetime]]:
    """One real two-number send per campaign; returns (batch id, send time)."""
    fast = TextLocalSettings(api_url=url, rate_limit_per_s=1e6, max_concurrency=32)
    results: list[tuple[int, datetime]] = [(0, datetime.now(UTC))] * count
    async with TextLocalClient(fast, TextLocalCredentials.from_api_key(api_key)) as client:
        next_index = iter(range(count))

        async def worker() -> None:
            for index in next_index:
                numbers = [FIRST_NUMBER + 2 * index, FIRST_NUMBER + 2 * index + 1]
                sent = await client.send(message="Your weekly offer", numbers=numbers)
                if sent.batch_id is None:
                    raise RuntimeError("the sandbox answered a send without a batch id")
                results[index] = (sent.batch_id, datetime.now(UTC))

        await asyncio.gather(*(worker() for _ in range(32)))
    return results


async def register_sent(
    store: CampaignStore, registry: SchemaRegistry, sends: list[tuple[int, datetime]]
) -> None:
    """Each campaign as the executor records it at SENT, with its first poll queued."""
    keys = store.keys

    async def register(index: int, batch_id: int, sent_at: datetime) -> None:
        ref = CampaignRef(7, f"{index // 100}.{index % 100}", 505)
        header = CampaignScheduled(
            event_id=f"bench-{index}",
            occurred_at=sent_at,
            ref=ref,
            template_id=1,
            template_name="OPT_Weekly",
            scheduled_at=sent_at,
            message_type="SMS",
            recipient_count=2,
            batch_count=1,
            metadata={"journey": "bench"},
        )
        transition = (
            store.transition(ref.key)
            .expect(absent=True)
            .set_state(CampaignState.SENT)
            .set_header(registry.encode("CampaignScheduled", header.to_fields()))
            .set(
                batch_id=batch_id,
                sent_at=sent_at,
                window_ends_at=sent_at + WINDOW,
                polls_done=0,
            )
            .enqueue(keys.poll_queue, ref.key, poll_slot(sent_at, INTERVAL, WINDOW, 1).due_at)
        )
        result = await store.apply(transition, sent_at)
        if not result.ok:
            raise RuntimeError(f"could not register {ref.key}: {result.reason}")

    for start in range(0, len(sends), 50):  # within redis-py's connection pool
        await asyncio.gather(
            *(
                register(index, batch_id, sent_at)
                for index, (batch_id, sent_at) in enumerate(sends[start : start + 50], start)
            )
        )


async def sample_peak_rss(stop: asyncio.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mib())
        await asyncio.sleep(0.05)


async def main_async(args: argparse.Namespace) -> None:
    api_key = secrets.token_hex(16)
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "textlocal_sandbox", "--port", str(port), "--api-key", api_key,
        "--balance", str(args.campaigns * 4), "--log-level", "WARNING",
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    redis: aioredis.Redis = aioredis.Redis.from_url(redis_url(), decode_responses=False)
    keys = RedisKeys(prefix=f"bench-polls-{uuid.uuid4().hex[:8]}:")
    registry = SchemaRegistry.from_directory()
    store = CampaignStore(redis, keys, registry)
    try:
        async with SandboxAdminClient(url) as admin:
            await wait_for_sandbox(admin)
            started = time.perf_counter()
            sends = await send_batches(url, api_key, args.campaigns)
            await register_sent(store, registry, sends)
            print(
                f"set-up: {args.campaigns:,} sends and SENT campaigns in"
                f" {time.perf_counter() - started:.1f} s"
            )

            clock = ManualClock()
            clock.advance(INTERVAL)
            await admin.advance_clock(INTERVAL)
            await admin.reset_call_counts()

            settings = TextLocalSettings(
                api_url=url,
                rate_limit_per_s=args.rate_limit_per_s,
                max_concurrency=args.max_concurrency,
            )
            metrics = Metrics(CollectorRegistry())
            async with TextLocalClient(
                settings, TextLocalCredentials.from_api_key(api_key), observer=metrics
            ) as client:
                poller = Poller(
                    store,
                    client,
                    NoSegments(),
                    registry,
                    PollerSettings(concurrency=args.poll_concurrency),
                    clock,
                    metrics,
                    owner="bench",
                )
                rss_before = rss_mib()
                peak = [rss_before]
                stop_sampling = asyncio.Event()
                sampler = asyncio.create_task(sample_peak_rss(stop_sampling, peak))
                started = time.perf_counter()
                polls = await poller.run_due()
                wall_s = time.perf_counter() - started
                stop_sampling.set()
                await sampler

            calls = (await admin.call_counts()).get("status_batch", 0)
            entries = await store.outbox_read(args.campaigns * 2)
            metric_events = [e for e in entries if e.topic == "metrics"]
            distinct = len({e.event_id for e in metric_events})
            max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"settings: TextLocal {args.rate_limit_per_s:g} requests/s,"
                f" {args.max_concurrency} in flight; poller concurrency {args.poll_concurrency}"
            )
            print(f"polls recorded by run_due: {polls:,}")
            print(f"status_batch calls: {calls:,}")
            print(
                f"metric events in the outbox: {len(metric_events):,} ({distinct:,} distinct ids)"
            )
            print(f"wall time of the cycle: {wall_s:.1f} s ({polls / wall_s:,.1f} polls/s)")
            print(
                f"poller process RSS: {rss_before:.0f} MiB before the cycle, peak"
                f" {peak[0]:.0f} MiB during it; lifetime peak (ru_maxrss) {max_rss_mib:.0f} MiB"
            )
    finally:
        server.terminate()
        await server.wait()
        found = [as_text(k) async for k in redis.scan_iter(match=f"{keys.prefix}*", count=5000)]
        for start in range(0, len(found), 5000):
            await redis.unlink(*found[start : start + 5000])
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--campaigns", type=int, default=10_000)
    parser.add_argument(
        "--rate-limit-per-s", type=float, default=TextLocalSettings.rate_limit_per_s
    )
    parser.add_argument("--max-concurrency", type=int, default=TextLocalSettings.max_concurrency)
    parser.add_argument("--poll-concurrency", type=int, default=PollerSettings.concurrency)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
