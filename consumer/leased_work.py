"""Work on the due members of a Redis queue, each under its own lease, a few at a time.

The executor (campaigns in the work queue) and the poller (campaigns in the poll queue) both:

- claim due members atomically, each under a lease (`CampaignStore.claim_due`: SET NX PX, and
  the member pushed back by the lease time so a crashed holder's work falls due again);
- run a handler per claimed member, at most `concurrency` at once, renewing its lease every
  third of its time to live (a renewal that finds the lease gone sets `Lease.lost`, and every
  write the handler makes is fenced by the lease token anyway);
- on stop, let handlers finish for up to the drain time, then cancel them and hand their members
  back (due now, so another replica takes them at once instead of after the lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from consumer.clock import Clock, to_millis
from consumer.errors import TransientError
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.store import CampaignStore, redis_errors

log = logging.getLogger("consumer.leases")


class LeaseLost(Exception):
    """This replica no longer holds the member's lease: stop working on it at once."""


@dataclass
class Lease:
    """A claimed member's lease: its Redis key, this replica's token, and whether it was lost."""

    key: str
    token: str
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(self.key)


Handler = Callable[[str, Lease], Awaitable[None]]


class LeasedWorkers:
    """Claims due members of one queue and runs `handle(member, lease)` for each."""

    def __init__(
        self,
        store: CampaignStore,
        *,
        queue: str,
        lease_prefix: str,
        handle: Handler,
        kind: str,
        concurrency: int,
        lease_ttl: timedelta,
        clock: Clock,
        metrics: Metrics,
        owner: str,
    ) -> None:
        self._store = store
        self._queue = queue
        self._lease_prefix = lease_prefix
        self._handle = handle
        self._kind = kind
        self._concurrency = concurrency
        self._lease_ttl_ms = int(lease_ttl.total_seconds() * 1000)
        self._clock = clock
        self._metrics = metrics
        self._owner = owner
        self._running: dict[str, asyncio.Task[None]] = {}
        self._started: dict[str, datetime] = {}

    @property
    def running(self) -> int:
        return len(self._running)

    def oldest_running_since(self) -> datetime | None:
        """When the longest-running member in hand was claimed (for the liveness check)."""
        return min(self._started.values(), default=None)

    async def claim_and_start(self) -> int:
        """Claim as many due members as there are free slots and start their handlers."""
        free = self._concurrency - len(self._running)
        if free <= 0:
            return 0
        members = await self._store.claim_due(
            self._queue,
            self._lease_prefix,
            self._clock.now(),
            free,
            self._owner,
            self._lease_ttl_ms,
        )
        for member in members:
            task = asyncio.create_task(self._run(member), name=f"{self._kind} {member}")
            self._running[member] = task
            self._started[member] = self._clock.now()
            task.add_done_callback(self._forget)
        self._metrics.leases_held.labels(self._kind).set(len(self._running))
        return len(members)

    async def wait_for_one(self) -> None:
        """Until any running handler finishes (returns at once when none runs)."""
        if self._running:
            await asyncio.wait(list(self._running.values()), return_when=asyncio.FIRST_COMPLETED)

    async def drain(self, timeout_s: float) -> int:
        """Let handlers finish for up to `timeout_s`; cancel and hand back the rest (counted)."""
        if not self._running:
            return 0
        _, still_running = await asyncio.wait(list(self._running.values()), timeout=timeout_s)
        for task in still_running:
            task.cancel()
        if still_running:
            await asyncio.wait(still_running)
        return len(still_running)

    async def _run(self, member: str) -> None:
        lease = Lease(key=self._lease_prefix + member, token=self._owner)
        renewal = asyncio.create_task(self._keep(lease))
        try:
            await self._handle(member, lease)
        except asyncio.CancelledError:
            # Stopping: due now for the next owner. XX: a member the handler already removed
            # from the queue (its work finished) stays removed.
            with contextlib.suppress(TransientError), redis_errors("ZADD XX"):
                await self._store.redis.zadd(
                    self._queue, {member: to_millis(self._clock.now())}, xx=True
                )
            raise
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            with contextlib.suppress(TransientError):
                await self._store.release_lease(lease.key, lease.token)

    async def _keep(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(self._lease_ttl_ms / 3000)
            try:
                held = await self._store.renew_lease(lease.key, lease.token, self._lease_ttl_ms)
            except TransientError as exc:
                log_event(
                    log, "lease.renewal_failed", logging.WARNING, lease=lease.key, error=str(exc)
                )
                continue  # try again; the lease outlives two missed renewals
            if not held:
                lease.lost.set()
                return

    def _forget(self, task: asyncio.Task[None]) -> None:
        for member, running in list(self._running.items()):
            if running is task:
                del self._running[member]
                self._started.pop(member, None)
        self._metrics.leases_held.labels(self._kind).set(len(self._running))
