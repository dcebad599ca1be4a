"""Delivery receipts: POSTed to a send's `receipt_url` as its messages settle.

Assumed encoding (not published): one `application/x-www-form-urlencoded` POST per message with
`number`, `status`, `customID` and `datetime` (`Y-m-d H:i:s`, UTC, when it settled). Retries are
not published either: by default one attempt, no retries; `ReceiptMode.retries` retries a POST
answered 5xx or 429 or not answered, after its Retry-After (capped) or a short pause. For
tests, `ReceiptMode` can also post every receipt twice (`duplicate`) and each round's receipts
in reverse order (`reverse`). Receipts carry only D, U, I or ? (as published), so an expired
message reports U.
Messages settle in a hundred delay buckets (see delivery.py), so finding what settled since the
last look is one pass over a send's recipients per newly settled set of buckets, never per tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp

from textlocal_sandbox.delivery import (
    DELAY_BUCKETS,
    EXPIRED,
    INVALID,
    UNDELIVERED,
    DeliveryModel,
)
from textlocal_sandbox.state import SandboxState

_log = logging.getLogger(__name__)
_SLICE = 1_000


# The longest a retry waits for (Retry-After is honoured up to this; none: RETRY_PAUSE_S).
MAX_RETRY_WAIT_S = 5.0
RETRY_PAUSE_S = 0.5


@dataclass(frozen=True)
class ReceiptMode:
    """How receipts are posted: retries after a refusal, and the faults tests ask for."""

    retries: int = 0
    duplicate: bool = False
    reverse: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.retries <= 10:
            raise ValueError("retries must be within 0..10")

    def to_json(self) -> dict[str, object]:
        return {"retries": self.retries, "duplicate": self.duplicate, "reverse": self.reverse}


@dataclass(frozen=True)
class Receipt:
    url: str
    number: int
    status: str
    custom: str
    settled_at_s: float

    def form(self) -> dict[str, str]:
        return {
            "number": str(self.number),
            "status": self.status,
            "customID": self.custom,
            "datetime": datetime.fromtimestamp(self.settled_at_s, UTC).strftime(
                "%Y-%m-%d %H:%M:%S"
            ),
        }


def collect_due(
    state: SandboxState, delivery: DeliveryModel, now_s: float, cursors: dict[int, int]
) -> list[Receipt]:
    """Receipts for messages settled since the last call; `cursors` remembers per batch."""
    due: list[Receipt] = []
    for batch_id in state.receipt_batches:
        send = state.sends.get(batch_id)
        if send is None or send.send_at_s > now_s:
            continue
        fired = cursors.get(batch_id, 0)
        if fired >= DELAY_BUCKETS:
            continue  # every message of this batch has had its receipt
        settled = delivery.settled_buckets(send.send_at_s, now_s)
        if settled <= fired:
            continue
        cursors[batch_id] = settled
        invalid = set(send.invalid_positions)
        for position, number in enumerate(send.recipients):
            bucket = delivery.delay_bucket(number)
            if not fired <= bucket < settled:
                continue
            status = INVALID if position in invalid else delivery.final_status(number)
            due.append(
                Receipt(
                    url=send.receipt_url,
                    number=number,
                    status=UNDELIVERED if status == EXPIRED else status,
                    custom=send.custom,
                    settled_at_s=send.send_at_s + delivery.bucket_delay_s(bucket),
                )
            )
    return due


class ReceiptDispatcher:
    """Finds due receipts and POSTs them, a bounded number at a time."""

    def __init__(self, concurrency: int, timeout_s: float) -> None:
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self.cursors: dict[int, int] = {}
        self.posted = 0
        self.failed = 0
        self.retried = 0
        self.mode = ReceiptMode()

    def reset(self) -> None:
        self.cursors.clear()
        self.posted = 0
        self.failed = 0
        self.retried = 0
        self.mode = ReceiptMode()

    async def dispatch(
        self, state: SandboxState, delivery: DeliveryModel, now_s: float
    ) -> tuple[int, int]:
        """POST every receipt due by `now_s`; returns (posted, failed) for this round."""
        async with self._lock:  # a flush waits for the round in flight, so it sees all of it
            receipts = collect_due(state, delivery, now_s, self.cursors)
            if not receipts:
                return 0, 0
            if self.mode.reverse:
                receipts.reverse()
            if self.mode.duplicate:
                receipts = [r for receipt in receipts for r in (receipt, receipt)]
            return await self._post_all(receipts)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post_all(self, receipts: Sequence[Receipt]) -> tuple[int, int]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        session = self._session
        gate = asyncio.Semaphore(self._concurrency)

        async def post(receipt: Receipt) -> bool:
            async with gate:
                for attempt in range(self.mode.retries + 1):
                    if attempt:
                        self.retried += 1
                    wait_s = RETRY_PAUSE_S
                    try:
                        async with session.post(receipt.url, data=receipt.form()) as response:
                            await response.read()
                            if response.status < 400:
                                return True
                            if response.status != 429 and response.status < 500:
                                return False  # refused for good: not retried
                            wait_s = _retry_after_s(response.headers.get("Retry-After"))
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        _log.info("sandbox.receipt.failed", extra={"error": type(exc).__name__})
                    if attempt < self.mode.retries:
                        await asyncio.sleep(wait_s)
                return False

        posted = 0
        # In slices, so a big batch never holds one coroutine per message at once.
        for start in range(0, len(receipts), _SLICE):
            results = await asyncio.gather(*(post(r) for r in receipts[start : start + _SLICE]))
            posted += sum(results)
        failed = len(receipts) - posted
        self.posted += posted
        self.failed += failed
        return posted, failed


def _retry_after_s(header: str | None) -> float:
    try:
        return min(max(float(header or ""), 0.0), MAX_RETRY_WAIT_S)
    except ValueError:
        return RETRY_PAUSE_S
