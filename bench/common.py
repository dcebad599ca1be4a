"""What the benchmark scripts share: a free port, the local stack's addresses, waiting for an
HTTP endpoint, leaving Redis and Kafka as they were found. (Each script stays runnable on its
own: `python bench/bench_x.py`.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stack_services() -> tuple[str, str]:
    """(Kafka bootstrap, Redis URL): from the environment, else the local stack's."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("REDIS_URL"):
        return os.environ["KAFKA_BOOTSTRAP_SERVERS"], os.environ["REDIS_URL"]
    output = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "local" / "stack.py"), "env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    values = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    return values["KAFKA_BOOTSTRAP_SERVERS"], values["REDIS_URL"]


async def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"{url} did not answer in {timeout_s:.0f}s")


async def delete_prefix(redis_url: str, prefix: str) -> None:
    """Leave Redis as the bench found it (a million-entry contact index per run adds up)."""
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await unlink_prefix(redis, prefix)
    finally:
        await redis.aclose()


async def unlink_prefix(redis: aioredis.Redis, prefix: str) -> None:
    """Unlink every key under `prefix`, 5,000 at a time."""
    batch = []
    async for key in redis.scan_iter(match=f"{prefix}*", count=5000):
        batch.append(key)
        if len(batch) == 5000:
            await redis.unlink(*batch)
            batch = []
    if batch:
        await redis.unlink(*batch)


def delete_topics_and_groups(bootstrap: str, topics: list[str], groups: list[str]) -> None:
    """Delete the bench's topics and consumer groups; those never created are no error."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(topics).values():
        with contextlib.suppress(Exception):  # a topic nobody created: the run ended before
            future.result(timeout=30)
    for future in admin.delete_consumer_groups(groups).values():
        with contextlib.suppress(Exception):  # a daemon that never joined
            future.result(timeout=30)
