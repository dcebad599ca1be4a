"""Sandbox figures: memory for 1,000,000 stored contacts, and create_contacts_bulk throughput.

    .venv/bin/python bench/bench_sandbox.py [--contacts 1000000] [--concurrency 4]

1. Memory: one ContactGroup holding N contacts with names and a customer id, measured with
   tracemalloc (bytes allocated by the group), in this process.
2. Throughput: a sandbox started as its own process (`python -m textlocal_sandbox`), loaded with
   N contacts by create_contacts_bulk calls of 1,500 contacts each, sent urlencoded as form
   clients do, with a few calls in flight; prints calls/s and contacts/s. Then, on that group:
   the time of one group send to every contact and of status_batch on it, and the server's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import socket
import sys
import time
import tracemalloc
from pathlib import Path
from urllib.parse import urlencode

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "sandbox")]  # runnable as a plain script from any directory

from textlocal_sandbox.commands import COMMANDS, CommandContext  # noqa: E402
from textlocal_sandbox.config import SandboxConfig  # noqa: E402
from textlocal_sandbox.contacts import Contact, ContactGroup  # noqa: E402
from textlocal_sandbox.reply import render_success  # noqa: E402
from textlocal_sandbox.state import SandboxState  # noqa: E402
from textlocal_sandbox.wire import RequestParams  # noqa: E402

CHUNK = 1_500
FIRST_NUMBER = 447_000_000_000


def contact(index: int) -> Contact:
    return Contact(
        FIRST_NUMBER + index,
        first_name=f"First{index % 997}",
        last_name=f"Last{index % 991}",
        custom1=f"C{index:07d}",
    )


def measure_memory(count: int) -> tuple[int, float]:
    """Bytes a ContactGroup allocates for `count` contacts (and build time in seconds)."""
    gc.collect()
    tracemalloc.start()
    started = time.perf_counter()
    group = ContactGroup(1001, "bench")
    group.upsert(contact(i) for i in range(count))
    elapsed = time.perf_counter() - started
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(group) == count
    return current, elapsed


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from Linux's /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def measure_server_time(count: int) -> tuple[float, float]:
    """Seconds of server work (command + rendering, no HTTP) for a group send to `count`
    contacts and for status_batch on it once settled."""
    state = SandboxState(SandboxConfig(balance_sms=count * 2))
    group = state.create_group("bench")
    state.add_contacts(group, (contact(i) for i in range(count)), 0.0)
    now_s = time.time()
    started = time.perf_counter()
    sent = COMMANDS["send"](
        CommandContext(state, state.config, now_s),
        RequestParams({"group_id": str(group.id), "message": "Hi"}),
    )
    render_success(sent)
    send_s = time.perf_counter() - started
    started = time.perf_counter()
    report = COMMANDS["status_batch"](
        CommandContext(state, state.config, now_s + 86_400),
        RequestParams({"batch_id": str(sent["batch_id"])}),
    )
    render_success(report)
    return send_s, time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def bulk_body(api_key: str, group_id: int, start: int, size: int) -> bytes:
    contacts = [
        {
            "number": FIRST_NUMBER + i,
            "first_name": f"First{i % 997}",
            "last_name": f"Last{i % 991}",
            "custom1": f"C{i:07d}",
            "custom2": "",
            "custom3": "",
        }
        for i in range(start, start + size)
    ]
    fields = {"apikey": api_key, "group_id": str(group_id), "contacts": json.dumps(contacts)}
    return urlencode(fields).encode()


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> dict[str, object]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with session.post(url, data=body, headers=headers) as response:
        reply: dict[str, object] = json.loads(await response.text())
    if reply.get("status") != "success":
        raise RuntimeError(f"sandbox refused: {reply}")
    return reply


async def measure_http(count: int, concurrency: int) -> None:
    api_key = secrets.token_hex(16)
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "textlocal_sandbox", "--port", str(port), "--api-key", api_key,
        "--balance", str(count * 2), "--log-level", "WARNING",
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/"
    try:
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(100):
                try:
                    async with session.get(base + "_sandbox/clock") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            query = urlencode({"apikey": api_key, "name": "bench"})
            group = await post(session, base + "create_group/?" + query, b"")
            group_id = int(group["group"]["id"])  # type: ignore[index]
            starts = list(range(0, count, CHUNK))
            bodies = [bulk_body(api_key, group_id, s, min(CHUNK, count - s)) for s in starts]
            rss_before = rss_bytes(server.pid)
            queue = list(reversed(bodies))

            async def worker() -> None:
                while queue:
                    await post(session, base + "create_contacts_bulk/", queue.pop())

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            rss_after = rss_bytes(server.pid)
            print(
                f"create_contacts_bulk: {len(bodies)} calls x {CHUNK} contacts in {elapsed:.1f} s"
                f" = {len(bodies) / elapsed:.1f} calls/s ({count / elapsed:,.0f} contacts/s),"
                f" concurrency {concurrency}"
            )
            print(
                f"server RSS growth while loading {count:,} contacts over HTTP:"
                f" {(rss_after - rss_before) / 2**20:.0f} MiB"
            )

            body = urlencode({"apikey": api_key, "group_id": group_id, "message": "Hi"}).encode()
            started = time.perf_counter()
            sent = await post(session, base + "send/", body)
            send_s = time.perf_counter() - started
            print(f"group send to {sent['num_messages']:,} recipients: {send_s:.2f} s round trip")

            advance = json.dumps({"seconds": 86_400}).encode()
            async with session.post(base + "_sandbox/clock/advance", data=advance) as response:
                await response.read()
            body = urlencode({"apikey": api_key, "batch_id": sent["batch_id"]}).encode()
            started = time.perf_counter()
            report = await post(session, base + "status_batch/", body)
            status_s = time.perf_counter() - started
            print(
                f"status_batch of {report['num_messages']:,} messages: {status_s:.2f} s round trip,"
                f" {report['num_delivered']:,} delivered"
            )
            rss = rss_bytes(server.pid)
            print(f"server RSS at the end: {rss / 2**20:.0f} MiB")
    finally:
        server.terminate()
        await server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--contacts", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    allocated, build_s = measure_memory(args.contacts)
    print(
        f"memory: {args.contacts:,} contacts in one group = {allocated / 2**20:.1f} MiB"
        f" ({allocated / args.contacts:.0f} bytes/contact; built in {build_s:.1f} s)"
    )
    send_s, status_s = measure_server_time(args.contacts)
    print(
        f"server time (in-process, no HTTP): group send to {args.contacts:,} = {send_s:.2f} s,"
        f" status_batch = {status_s:.2f} s"
    )
    asyncio.run(measure_http(args.contacts, args.concurrency))


if __name__ == "__main__":
    main()
