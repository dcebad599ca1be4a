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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from consumer.sandbox import SandboxHandle

CONSOLE_SCRIPT = str(Path(sys.executable).parent / "textlocal-consumer")


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
        "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "TEXTLOCAL_CONSUMER_KAFKA_GROUP_ID": f"{topics.input}-daemon",
        "TEXTLOCAL_CONSUMER_KAFKA_INPUT_TOPIC": topics.input,
        "TEXTLOCAL_CONSUMER_KAFKA_STATUS_TOPIC": topics.status,
        "TEXTLOCAL_CONSUMER_KAFKA_METRICS_TOPIC": topics.metrics,
        "TEXTLOCAL_CONSUMER_KAFKA_TEMPLATES_TOPIC": topics.templates,
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
