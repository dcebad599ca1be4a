#!/usr/bin/env python3
"""Benchmark: the rate of delivery receipts the daemon accepts and records, with none lost.

    .venv/bin/python bench/bench_receipts.py [--receipts 50000] [--concurrency 32]
                                             [--campaigns 4] [--duplicates 0.1]

One daemon (`python -m consumer.cli run`, role poller only, with a receipt token: the listener
and the drain run in every process that has one) on its own Redis prefix and topics. The bench
registers `--campaigns` campaigns as sent (their `custom` references and the number → customer
map the load step writes), then a load script POSTs form-encoded receipts (number, status,
customID, datetime, as TextLocal does) to `/receipts/<token>` from `--concurrency` connections
as fast as the daemon answers (closed loop), each number once, plus `--duplicates` of them a
second time. Measured: receipts accepted per second (wall time of the load), answer times (p50,
p99, max), the answers by result; then, until the drain has emptied the backlog, how long the
receipts take to become CustomerOutcomes, and — read back from the outcomes topic — that every
accepted number's customer is in exactly one record (none lost, none counted twice), except
those of U receipts, which the drain leaves to the polls (docs/DECISIONS.md).

The load generator runs on the same machine as the daemon and Redis (it shares their cores), so
the rate is a floor of what the daemon takes. Needs the local stack (`make stack-up`; or
`$KAFKA_BOOTSTRAP_SERVERS` and `$REDIS_URL`); `make bench` runs it. Deletes its topics and Redis
keys and stops its processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from any directory

from bench.common import free_port, stack_services  # noqa: E402
from consumer.codec import SchemaRegistry  # noqa: E402
from consumer.events import CampaignRef  # noqa: E402
from consumer.keys import RedisKeys  # noqa: E402
from consumer.store import CampaignStore  # noqa: E402
from consumer.workflow import short_reference  # noqa: E402

WORK = REPO / ".cache" / "bench"
TOKEN = "bench-receipts-" + uuid.uuid4().hex + uuid.uuid4().hex
STATUSES = ("D",) * 90 + ("U",) * 4 + ("I",) * 2 + ("?",) * 4
REGISTRY = SchemaRegistry.from_directory()


def percentile(sorted_values: list[float], share: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))]


def outcome_customers(bootstrap: str, topic: str, expected: int, timeout_s: float) -> Counter[str]:
    """Customer ids in the CustomerOutcomes records of `topic`, counted (read until `expected`
    distinct ids are in, or the timeout)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-receipts-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    metadata = consumer.list_topics(topic, timeout=10)
    partitions = list(metadata.topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < expected and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=1.0):
                value = message.value()
                if message.error() or value is None:
                    continue
                fields = REGISTRY.decode(value).fields
                seen.update(fields["customer_ids"])
    finally:
        consumer.close()
    return seen


async def main_async(args: argparse.Namespace) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    bootstrap, redis_url = stack_services()
    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench-receipts-{run_id}:"
    topics = {
        name: f"bench-receipts-{run_id}-{name}"
        for name in ("input", "status", "metrics", "templates", "dlq", "outcomes")
    }
    receipts_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TEXTLOCAL_CONSUMER_INSTANCE_ID": "bench-receipts",
        "TEXTLOCAL_CONSUMER_ROLES": "poller",
        "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        **{
            f"TEXTLOCAL_CONSUMER_KAFKA_{name.upper()}_TOPIC": topic
            for name, topic in topics.items()
        },
        "TEXTLOCAL_CONSUMER_KAFKA_CREATE_TOPICS": "true",
        "TEXTLOCAL_CONSUMER_KAFKA_TOPIC_PARTITIONS": "3",
        "TEXTLOCAL_CONSUMER_REDIS_URL": redis_url,
        "TEXTLOCAL_CONSUMER_REDIS_KEY_PREFIX": prefix,
        # No TextLocal call is made by this role set in the bench's time.
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_URL": "http://127.0.0.1:9/",
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": "bench-key",
        "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": json.dumps([{"id": 1, "template_prefix": "OPT_"}]),
        "TEXTLOCAL_CONSUMER_HTTP_HOST": "127.0.0.1",
        "TEXTLOCAL_CONSUMER_HTTP_PORT": str(http_port),
        "TEXTLOCAL_CONSUMER_RECEIPTS_HOST": "127.0.0.1",
        "TEXTLOCAL_CONSUMER_RECEIPTS_PORT": str(receipts_port),
        "TEXTLOCAL_CONSUMER_RECEIPTS_TOKEN": TOKEN,
        "TEXTLOCAL_CONSUMER_RECEIPTS_MAX_BACKLOG": str(args.receipts * 2),
        "TEXTLOCAL_CONSUMER_LOG_FORMAT": "json",
    }
    redis = aioredis.Redis.from_url(redis_url)
    store = CampaignStore(redis, RedisKeys(prefix=prefix), REGISTRY)
    # The campaigns, as the executor leaves them once sent: reference registered, numbers mapped.
    per_campaign = -(-args.receipts // args.campaigns)
    receipts: list[dict[str, str]] = []
    for c in range(args.campaigns):
        ref = CampaignRef(tenant_id=7, campaign_id=f"bench.{run_id}.{c}", channel_id=505)
        reference = short_reference(ref)
        await store.register_receipt_reference(reference, ref.key, timedelta(hours=1))
        numbers = [str(447_700_000_000 + c * per_campaign + i) for i in range(per_campaign)]
        await store.record_recipient_numbers(
            ref.key, [(n, f"C{c}-{i:07d}") for i, n in enumerate(numbers)], ttl_s=3600
        )
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        receipts += [
            {
                "number": n,
                "status": random.choice(STATUSES),
                "customID": reference,
                "datetime": stamp,
            }
            for n in numbers
        ]
    receipts = receipts[: args.receipts]
    random.shuffle(receipts)
    load = receipts + random.sample(receipts, int(len(receipts) * args.duplicates))
    random.shuffle(load)

    log_path = WORK / f"receipts-{run_id}.log"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", "run"],
        cwd=REPO,
        env=env,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
    )
    answers: Counter[str] = Counter()
    times: list[float] = []
    try:
        url = f"http://127.0.0.1:{receipts_port}/receipts/{TOKEN}"
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(150):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{http_port}/readyz") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.2)
            else:
                raise SystemExit(f"daemon not ready; see {log_path}")
            queue = iter(load)

            async def worker() -> None:
                for form in queue:
                    started = time.perf_counter()
                    async with session.post(url, data=form) as response:
                        body = await response.text()
                    times.append(time.perf_counter() - started)
                    answers[f"{response.status} {body}"] += 1

            load_started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            load_s = time.perf_counter() - load_started
        drain_started = time.perf_counter()
        while await store.receipts_backlog() > 0 and time.perf_counter() - drain_started < 300:
            await asyncio.sleep(0.1)
        drained_after_s = time.perf_counter() - drain_started
        accepted = answers.get("200 accepted", 0)
        # A U receipt is left to the polls (it may be an expiry): no outcome from it here.
        left_to_poll = sum(1 for r in receipts if r["status"] == "U")
        seen = await asyncio.to_thread(
            outcome_customers, bootstrap, topics["outcomes"], accepted - left_to_poll, 120.0
        )
        published_after_s = time.perf_counter() - drain_started
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await redis.unlink(*keys)
        await redis.aclose()
        admin = AdminClient({"bootstrap.servers": bootstrap})
        with contextlib.suppress(Exception):
            for future in admin.delete_topics(list(topics.values())).values():
                future.result(30)
    times.sort()
    twice = sum(1 for count in seen.values() if count > 1)
    log_text = log_path.read_text(errors="replace")
    leaked = sum(1 for r in receipts if r["number"] in log_text)
    print(
        f"\nreceipts: {len(receipts):,} numbers + {len(load) - len(receipts):,} duplicates, "
        f"{args.concurrency} connections, {args.campaigns} campaigns"
    )
    print(f"  answers: {dict(answers)}")
    print(
        f"  accepted and recorded: {len(load) / load_s:,.0f} receipts/s answered "
        f"({accepted / load_s:,.0f}/s new) over {load_s:.1f} s"
    )
    print(
        f"  answer time: p50 {percentile(times, 0.50) * 1000:.1f} ms, "
        f"p99 {percentile(times, 0.99) * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms"
    )
    print(
        f"  backlog drained {drained_after_s:.1f} s after the load; outcomes on the topic "
        f"{published_after_s:.1f} s after"
    )
    lost = accepted - left_to_poll - len(seen)
    print(
        f"  customers in CustomerOutcomes: {len(seen):,} of {accepted:,} accepted, "
        f"{left_to_poll:,} U left to the polls (lost {lost}, in two records {twice}); "
        f"numbers in the daemon's log: {leaked}"
    )
    ok = lost == 0 and twice == 0 and leaked == 0 and accepted == len(receipts)
    print(f"  none lost, none twice: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--receipts", type=int, default=50_000, help="distinct receipts")
    parser.add_argument("--concurrency", type=int, default=32, help="connections in flight")
    parser.add_argument("--campaigns", type=int, default=4, help="campaigns they belong to")
    parser.add_argument(
        "--duplicates", type=float, default=0.1, help="share of receipts posted a second time"
    )
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
