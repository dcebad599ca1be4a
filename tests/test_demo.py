"""`make run`'s demo (deploy/local/demo.py) as a newcomer runs it, on the local stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # dev extra, no stubs installed
import pytest

from tests.daemon import free_port
from tests.helpers import eventually
from tests.private_stack import STACK

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "deploy" / "local" / "demo.py"

pytestmark = pytest.mark.integration


def local_stack_bootstrap() -> str:
    """The Kafka address the demo uses: the local stack's (`deploy/local/stack.py`)."""
    return str(STACK.StackLayout.from_env().bootstrap_servers)


def start_demo(output: Path) -> subprocess.Popen[bytes]:
    """The demo on free ports, its output in `output`."""
    env = {**os.environ, "DEMO_SANDBOX_PORT": str(free_port()), "DEMO_HTTP_PORT": str(free_port())}
    with output.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, str(DEMO), "--customers", "50"],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


async def test_the_sample_campaign_is_sent_and_sigterm_stops_everything_the_demo_started(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The demo prints its campaign's statuses up to SENT; SIGTERM then stops the daemon and
    the sandbox it started, as Ctrl-C does, not just the demo itself (SIGHUP, a closed
    terminal, takes the same handler). One test, not one per signal: demos share their topics
    and Redis prefix, so two side by side would take each other's campaigns."""
    if local_stack_bootstrap() != kafka_bootstrap:
        pytest.skip("the demo runs on the local stack; these tests use other services")
    output = tmp_path / "demo.out"
    demo = start_demo(output)
    started: list[psutil.Process] = []
    try:

        async def sent() -> bool:
            assert demo.poll() is None, output.read_text()
            return "status SENT" in output.read_text()

        await eventually(sent, timeout_s=120, interval_s=0.5)
        started += psutil.Process(demo.pid).children(recursive=True)
        assert len(started) >= 2, "the demo runs a sandbox and a daemon"
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(90) == 0
        text = output.read_text()
        assert "daemon stopped (exit 0)" in text, text
        assert "sandbox stopped" in text, text
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, f"left running: {[p.pid for p in alive]}"
    finally:  # a test that failed leaves nothing running either
        if demo.poll() is None:
            started += psutil.Process(demo.pid).children(recursive=True)
            demo.kill()
            demo.wait()
        for process in started:
            if process.is_running():
                process.kill()
