"""Chunks loaded while resolution goes on: the pipeline of both load steps, and of personal
texts sent as they are cut.

Resolution hands each chunk over as it is cut; a few loaders take them off a bounded queue and
load them (`create_contacts_bulk`, then the chunk recorded loaded; or, for a stream of personal
texts, `bulk_json`, the chunk recorded pending before and sent after).

Nothing here relies on cancelling a task. A loader that fails keeps its error; the loaders
under way finish their call and record it (a cancelled call would be an outcome unknown, its
chunk loaded again on the retry); the loaders go on taking chunks off the queue without
loading them, so resolution never waits on a queue nobody empties; and the next hand-over
raises the failure, so resolution stops at its next chunk. An earlier version ran the loaders
in a task group, whose first failure cancels resolution and the other loaders; in CI
(2026-12-02) a load step then never ended, most likely resolution waiting on the full queue of
cancelled loaders with its own cancellation lost (see docs/DECISIONS.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

ChunkT = TypeVar("ChunkT")
ResultT = TypeVar("ResultT")

HandOver = Callable[[ChunkT], Awaitable[None]]


async def load_while_resolving(
    resolve: Callable[[HandOver[ChunkT]], Awaitable[ResultT]],
    load: Callable[[ChunkT], Awaitable[None]],
    loaders: int,
) -> ResultT:
    """`resolve(hand_over)`'s result, once every chunk it handed over is loaded by one of
    `loaders` concurrent `load`s. The first error (a load's, else resolution's) is raised after
    the loads under way have finished. Cancelled, the loads under way are cancelled too."""
    queue: asyncio.Queue[ChunkT | None] = asyncio.Queue(maxsize=loaders)
    failures: list[Exception] = []

    async def hand_over(chunk: ChunkT) -> None:
        if failures:
            raise failures[0]
        await queue.put(chunk)

    async def loader() -> None:
        while (chunk := await queue.get()) is not None:
            if failures:
                continue  # nothing new starts after a failure; the queue is still emptied
            try:
                await load(chunk)
            except Exception as exc:  # noqa: BLE001 - raised below, once the others finish
                failures.append(exc)

    tasks = [asyncio.ensure_future(loader()) for _ in range(loaders)]
    result: ResultT | None = None
    try:
        try:
            result = await resolve(hand_over)
        except Exception as exc:  # noqa: BLE001 - raised below, once the loads under way finish
            failures.append(exc)  # after a loader's own, if one failed first
        for _ in tasks:
            await queue.put(None)
        await asyncio.gather(*tasks)
    except BaseException:  # cancelled (a shutdown's drain ran out): the loads stop too
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if failures:
        raise failures[0]
    return cast(ResultT, result)
