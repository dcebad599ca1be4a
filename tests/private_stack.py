"""A Kafka broker and a Redis server of one test's own, to kill and restart (fault tests).

The shared session services must never be disturbed (other tests use them), so a test that
SIGKILLs a dependency gets its own, started by the same code as the local stack
(`deploy/local/stack.py`) on free ports under the test's temporary folder, and stopped at the end.
Only processes started here are ever signalled, by the pids this module wrote down.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.daemon import free_port

REPO = Path(__file__).resolve().parents[1]


def _stack_module() -> ModuleType:
    path = REPO / "deploy" / "local" / "stack.py"
    spec = importlib.util.spec_from_file_location("local_stack", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("local_stack", module)
    spec.loader.exec_module(module)
    return module


STACK = _stack_module()


class PrivateStack:
    """One test's Redis (and, when asked for, Kafka), started and stopped by this test."""

    def __init__(self, data_dir: Path) -> None:
        self.layout = STACK.StackLayout(
            data_dir=data_dir,
            jars_dir=STACK.StackLayout.from_env().jars_dir,
            kafka_port=free_port(),
            controller_port=free_port(),
            redis_port=free_port(),
        )

    @property
    def redis_url(self) -> str:
        return str(self.layout.redis_url)

    @property
    def bootstrap(self) -> str:
        return str(self.layout.bootstrap_servers)

    def start_redis(self) -> None:
        self._run(STACK.start_redis)

    def start_kafka(self) -> None:
        self._run(STACK.start_kafka)

    def signal_redis(self, signum: signal.Signals) -> None:
        self._signal(self.layout.redis_dir / "redis.pid", signum)

    def kill_redis(self) -> None:
        self._kill(self.layout.redis_dir / "redis.pid", lambda: self.redis_answers())

    def kill_kafka(self) -> None:
        self._kill(
            self.layout.kafka_dir / "kafka.pid", lambda: STACK.port_open(self.layout.kafka_port)
        )

    def redis_answers(self) -> bool:
        return bool(STACK.redis_answers(self.layout.redis_port))

    def stop(self) -> None:
        for pid_file in (self.layout.kafka_dir / "kafka.pid", self.layout.redis_dir / "redis.pid"):
            pid = STACK.read_pid(pid_file)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                pid_file.unlink(missing_ok=True)

    def _run(self, start: object) -> None:
        try:
            start(self.layout)  # type: ignore[operator]
        except SystemExit as exc:  # stack.py reports a failed start this way
            from tests.conftest import service_unavailable

            service_unavailable(f"private stack: {exc}")

    def _signal(self, pid_file: Path, signum: signal.Signals) -> None:
        pid = STACK.read_pid(pid_file)
        assert pid is not None, f"no process recorded in {pid_file}"
        os.kill(pid, signum)

    def _kill(self, pid_file: Path, still_there: object) -> None:
        pid = STACK.read_pid(pid_file)
        self._signal(pid_file, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # Kafka is our child: reap it, or it stays a zombie
            if STACK.read_pid(pid_file) is None and not still_there():  # type: ignore[operator]
                break
            assert time.monotonic() < deadline, f"{pid_file.parent.name} did not die"
            time.sleep(0.1)
        pid_file.unlink(missing_ok=True)


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[PrivateStack]:
    stack = PrivateStack(tmp_path / "private-stack")
    try:
        yield stack
    finally:
        stack.stop()
