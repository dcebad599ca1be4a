#!/usr/bin/env python3
"""Benchmark: one 1,000,000-recipient campaign through the real daemon, against the sandbox.

Prints
- the TextLocal calls the daemon made for the campaign, next to the minimum
  (1 create_group + ⌈matched / 1,500⌉ create_contacts_bulk + 1 balance + 1 send);
- the daemon's peak RSS (VmHWM of its process) — target ≤ 300 MB;
- wall time from the first event published (by a producer warmed up beforehand) to the
  campaign recorded SENT, next to the floor:
  a plain aiohttp script making the same calls, at the same concurrency, against the same
  sandbox (payloads prepared beforehand) — target ≤ 1.5 × the floor.

Needs the local stack (`make stack-up`); `make bench` runs it. Uses its own topics, Redis key
prefix and sandbox process, and leaves the stack as it found it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from confluent_kafka import Producer

from bench.common import delete_prefix, delete_topics_and_groups, free_port, wait_http
from consumer.codec import SchemaRegistry
from consumer.events import CampaignRecipients, CampaignRef, CampaignScheduled
from consumer.keys import RedisKeys
from consumer.store import as_text
from textlocal_sandbox import SandboxAdminClient

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPIENTS = int(os.environ.get("BENCH_RECIPIENTS", "1000000"))
UNMATCHED = RECIPIENTS // 200  # 0.5% of the targeted ids are not in the master group
BATCH = 10_000
CONCURRENCY = 4  # create_contacts_bulk calls in flight, the daemon's default
API_KEY = "bench-key"
WORK = REPO / ".cache" / "bench"


def stack_env() -> dict[str, str]:
    output = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "local" / "stack.py"), "env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def floor_run(sandbox_url: str, master_group: int, matched: int, message: str) -> float:
    """The same calls as the daemon, from a plain script: the time TextLocal itself needs."""
    chunks = []
    for start in range(0, matched, 1500):
        contacts = [
            {
                "number": str(447_000_000_000 + i),
                "first_name": "",
                "last_name": "",
                "custom1": f"C{i + 1:07d}",
            }
            for i in range(start, min(start + 1500, matched))
        ]
        chunks.append(json.dumps(contacts))
    del master_group
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(command: str, **params: str) -> dict[str, object]:
            async with session.post(
                f"{sandbox_url}{command}/", data={**params, "apikey": API_KEY}
            ) as response:
                reply: dict[str, object] = await response.json(content_type=None)
            assert reply["status"] == "success", reply
            return reply

        started = time.monotonic()
        group = await call("create_group", name=f"floor-{uuid.uuid4().hex[:8]}")
        group_id = str(group["group"]["id"])  # type: ignore[index]
        gate = asyncio.Semaphore(CONCURRENCY)

        async def load(payload: str) -> None:
            async with gate:
                await call("create_contacts_bulk", group_id=group_id, contacts=payload)

        await asyncio.gather(*(load(chunk) for chunk in chunks))
        await call("balance")
        await call("send", group_id=group_id, message=message)
        return time.monotonic() - started


def publish_campaign(
    bootstrap: str, topic: str, warm_up_topic: str, template_id: int
) -> tuple[CampaignRef, float]:
    """Encode every event, then publish them: the campaign and the monotonic time of the first.

    The producer is warmed up first with one record to a topic of its own, which the daemon does
    not read: a new idempotent producer's first record waits ~0.5 s for its producer id and
    metadata, time of this script's set-up, not of the daemon (as in bench_variants.py)."""
    registry = SchemaRegistry.from_directory()
    ref = CampaignRef(1, f"bench-{uuid.uuid4().hex[:6]}", 505)
    ids = [f"C{i:07d}" for i in range(1, RECIPIENTS - UNMATCHED + 1)]
    ids += [f"NOBODY-{i}" for i in range(UNMATCHED)]
    batches = [ids[i : i + BATCH] for i in range(0, len(ids), BATCH)]
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
        batch_count=len(batches),
        promo_codes=("BENCH",),
    )
    encoded = [registry.encode("CampaignScheduled", header.to_fields())]
    for index, batch in enumerate(batches):
        event = CampaignRecipients(str(uuid.uuid4()), now, ref, index, tuple(batch))
        encoded.append(registry.encode("CampaignRecipients", event.to_fields()))
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "message.max.bytes": 10_000_000,
            "linger.ms": 5,
        }
    )
    producer.produce(warm_up_topic, value=b"warm-up")
    producer.flush(30)
    started = time.monotonic()
    for value in encoded:
        producer.produce(topic, key=ref.key.encode(), value=value)
    producer.flush(60)
    return ref, started


async def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    stack = stack_env()
    sandbox_port, http_port = free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}/"
    sandbox = subprocess.Popen(
        [
            str(BIN / "python"),
            "-m",
            "textlocal_sandbox",
            "--port",
            str(sandbox_port),
            "--api-key",
            API_KEY,
            "--balance",
            str(RECIPIENTS * 10),
        ],
        stdout=open(WORK / "sandbox.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    daemon: subprocess.Popen[bytes] | None = None
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    topic = f"bench-input-{uuid.uuid4().hex[:8]}"
    warm_up_topic = f"{topic}-warm-up"
    try:
        await wait_http(f"{sandbox_url}_sandbox/clock", 30)
        admin = SandboxAdminClient(sandbox_url)
        matched = RECIPIENTS - UNMATCHED
        group_id = await admin.generate_contacts("Optimove customers", matched + 10_000)
        (template_id,) = await admin.seed_templates(
            [{"title": "OPT_Bench", "body": "Big sale: use [%PROMO_CODE%] at Shop & Co today."}]
        )
        message = "Big sale: use BENCH at Shop & Co today."
        print(f"sandbox: {matched + 10_000:,} contacts in group {group_id}", flush=True)

        floor_before = await floor_run(sandbox_url, group_id, matched, message)
        print(f"floor (plain aiohttp, before): {floor_before:.1f}s", flush=True)

        env = {
            **os.environ,
            "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": stack["KAFKA_BOOTSTRAP_SERVERS"],
            "TEXTLOCAL_CONSUMER_KAFKA_INPUT_TOPIC": topic,
            "TEXTLOCAL_CONSUMER_KAFKA_GROUP_ID": f"{topic}-daemon",
            "TEXTLOCAL_CONSUMER_KAFKA_CREATE_TOPICS": "true",
            "TEXTLOCAL_CONSUMER_REDIS_URL": stack["REDIS_URL"],
            "TEXTLOCAL_CONSUMER_REDIS_KEY_PREFIX": prefix,
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_URL": sandbox_url,
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": API_KEY,
            # The sandbox enforces no rate limit; the daemon's default (10/s) would be the floor.
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_RATE_LIMIT_PER_S": "10000",
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_MAX_CONCURRENCY": str(CONCURRENCY),
            "TEXTLOCAL_CONSUMER_WORKFLOW_CONTACT_LOAD_CONCURRENCY": str(CONCURRENCY),
            "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": json.dumps(
                [{"id": group_id, "template_prefix": "OPT_", "customer_id_field": "custom1"}]
            ),
            "TEXTLOCAL_CONSUMER_HTTP_PORT": str(http_port),
            "TEXTLOCAL_CONSUMER_LOG_FORMAT": "json",
        }
        daemon = subprocess.Popen(
            [str(BIN / "textlocal-consumer"), "run"],
            env=env,
            stdout=open(WORK / "daemon.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        await wait_http(f"http://127.0.0.1:{http_port}/readyz", 120)
        redis = aioredis.Redis.from_url(stack["REDIS_URL"])
        keys = RedisKeys(prefix=prefix)
        print("daemon ready; waiting for its contact index and template import ...", flush=True)
        deadline = time.monotonic() + 600
        while not await redis.exists(keys.daily_job_last_success("contacts")):
            if time.monotonic() > deadline:
                raise SystemExit("the contact index was not built in 10 minutes")
            await asyncio.sleep(1)
        while not await redis.exists(keys.daily_job_last_success("templates")):
            await asyncio.sleep(0.5)
        await admin.reset_call_counts()

        ref, started = await asyncio.to_thread(
            publish_campaign, stack["KAFKA_BOOTSTRAP_SERVERS"], topic, warm_up_topic, template_id
        )
        print(f"published {RECIPIENTS:,} recipients in {RECIPIENTS // BATCH} batches", flush=True)
        state = ""
        while state != "SENT":
            state = as_text(await redis.hget(keys.campaign(ref.key), "state") or b"")
            if state in ("FAILED", "REJECTED"):
                raise SystemExit(f"campaign ended {state}; see {WORK}/daemon.log")
            await asyncio.sleep(0.05)
        wall = time.monotonic() - started
        rss = peak_rss_mb(daemon.pid)
        calls = await admin.call_counts()
        campaign_calls = {k: v for k, v in calls.items() if v}
        minimum = {
            "create_group": 1,
            "create_contacts_bulk": math.ceil(matched / 1500),
            "balance": 1,
            "send": 1,
        }

        floor_after = await floor_run(sandbox_url, group_id, matched, message)
        floor = (floor_before + floor_after) / 2
        await admin.close()
        await redis.aclose()

        print()
        print(f"recipients {RECIPIENTS:,} (matched {matched:,}, unmatched {UNMATCHED:,})")
        print(f"TextLocal calls made : {campaign_calls}")
        verdict = "EQUAL" if campaign_calls == minimum else "DIFFERENT"
        print(f"TextLocal calls floor: {minimum}  -> {verdict}")
        print(f"daemon peak RSS      : {rss:.0f} MB (target <= 300 MB)")
        print(f"wall time to SENT    : {wall:.1f}s")
        print(
            f"floor (plain aiohttp): {floor:.1f}s (runs: {floor_before:.1f}s, {floor_after:.1f}s)"
        )
        print(f"ratio                : {wall / floor:.2f}x (target <= 1.5x)")
        return 0
    finally:
        for process in (daemon, sandbox):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
        # Only once the daemon is gone: it writes to Redis, and reads its topic, until it stops.
        await delete_prefix(stack["REDIS_URL"], prefix)
        delete_topics_and_groups(
            stack["KAFKA_BOOTSTRAP_SERVERS"], [topic, warm_up_topic], [f"{topic}-daemon"]
        )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
