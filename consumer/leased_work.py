"""Work on the due members of a Redis queue, each under its own lease, a few at a time.

The executor (campaigns in the work queue) and the poller (campaigns in the poll queue) both:

- claim due members atomically, each under a lease whose token is new at every claim
  (`CampaignStore.claim_due`: SET NX PX, and the member pushed back by the lease time so a crashed
  holder's work falls due again). A member this process already has in hand is never claimed, so
  never started, a second time here; and a handler whose lease expired under it cannot pass the
  fence of the next claim, whose token differs;
- run a handler per claimed member, at most `concurrency` at once, renewing its lease every
  third of its time to live with the claim's own token (a renewal that finds the lease gone sets
  `Lease.lost`, and every write the handler makes is fenced by that token anyway);
- catch every handler failure here, in one place: transient ones (an outage) are logged and the
  member falls due again after its lease; an unexpected error is logged with the member and the
  error class, counted, and after `max_failures` in a row the role's `give_up` ends the member
  (a campaign: FAILED INTERNAL_ERROR) instead of trying forever. No handler's exception is ever
  left unretrieved;
- on stop, let handlers finish for up to the drain time, then cancel them and hand their members
  back (due now, so another replica takes them at once instead of after the lease).

The outbox publisher and the receipt drain are each one stream worked by one replica at a time:
`SingleHolder` is their loop, written once. Each turn it claims the role's lease (a token new at
every claim) or renews the one it holds; while holding it works everything pending under
`renewing`, then waits for more (the role's blocking read); not holding, it pauses half a TTL
and tries again. A renewal that finds the lease gone ends the holding, and the next turn claims
anew. Transient errors (an outage) are logged through `FailureStreak` and waited out; every
other error is caught here, logged with its class and counted (`handler_failures{role}`), and
after `max_failures` in a row the role's `give_up_head` ends the entry at the head of its stream
(counted `handler_gave_up{role}`), so one bad entry cannot stop the rest. The heartbeat
`loop_last_iteration{role}` is set each turn, `leases_held{role}` says whether this replica
holds the lease, and the lease is released on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from consumer.clock import Clock, pause
from consumer.dependencies import FailureStreak
from consumer.errors import TransientError
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.store import CampaignStore

log = logging.getLogger("consumer.leases")

DEFAULT_MAX_FAILURES = 5


class LeaseLost(Exception):
    """This replica no longer holds the member's lease: stop working on it at once."""


@dataclass
class Lease:
    """A claimed member's lease: its Redis key, this claim's token, and whether it was lost."""

    key: str
    token: str
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(self.key)


async def keep_lease(store: CampaignStore, lease: Lease, ttl_ms: int) -> None:
    """Renew `lease` every third of its time to live, with its own token, until cancelled.

    The one renewal loop of every lease holder (leased work, the outbox, the daily jobs). A
    renewal that finds the lease gone sets `lease.lost` and stops; a Redis error is retried at
    the next turn (the lease outlives two missed renewals).
    """
    while True:
        await asyncio.sleep(ttl_ms / 3000)
        try:
            held = await store.renew_lease(lease.key, lease.token, ttl_ms)
        except TransientError as exc:
            # DEBUG: an outage is reported once, by consumer.dependencies.
            log_event(log, "lease.renewal_failed", logging.DEBUG, lease=lease.key, error=str(exc))
            continue
        if not held:
            log_event(log, "lease.lost", logging.WARNING, lease=lease.key)
            lease.lost.set()
            return


@contextlib.asynccontextmanager
async def renewing(store: CampaignStore, lease: Lease, ttl_ms: int) -> AsyncIterator[Lease]:
    """Hold `lease` renewed for the block (`keep_lease`)."""
    renewal = asyncio.create_task(keep_lease(store, lease, ttl_ms))
    try:
        yield lease
    finally:
        renewal.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewal


@contextlib.asynccontextmanager
async def holding(
    store: CampaignStore, lease_key: str, token: str, ttl_ms: int
) -> AsyncIterator[Lease | None]:
    """Claim a lease for the block, renewed meanwhile (`keep_lease`) and released after.

    Yields None when another holder has it. `token` must be new at this claim.
    """
    if not await store.acquire_lease(lease_key, token, ttl_ms):
        yield None
        return
    lease = Lease(lease_key, token)
    try:
        async with renewing(store, lease, ttl_ms):
            yield lease
    finally:
        with contextlib.suppress(TransientError):
            await store.release_lease(lease_key, token)


Handler = Callable[[str, Lease], Awaitable[None]]
# Ends a member whose handler failed `max_failures` times in a row (the last error given).
GiveUp = Callable[[str, Lease, Exception], Awaitable[None]]


class LeasedWorkers:
    """Claims due members of one queue and runs `handle(member, lease)` for each."""

    def __init__(
        self,
        store: CampaignStore,
        *,
        queue: str,
        lease_prefix: str,
        handle: Handler,
        give_up: GiveUp,
        kind: str,
        concurrency: int,
        lease_ttl: timedelta,
        clock: Clock,
        metrics: Metrics,
        owner: str,
        max_failures: int = DEFAULT_MAX_FAILURES,
    ) -> None:
        self._store = store
        self._queue = queue
        self._lease_prefix = lease_prefix
        self._handle = handle
        self._give_up = give_up
        self._kind = kind
        self._concurrency = concurrency
        self._lease_ttl_ms = int(lease_ttl.total_seconds() * 1000)
        self._clock = clock
        self._metrics = metrics
        self._owner = owner
        self._max_failures = max_failures
        self._running: dict[str, asyncio.Task[None]] = {}
        self._started: dict[str, datetime] = {}
        # At 0 from the start, so the first failure is an increase (see consumer.metrics).
        metrics.handler_failures.labels(kind)
        metrics.handler_gave_up.labels(kind)
        metrics.work_oldest_running.labels(kind).set_function(self._oldest_running_s)

    @property
    def running(self) -> int:
        return len(self._running)

    def oldest_running_since(self) -> datetime | None:
        """When the longest-running member in hand was claimed (for the liveness check)."""
        return min(self._started.values(), default=None)

    def _oldest_running_s(self) -> float:
        since = self.oldest_running_since()
        return 0.0 if since is None else max(0.0, (self._clock.now() - since).total_seconds())

    async def claim_and_start(self) -> int:
        """Claim as many due members as there are free slots and start their handlers."""
        free = self._concurrency - len(self._running)
        if free <= 0:
            return 0
        claims = await self._store.claim_due(
            self._queue,
            self._lease_prefix,
            self._clock.now(),
            free,
            f"{self._owner}:{uuid.uuid4().hex[:12]}",
            self._lease_ttl_ms,
            in_hand=list(self._running),
        )
        for member, token in claims:
            lease = Lease(key=self._lease_prefix + member, token=token)
            task = asyncio.create_task(self._run(member, lease), name=f"{self._kind} {member}")
            self._running[member] = task
            self._started[member] = self._clock.now()
            task.add_done_callback(self._forget)
        self._metrics.leases_held.labels(self._kind).set(len(self._running))
        return len(claims)

    @property
    def full(self) -> bool:
        """Every slot has a member in hand: claiming now would claim nothing."""
        return len(self._running) >= self._concurrency

    async def wait_for_one(self, timeout_s: float | None = None) -> None:
        """Until any running handler finishes, or `timeout_s` passes (at once when none runs)."""
        if self._running:
            await asyncio.wait(
                list(self._running.values()), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )

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

    async def _run(self, member: str, lease: Lease) -> None:
        renewal = asyncio.create_task(keep_lease(self._store, lease, self._lease_ttl_ms))
        try:
            await self._handle(member, lease)
        except asyncio.CancelledError:
            with contextlib.suppress(TransientError):
                await self._store.hand_back(self._queue, member, self._clock.now())
            raise
        except LeaseLost as exc:
            log_event(
                log,
                "work.lease_lost",
                logging.WARNING,
                role=self._kind,
                member=member,
                why=str(exc),
            )
        except TransientError as exc:
            # An outage: the claim's requeue time makes the member due again after the lease.
            log_event(
                log,
                "work.handler_interrupted",
                logging.WARNING,
                role=self._kind,
                member=member,
                error=str(exc),
            )
        except Exception as exc:  # noqa: BLE001 - every other failure is handled here, once
            await self._failed(member, lease, exc)
        else:
            with contextlib.suppress(TransientError):
                await self._store.clear_handler_failures(self._kind, member)
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            with contextlib.suppress(TransientError):
                await self._store.release_lease(lease.key, lease.token)

    async def _failed(self, member: str, lease: Lease, error: Exception) -> None:
        self._metrics.handler_failures.labels(self._kind).inc()
        try:
            failures = await self._store.count_handler_failure(self._kind, member)
        except TransientError:
            failures = 0  # not counted: Redis is away, and the member waits for it anyway
        log_event(
            log,
            "work.handler_failed",
            logging.ERROR,
            role=self._kind,
            member=member,
            error_class=type(error).__name__,
            error=str(error)[:500],
            failures=failures,
            max_failures=self._max_failures,
            traceback="".join(traceback.format_exception(error))[-4000:],
        )
        if failures < self._max_failures:
            return
        try:
            lease.check()
            await self._give_up(member, lease, error)
            await self._store.clear_handler_failures(self._kind, member)
        except (TransientError, LeaseLost) as exc:
            log_event(
                log,
                "work.give_up_not_recorded",
                logging.WARNING,
                role=self._kind,
                member=member,
                error=str(exc),
            )
            return
        except Exception as exc:  # noqa: BLE001 - giving up must not fail like the handler
            log_event(
                log,
                "work.give_up_failed",
                logging.ERROR,
                role=self._kind,
                member=member,
                error_class=type(exc).__name__,
                error=str(exc)[:500],
            )
            return
        self._metrics.handler_gave_up.labels(self._kind).inc()

    def _forget(self, task: asyncio.Task[None]) -> None:
        for member, running in list(self._running.items()):
            if running is task:
                del self._running[member]
                self._started.pop(member, None)
        self._metrics.leases_held.labels(self._kind).set(len(self._running))


@dataclass(frozen=True)
class HolderLog:
    """Where and under which event names a `SingleHolder` logs, for its role.

    `retrying`: a transient error (first of a streak at WARNING, see `FailureStreak`);
    `failed`: an unexpected error (ERROR, with its class, and its text if `with_error_text`);
    `gave_up`: the head entry given up (ERROR, with its id); `give_up_failed`: giving up could
    not be recorded (WARNING; tried again after the next failure).
    """

    logger: logging.Logger
    retrying: str
    failed: str
    gave_up: str
    give_up_failed: str
    with_error_text: bool = True


# Works everything pending while the lease is held; returns how many entries it handled.
WorkPending = Callable[[], Awaitable[int]]
# Waits (a bounded blocking read) until more work may be pending.
WaitForMore = Callable[[], Awaitable[None]]
# Ends the entry at the head of the role's stream after repeated failures (the last error
# given); returns its id, or None when the stream is empty. A TransientError: not recorded.
GiveUpHead = Callable[[Exception], Awaitable[str | None]]


class SingleHolder:
    """Runs one role's work on one replica at a time, under the role's named lease."""

    def __init__(
        self,
        store: CampaignStore,
        *,
        role: str,
        lease_key: str,
        work: WorkPending,
        wait_for_more: WaitForMore,
        give_up_head: GiveUpHead,
        events: HolderLog,
        metrics: Metrics,
        clock: Clock,
        owner: str,
        lease_ttl_ms: int,
        max_failures: int = DEFAULT_MAX_FAILURES,
        retry_after_s: float = 1.0,
    ) -> None:
        self._store = store
        self._role = role
        self._lease_key = lease_key
        self._work = work
        self._wait_for_more = wait_for_more
        self._give_up_head = give_up_head
        self._events = events
        self._metrics = metrics
        self._clock = clock
        self._owner = owner
        self._lease_ttl_ms = lease_ttl_ms
        self._max_failures = max_failures
        self._retry_after_s = retry_after_s  # the pause after a failed turn
        self._holding = False
        self._token = ""
        self._failures = 0  # unexpected errors in a row
        self._streak = FailureStreak(events.logger, events.retrying)
        # At 0 from the start, so the first one is an increase (see consumer.metrics).
        metrics.handler_failures.labels(role)
        metrics.handler_gave_up.labels(role)

    @property
    def holding(self) -> bool:
        """Whether this replica held the lease at the last claim or renewal."""
        return self._holding

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                done = await self._work_while_held()
                if done == 0:
                    if self._holding:
                        await self._wait_for_more()
                    else:
                        await pause(stopping, self._lease_ttl_ms / 2000)
            except TransientError as exc:
                self._streak.failed(error=str(exc))
                await pause(stopping, self._retry_after_s)
            except Exception as exc:  # noqa: BLE001 - one place for every other failure
                await self._failed(exc)
                await pause(stopping, self._retry_after_s)
            else:
                self._streak.succeeded()
                self._failures = 0
            # An outage waited out is not a stalled loop: the heartbeat goes on either way.
            self._metrics.loop_last_iteration.labels(self._role).set(self._clock.now().timestamp())
        with contextlib.suppress(TransientError):
            await self.release()

    async def claim(self) -> bool:
        """Renew the lease if held, else claim it with a new token; True while this holds it."""
        if self._holding:
            self._holding = await self._store.renew_lease(
                self._lease_key, self._token, self._lease_ttl_ms
            )
        else:
            self._token = f"{self._owner}:{uuid.uuid4().hex[:12]}"  # new at every claim
            self._holding = await self._store.acquire_lease(
                self._lease_key, self._token, self._lease_ttl_ms
            )
        self._metrics.leases_held.labels(self._role).set(1 if self._holding else 0)
        return self._holding

    async def once(self) -> int | None:
        """Work what is pending now, under the lease and renewing it, then free it (one-shot
        commands); None when another holder has the lease and will do the work itself."""
        if not await self.claim():
            return None
        try:
            return await self._work_held()
        finally:
            await self.release()

    async def release(self) -> None:
        """Free the lease if this replica holds it (another replica may claim it at once)."""
        if self._holding:
            self._holding = False
            self._metrics.leases_held.labels(self._role).set(0)
            await self._store.release_lease(self._lease_key, self._token)

    async def _work_while_held(self) -> int:
        """Work what is pending while holding the lease, renewing it meanwhile."""
        if not await self.claim():
            return 0
        return await self._work_held()

    async def _work_held(self) -> int:
        lease = Lease(self._lease_key, self._token)
        async with renewing(self._store, lease, self._lease_ttl_ms):
            done = await self._work()
        if lease.lost.is_set():
            self._holding = False
        return done

    async def _failed(self, error: Exception) -> None:
        self._failures += 1
        self._metrics.handler_failures.labels(self._role).inc()
        events = self._events
        text = {"error": str(error)[:500]} if events.with_error_text else {}
        log_event(
            events.logger,
            events.failed,
            logging.ERROR,
            error_class=type(error).__name__,
            **text,
            failures=self._failures,
            max_failures=self._max_failures,
        )
        if self._failures < self._max_failures:
            return
        try:
            head = await self._give_up_head(error)
        except TransientError as exc:
            log_event(events.logger, events.give_up_failed, logging.WARNING, error=str(exc))
            return
        if head is not None:
            self._metrics.handler_gave_up.labels(self._role).inc()
            log_event(events.logger, events.gave_up, logging.ERROR, entry_id=head)
        self._failures = 0
