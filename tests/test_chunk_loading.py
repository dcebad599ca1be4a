"""consumer.chunk_loading.load_while_resolving: every chunk handed over is loaded, at most
`loaders` at a time; a failure stops new loads without cancelling those under way; and no
failure, however resolution reacts to it, leaves resolution waiting on a queue nobody empties."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from consumer.chunk_loading import HandOver, load_while_resolving


class LoadFailed(Exception):
    pass


class Loads:
    """A `load` that records what it loaded and how many loads were under way at most."""

    def __init__(self, fail_on: int | None = None, hold: asyncio.Event | None = None) -> None:
        self.started: list[int] = []
        self.finished: list[int] = []
        self.under_way = 0
        self.most_under_way = 0
        self._fail_on = fail_on
        self._hold = hold
        self._changed = asyncio.Condition()

    async def until_under_way(self, loads: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.under_way >= loads)

    async def __call__(self, chunk: int) -> None:
        self.started.append(chunk)
        self.under_way += 1
        self.most_under_way = max(self.most_under_way, self.under_way)
        async with self._changed:
            self._changed.notify_all()
        try:
            if chunk == self._fail_on:
                raise LoadFailed(f"chunk {chunk}")
            if self._hold is not None:
                await self._hold.wait()
            await asyncio.sleep(0)
            self.finished.append(chunk)
        finally:
            self.under_way -= 1


def handing_over(chunks: int) -> Callable[[HandOver[int]], Awaitable[str]]:
    async def resolve(hand_over: HandOver[int]) -> str:
        for chunk in range(chunks):
            await hand_over(chunk)
        return "resolved"

    return resolve


async def test_every_chunk_is_loaded_at_most_loaders_at_a_time() -> None:
    loads = Loads()
    result = await load_while_resolving(handing_over(50), loads, loaders=3)
    assert result == "resolved"
    assert sorted(loads.finished) == list(range(50))
    assert loads.most_under_way == 3


async def test_a_failed_load_stops_new_loads_lets_those_under_way_finish_and_is_raised() -> None:
    hold = asyncio.Event()
    loads = Loads(fail_on=2, hold=hold)
    handed: list[int] = []

    async def resolve(hand_over: HandOver[int]) -> str:
        for chunk in range(100):
            if chunk == 3:
                await asyncio.sleep(0)  # chunk 2's load fails; chunks 0 and 1 are held
                hold.set()
            await hand_over(chunk)
            handed.append(chunk)
        return "resolved"

    with pytest.raises(LoadFailed, match="chunk 2"):
        await load_while_resolving(resolve, loads, loaders=3)
    assert loads.finished[:2] == [0, 1]  # under way at the failure: finished, not cancelled
    assert handed == [0, 1, 2]  # the next hand-over raised the failure
    assert set(loads.started) == {0, 1, 2}


async def test_resolution_that_ignores_the_failure_still_ends() -> None:
    """The hang of CI 2026-12-02: resolution went on after a loader failed (its cancellation
    lost) and waited for ever on a full queue. Here it swallows every hand-over's error."""
    loads = Loads(fail_on=0)
    refused = 0

    async def resolve(hand_over: HandOver[int]) -> str:
        nonlocal refused
        for chunk in range(200):
            try:
                await hand_over(chunk)
            except LoadFailed:
                refused += 1
        return "resolved"

    async with asyncio.timeout(10):
        with pytest.raises(LoadFailed, match="chunk 0"):
            await load_while_resolving(resolve, loads, loaders=2)
    assert refused > 0
    assert 0 in loads.started
    assert set(loads.started) <= {0, 1}  # nothing started after the failure


async def test_a_failed_resolution_is_raised_once_the_loads_under_way_have_finished() -> None:
    loads = Loads()

    async def resolve(hand_over: HandOver[int]) -> str:
        for chunk in range(5):
            await hand_over(chunk)
        raise RuntimeError("Redis went away")

    with pytest.raises(RuntimeError, match="Redis went away"):
        await load_while_resolving(resolve, loads, loaders=2)
    assert loads.started
    assert sorted(loads.finished) == sorted(loads.started)  # none cancelled half-way


async def test_cancelled_it_cancels_the_loads_under_way() -> None:
    hold = asyncio.Event()  # never set: the loads wait until cancelled
    loads = Loads(hold=hold)
    task = asyncio.ensure_future(load_while_resolving(handing_over(2), loads, loaders=2))
    async with asyncio.timeout(10):
        await loads.until_under_way(2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert loads.under_way == 0
    assert loads.finished == []
