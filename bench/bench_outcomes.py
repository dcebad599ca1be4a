"""The final poll of a 1,000,000-recipient campaign, publishing per-customer outcomes.

    .venv/bin/python bench/bench_outcomes.py [--recipients 1000000]

1. Starts the sandbox as its own process, generates a master group of `--recipients` contacts
   and sends one SMS to the whole group (one batch).
2. Records the campaign as the executor leaves it (SENT, its header, batch id, window) with the
   numbers hash the load step writes (number → customer id), and six polls already made, so the
   next one is the window's last; reports the hash's Redis memory.
3. Moves both clocks to the window's end (every message settled) and runs `Poller.run_due()`
   with the outcome recorder, as the daemon's poller does: `status_batch` read (compactly) to
   its end, then every customer's outcome published in records of 10,000 through the outbox.
4. Runs a plain script (its own process) that fetches the same report with aiohttp and
   `json.loads` and counts the statuses: the floor for reading the report at all.
5. Prints: the poll's time next to the plain script's, this process's RSS (before, peak sampled
   every 50 ms during the poll, lifetime peak) and the script's, the records and customers
   published, and checks each customer was published exactly once.

Redis: $REDIS_URL, else the local stack (`deploy/local/stack.py up`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "sandbox"), str(REPO / "bench")]

from bench.bench_polls import (  # noqa: E402
    NoSegments,
    free_port,
    redis_url,
    rss_mib,
    sample_peak_rss,
    wait_for_sandbox,
)
from consumer.clock import ManualClock  # noqa: E402
from consumer.codec import SchemaRegistry  # noqa: E402
from consumer.events import CampaignRef, CampaignScheduled  # noqa: E402
from consumer.keys import RedisKeys  # noqa: E402
from consumer.metrics import Metrics  # noqa: E402
from consumer.outcomes import OUTCOMES, OutcomeRecorder  # noqa: E402
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
FIRST_NUMBER = 447_000_000_000

PLAIN_SCRIPT = r"""
import asyncio, collections, json, resource, sys, time
import aiohttp

async def main(url, api_key, batch_id):
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        form = {"apikey": api_key, "batch_id": batch_id}
        async with session.post(url + "status_batch/", data=form) as response:
            reply = json.loads(await response.read())
    counts = collections.Counter(m["status"] for m in reply["messages"])
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{elapsed:.3f} {peak:.0f} {sum(counts.values())}")

asyncio.run(main(*sys.argv[1:]))
"""


async def send_to_group(url: str, api_key: str, group_id: int) -> int:
    async with aiohttp.ClientSession() as session:
        form = {"apikey": api_key, "group_id": str(group_id), "message": "Hi", "sender": "Shop"}
        async with session.post(url + "send/", data=form) as response:
            # The reply lists every recipient (~40 MB): only the batch id is needed.
            body = await response.read()
    marker = b'"batch_id":'
    start = body.index(marker) + len(marker)
    return int(body[start : body.index(b",", start)])


async def record_campaign(
    store: CampaignStore, registry: SchemaRegistry, clock: ManualClock, batch_id: int, count: int
) -> CampaignRef:
    ref = CampaignRef(7, f"bench-outcomes-{uuid.uuid4().hex[:6]}", 505)
    sent_at = clock.now()
    header = CampaignScheduled(
        event_id=f"bench-{uuid.uuid4()}",
        occurred_at=sent_at,
        ref=ref,
        template_id=1,
        template_name="OPT_Bench",
        scheduled_at=sent_at,
        message_type="SMS",
        recipient_count=count,
        batch_count=-(-count // 10_000),
        metadata={"journey": "bench"},
    )
    transition = (
        store.transition(ref.key)
        .expect(absent=True)
        .set_state(CampaignState.POLLING)
        .set_header(registry.encode("CampaignScheduled", header.to_fields()))
        .set(
            batch_id=batch_id,
            sent_at=sent_at,
            window_ends_at=sent_at + WINDOW,
            polls_done=6,
        )
        .enqueue(store.keys.poll_queue, ref.key, poll_slot(sent_at, INTERVAL, WINDOW, 7).due_at)
    )
    assert (await store.apply(transition, sent_at)).ok
    # What the load step records, batch by batch.
    for first in range(0, count, 10_000):
        last = min(first + 10_000, count)
        pairs = [(str(FIRST_NUMBER + i), f"C{i + 1:07d}") for i in range(first, last)]
        await store.record_recipient_numbers(ref.key, pairs, 30 * 86400)
    return ref


async def main_async(args: argparse.Namespace) -> None:
    api_key = secrets.token_hex(16)
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "textlocal_sandbox", "--port", str(port), "--api-key", api_key,
        "--balance", str(args.recipients * 2), "--log-level", "WARNING",
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    redis: aioredis.Redis = aioredis.Redis.from_url(redis_url(), decode_responses=False)
    keys = RedisKeys(prefix=f"bench-outcomes-{uuid.uuid4().hex[:8]}:")
    registry = SchemaRegistry.from_directory()
    store = CampaignStore(redis, keys, registry)
    try:
        async with SandboxAdminClient(url) as admin:
            await wait_for_sandbox(admin)
            started = time.perf_counter()
            group_id = await admin.generate_contacts(
                "Optimove customers", args.recipients, first_number=FIRST_NUMBER
            )
            batch_id = await send_to_group(url, api_key, group_id)
            clock = ManualClock()
            ref = await record_campaign(store, registry, clock, batch_id, args.recipients)
            numbers_bytes = await redis.memory_usage(keys.recipient_numbers(ref.key)) or 0
            print(
                f"set-up: {args.recipients:,} contacts, one send, the campaign and its numbers"
                f" recorded in {time.perf_counter() - started:.1f} s; numbers hash in Redis"
                f" {numbers_bytes / 2**20:.1f} MiB"
            )
            clock.advance(WINDOW)
            await admin.advance_clock(WINDOW)

            metrics = Metrics(CollectorRegistry())
            settings = TextLocalSettings(api_url=url, request_timeout_s=600.0)
            async with TextLocalClient(
                settings, TextLocalCredentials.from_api_key(api_key), observer=metrics
            ) as client:
                poller = Poller(
                    store,
                    client,
                    NoSegments(),
                    registry,
                    PollerSettings(),
                    clock,
                    metrics,
                    owner="bench",
                    outcomes=OutcomeRecorder(store, registry, metrics.customer_outcomes),
                )
                rss_before = rss_mib()
                peak = [rss_before]
                stop_sampling = asyncio.Event()
                sampler = asyncio.create_task(sample_peak_rss(stop_sampling, peak))
                started = time.perf_counter()
                polls = await poller.run_due()
                poll_s = time.perf_counter() - started
                stop_sampling.set()
                await sampler
            max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

            plain = subprocess.run(
                [sys.executable, "-c", PLAIN_SCRIPT, url, api_key, str(batch_id)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            plain_s, plain_rss, plain_messages = plain.stdout.split()

            customers: set[str] = set()
            records = published = 0
            for entry in await store.outbox_read(10_000):
                if entry.topic != OUTCOMES:
                    continue
                ids = registry.decode(entry.value or b"").fields["customer_ids"]
                records += 1
                published += len(ids)
                customers.update(ids)
            numbers_left = await redis.exists(keys.recipient_numbers(ref.key))
            print(f"polls recorded: {polls} (the final one)")
            print(
                f"CustomerOutcomes: {records:,} records, {published:,} customers published,"
                f" {len(customers):,} distinct (of {args.recipients:,});"
                f" numbers hash deleted: {not numbers_left}"
            )
            print(
                f"final poll with outcomes: {poll_s:.2f} s; plain script fetching the same"
                f" report ({int(plain_messages):,} messages, aiohttp + json.loads):"
                f" {float(plain_s):.2f} s"
            )
            print(
                f"poller process RSS: {rss_before:.0f} MiB before the poll, peak {peak[0]:.0f} MiB"
                f" during it (target <= 300 MB); lifetime peak (ru_maxrss) {max_rss_mib:.0f} MiB;"
                f" plain script's peak {plain_rss} MiB"
            )
            if published != args.recipients or len(customers) != args.recipients:
                raise SystemExit("not every customer was published exactly once")
    finally:
        server.terminate()
        await server.wait()
        found = [as_text(k) async for k in redis.scan_iter(match=f"{keys.prefix}*", count=5000)]
        for start in range(0, len(found), 5000):
            await redis.unlink(*found[start : start + 5000])
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--recipients", type=int, default=1_000_000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
