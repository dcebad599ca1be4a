"""What the benchmark scripts share: a free port, the local stack's addresses, waiting for an
HTTP endpoint. (Each script stays runnable on its own: `python bench/bench_x.py`.)"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

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
