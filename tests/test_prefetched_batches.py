"""consumer.contact_index.prefetched_batches: batches in order, the next one fetched while the
caller works, `check` after each batch, and a lookup in flight cancelled when the caller stops."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from consumer.contact_index import prefetched_batches


async def test_batches_come_in_order_with_the_next_one_already_asked_for() -> None:
    asked: list[int] = []
    events: list[str] = []

    async def fetch(batch: int) -> int:
        asked.append(batch)
        return batch * 10

    async with aclosing(prefetched_batches(fetch, 3, lambda: events.append("check"))) as batches:
        async for value in batches:
            await asyncio.sleep(0)  # the prefetch task runs while the caller works
            events.append(f"work {value} (asked {max(asked)})")
    assert events == [
        "work 0 (asked 1)",
        "check",
        "work 10 (asked 2)",
        "check",
        "work 20 (asked 2)",
        "check",
    ]


async def test_no_batches_fetch_nothing() -> None:
    async def fetch(batch: int) -> int:
        raise AssertionError("nothing to fetch")

    async with aclosing(prefetched_batches(fetch, 0, lambda: None)) as batches:
        assert [value async for value in batches] == []


async def test_a_caller_stopping_early_cancels_the_lookup_in_flight() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def fetch(batch: int) -> int:
        if batch == 0:
            return 0
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return batch

    async def stop_after_the_first() -> None:
        async with aclosing(prefetched_batches(fetch, 2, lambda: None)) as batches:
            async for _ in batches:
                await started.wait()
                raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError, match="lease lost"):
        await stop_after_the_first()
    await asyncio.wait_for(cancelled.wait(), 1)
