"""One running sandbox's moving parts, shared by its API and admin routes."""

from __future__ import annotations

import time
from collections import Counter, deque

from aiohttp import web

from textlocal_sandbox.clock import ManualClock
from textlocal_sandbox.config import SandboxConfig
from textlocal_sandbox.demo import seed_demo
from textlocal_sandbox.faults import FaultPlan
from textlocal_sandbox.receipts import ReceiptDispatcher
from textlocal_sandbox.state import SandboxState

# The call log keeps the latest requests only, so a long-running sandbox stays small.
CALL_LOG_LIMIT = 100_000


class SandboxRuntime:
    """The account state plus what the simulation needs around it: clock, faults, counters."""

    def __init__(self, api_key: str, clock: ManualClock, config: SandboxConfig) -> None:
        self.api_key = api_key
        self.clock = clock
        self.config = config
        self.state = SandboxState(config)
        self.faults = FaultPlan()
        self.call_counts: Counter[str] = Counter()
        # (real Unix time of arrival, command) per request, in arrival order.
        self.call_log: deque[tuple[float, str]] = deque(maxlen=CALL_LOG_LIMIT)
        self.receipts = ReceiptDispatcher(config.receipt_concurrency, config.receipt_timeout_s)
        self._seed()

    def now_s(self) -> float:
        return self.clock.now().timestamp()

    def count_call(self, command: str) -> None:
        """Record one API request: per-command counter and the timed call log."""
        self.call_counts[command] += 1
        # Real time, not the sandbox clock (which tests move by days): the log is for measuring
        # how fast clients call, e.g. that a rate limit holds.
        self.call_log.append((time.time(), command))

    def clear_calls(self) -> None:
        self.call_counts.clear()
        self.call_log.clear()

    def reset(self) -> None:
        """Fresh account (demo data again if configured), no faults, counters at zero.

        The clock is left where it is: tests that moved it keep their notion of "now".
        """
        self.state.reset()
        self.faults = FaultPlan()
        self.clear_calls()
        self.receipts.reset()
        self._seed()

    async def dispatch_receipts(self) -> tuple[int, int]:
        return await self.receipts.dispatch(self.state, self.config.delivery, self.now_s())

    def _seed(self) -> None:
        if self.config.seed_demo:
            seed_demo(self.state, self.now_s())


RUNTIME = web.AppKey("sandbox_runtime", SandboxRuntime)
