"""One running sandbox's moving parts, shared by its API and admin routes."""

from __future__ import annotations

from collections import Counter

from aiohttp import web

from consumer.clock import ManualClock
from consumer.sandbox.config import SandboxConfig
from consumer.sandbox.demo import seed_demo
from consumer.sandbox.faults import FaultPlan
from consumer.sandbox.receipts import ReceiptDispatcher
from consumer.sandbox.state import SandboxState


class SandboxRuntime:
    """The account state plus what the simulation needs around it: clock, faults, counters."""

    def __init__(self, api_key: str, clock: ManualClock, config: SandboxConfig) -> None:
        self.api_key = api_key
        self.clock = clock
        self.config = config
        self.state = SandboxState(config)
        self.faults = FaultPlan()
        self.call_counts: Counter[str] = Counter()
        self.receipts = ReceiptDispatcher(config.receipt_concurrency, config.receipt_timeout_s)
        self._seed()

    def now_s(self) -> float:
        return self.clock.now().timestamp()

    def reset(self) -> None:
        """Fresh account (demo data again if configured), no faults, counters at zero.

        The clock is left where it is: tests that moved it keep their notion of "now".
        """
        self.state.reset()
        self.faults = FaultPlan()
        self.call_counts.clear()
        self.receipts.reset()
        self._seed()

    async def dispatch_receipts(self) -> tuple[int, int]:
        return await self.receipts.dispatch(self.state, self.config.delivery, self.now_s())

    def _seed(self) -> None:
        if self.config.seed_demo:
            seed_demo(self.state, self.now_s())


RUNTIME = web.AppKey("sandbox_runtime", SandboxRuntime)
