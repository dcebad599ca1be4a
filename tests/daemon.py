"""The daemon as a real process (`textlocal-consumer run`) for tests about processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from consumer.events import CampaignRef, InputEvent
from consumer.keys import RedisKeys
from consumer.store import CampaignStore
from consumer.workflow import CampaignState
from tests.helpers import REGISTRY, consume, eventually, produce, recipients, scheduled
from textlocal_sandbox import SandboxHandle

CONSOLE_SCRIPT = str(Path(sys.executable).parent / "textlocal-consumer")
# The checkout these tests belong to: daemons import `consumer` from here (PYTHONPATH), not from
# wherever the virtualenv's console script was installed from (another worktree, say).
CHECKOUT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class DaemonTopics:
    input: str
    status: str
    metrics: str
    templates: str
    dlq: str
    outcomes: str


def daemon_environment(
    *,
    kafka_bootstrap: str,
    redis_url: str,
    key_prefix: str,
    topics: DaemonTopics,
    sandbox: SandboxHandle,
    group_id: int,
    http_port: int,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Settings for a daemon on the test's own topics, Redis prefix and sandbox."""
    groups = [
        {
            "id": group_id,
            "name": "Optimove customers",
            "template_prefix": "OPT_",
            "customer_id_field": "custom1",
        }
    ]
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(CHECKOUT),
        "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "TEXTLOCAL_CONSUMER_KAFKA_GROUP_ID": f"{topics.input}-daemon",
        "TEXTLOCAL_CONSUMER_KAFKA_INPUT_TOPIC": topics.input,
        "TEXTLOCAL_CONSUMER_KAFKA_STATUS_TOPIC": topics.status,
        "TEXTLOCAL_CONSUMER_KAFKA_METRICS_TOPIC": topics.metrics,
        "TEXTLOCAL_CONSUMER_KAFKA_TEMPLATES_TOPIC": topics.templates,
        "TEXTLOCAL_CONSUMER_KAFKA_OUTCOMES_TOPIC": topics.outcomes,
        "TEXTLOCAL_CONSUMER_KAFKA_DLQ_TOPIC": topics.dlq,
        "TEXTLOCAL_CONSUMER_REDIS_URL": redis_url,
        "TEXTLOCAL_CONSUMER_REDIS_KEY_PREFIX": key_prefix,
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_URL": sandbox.url,
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": sandbox.api_key,
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_RATE_LIMIT_PER_S": "500",
        "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": json.dumps(groups),
        "TEXTLOCAL_CONSUMER_HTTP_HOST": "127.0.0.1",
        "TEXTLOCAL_CONSUMER_HTTP_PORT": str(http_port),
        "TEXTLOCAL_CONSUMER_LOG_FORMAT": "json",
        "TEXTLOCAL_CONSUMER_WORKFLOW_LEASE_TTL_S": "6",
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_REQUEST_TIMEOUT_S": "5",
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_CONNECT_TIMEOUT_S": "1",
        "TEXTLOCAL_CONSUMER_WORKFLOW_SEND_RECONCILE_GRACE_S": "7",
        "TEXTLOCAL_CONSUMER_WORKFLOW_DRAIN_TIMEOUT_S": "10",
    }
    env.update(extra or {})
    return env


class DaemonProcess:
    """One `textlocal-consumer run` process, its output in a file."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_port(self) -> int:
        return int(self.env["TEXTLOCAL_CONSUMER_HTTP_PORT"])

    def start(self, extra_env: Mapping[str, str] | None = None) -> DaemonProcess:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [CONSOLE_SCRIPT, "run"],
                env={**self.env, **(extra_env or {})},
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        return self

    def send(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_exit(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon still running after {timeout_s}s:\n{self.tail()}")
            await asyncio.sleep(0.1)
        return int(self.process.returncode)

    async def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; kills it if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            return -1 if self.process is None else int(self.process.returncode)
        self.send(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout_s)
        except AssertionError:
            self.process.kill()
            raise

    async def health(self, path: str) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            body = await response.text()
            try:
                return response.status, json.loads(body)
            except json.JSONDecodeError:
                return response.status, {"text": body}

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.process.returncode}:\n{self.tail()}"
                )
            try:
                status, _ = await self.health("/readyz")
                if status == 200:
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"daemon not ready within {timeout_s}s:\n{self.tail()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        found = []
        for line in self.output().splitlines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return found


# --- a whole daemon world per test -----------------------------------------------------------

PROMO_BODY = "Shop & Co: 20% off with [%PROMO_CODE%] this weekend only!"
MASTER_CONTACTS = 30_000
FIRST_NUMBER = 447_700_000_000
# Contacts whose numbers TextLocal would refuse: resolved as invalid numbers, never sent to.
INVALID_CONTACTS = [
    {"number": 4477000001, "custom1": "INV-1", "first_name": "Ten"},
    {"number": 44770000000123, "custom1": "INV-2", "first_name": "Fourteen"},
    {"number": 12345, "custom1": "INV-3", "first_name": "Short"},
]


@dataclass
class Stack:
    """One test's daemon world: topics, Redis prefix, a seeded sandbox, and daemon processes."""

    bootstrap: str
    topics: DaemonTopics
    store: CampaignStore
    sandbox: SandboxHandle
    template_id: int
    env: dict[str, str]
    tmp_path: Path
    daemons: list[DaemonProcess]

    def daemon(self, name: str = "daemon", **extra: str) -> DaemonProcess:
        env = {**self.env, **extra}
        if "TEXTLOCAL_CONSUMER_HTTP_PORT" not in extra:
            env["TEXTLOCAL_CONSUMER_HTTP_PORT"] = str(free_port())
        process = DaemonProcess(env, self.tmp_path / f"{name}.log")
        self.daemons.append(process)
        return process

    def publish(self, *events: InputEvent | tuple[bytes, bytes]) -> None:
        produce(self.bootstrap, self.topics.input, list(events))

    def campaign(
        self, ref: CampaignRef, customer_ids: list[str], batches: int, **header: Any
    ) -> list[InputEvent]:
        size = -(-len(customer_ids) // batches)
        fields: dict[str, Any] = {
            "recipient_count": len(customer_ids),
            "batch_count": batches,
            "template_id": self.template_id,
            "template_name": "OPT_Promo",
            "promo_codes": ("WEEKEND20",),
            **header,
        }
        events: list[InputEvent] = [scheduled(ref, **fields)]
        for index in range(batches):
            events.append(recipients(ref, index, customer_ids[index * size : (index + 1) * size]))
        return events

    async def state(self, ref: CampaignRef) -> CampaignState | None:
        snapshot = await self.store.load(ref.key)
        return None if snapshot is None else snapshot.state

    async def wait_for_state(
        self, ref: CampaignRef, *states: CampaignState, timeout_s: float = 90.0
    ) -> None:
        async def reached() -> bool:
            return await self.state(ref) in states

        reached.__name__ = f"{ref.key} reaches {[s.value for s in states]}"
        await eventually(reached, timeout_s=timeout_s, interval_s=0.2)

    def statuses(self, expected: int) -> list[dict[str, Any]]:
        """Status events on the status topic (decoded), waiting for at least `expected`."""
        records = consume(self.bootstrap, self.topics.status, expected=expected, timeout_s=30)
        return [REGISTRY.decode(r.value()).fields for r in records]


@pytest.fixture
async def stack(
    request: pytest.FixtureRequest,
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    redis_url: str,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    # A test module may set INPUT_PARTITIONS (the replica tests want 6).
    partitions = getattr(request.module, "INPUT_PARTITIONS", 3)
    topics = DaemonTopics(
        input=new_topic("input", partitions=partitions),
        status=new_topic("status", partitions=3),
        metrics=new_topic("metrics", partitions=3),
        templates=new_topic("templates", config={"cleanup.policy": "compact"}),
        dlq=new_topic("dlq"),
        outcomes=new_topic("outcomes", partitions=3),
    )
    group_id = await sandbox.admin.generate_contacts(
        "Optimove customers", MASTER_CONTACTS, first_number=FIRST_NUMBER
    )
    await sandbox.admin.seed_contacts(group_id, None, INVALID_CONTACTS)
    (template_id,) = await sandbox.admin.seed_templates(
        [{"title": "OPT_Promo", "body": PROMO_BODY}]
    )
    env = daemon_environment(
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        key_prefix=key_prefix,
        topics=topics,
        sandbox=sandbox,
        group_id=group_id,
        http_port=free_port(),
    )
    store = CampaignStore(redis_client, RedisKeys(prefix=key_prefix), REGISTRY)
    world = Stack(kafka_bootstrap, topics, store, sandbox, template_id, env, tmp_path, [])
    yield world
    for daemon in world.daemons:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)


def customer_ids(first: int, count: int) -> list[str]:
    return [f"C{i:07d}" for i in range(first, first + count)]


async def assert_one_message_per_recipient(stack: Stack, expected_numbers: int) -> None:
    messages = await stack.sandbox.admin.messages()
    per_number = Counter(m.number for m in messages)
    assert len(per_number) == expected_numbers
    assert max(per_number.values()) == 1, "a recipient got more than one SMS"


def assert_statuses_consistent(statuses: list[dict[str, Any]], ref: CampaignRef) -> list[str]:
    """Each status appears with one event id only (re-emissions are exact duplicates)."""
    ids_by_status: dict[str, set[str]] = defaultdict(set)
    order = []
    for fields in statuses:
        if (fields["tenant_id"], fields["campaign_id"], fields["channel_id"]) != (
            ref.tenant_id,
            ref.campaign_id,
            ref.channel_id,
        ):
            continue
        ids_by_status[fields["status"]].add(fields["event_id"])
        if fields["status"] not in order:
            order.append(fields["status"])
    assert all(len(ids) == 1 for ids in ids_by_status.values()), ids_by_status
    return order
