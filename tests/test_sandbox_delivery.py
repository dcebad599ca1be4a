"""Delivery simulation: statuses start P and settle over the sandbox clock by a deterministic mix;
status_batch, status_message and history follow; receipts are POSTed as messages settle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import pytest_asyncio
from aiohttp import web

from tests.fixtures_sandbox import call, error_code
from textlocal_sandbox import (
    DeliveryMix,
    DeliveryModel,
    SandboxConfig,
    SandboxHandle,
    running_sandbox,
)

# Last two digits pick the outcome (00–89 D, 90–93 U, 94–95 I, 96–97 E, 98–99 ?); the two before
# pick the delay (00 → 60 s … 99 → 120 s with the defaults).
FAST_D = 447700900001  # delay bucket 0: settles at 60 s, delivered
SLOW_D = 447700909901  # delay bucket 99: settles at 120 s, delivered
UNDELIVERED = 447700900090
INVALID = 447700900094
EXPIRED = 447700900096
UNKNOWN = 447700900098
ALL = [FAST_D, SLOW_D, UNDELIVERED, INVALID, EXPIRED, UNKNOWN]


async def send_to(sandbox: SandboxHandle, numbers: list[int], **extra: str) -> int:
    fields = {"numbers": ",".join(map(str, numbers)), "message": "hello", **extra}
    reply = await call(sandbox, "send", fields)
    assert reply["status"] == "success", reply
    return int(reply["batch_id"])


def statuses(reply: dict[str, object]) -> dict[int, str]:
    messages = reply["messages"]
    assert isinstance(messages, list)
    return {m["recipient"]: m["status"] for m in messages}


async def test_status_batch_evolves_with_the_clock(sandbox: SandboxHandle) -> None:
    """All P at first; after the short delay the fast ones settle; after the long one, all do."""
    batch = {"batch_id": str(await send_to(sandbox, ALL))}
    first = await call(sandbox, "status_batch", batch)
    assert set(statuses(first).values()) == {"P"}
    assert first["num_messages"] == 6
    assert first["num_delivered"] == first["num_undelivered"] == 0

    sandbox.clock.advance(timedelta(seconds=61))
    middle = statuses(await call(sandbox, "status_batch", batch))
    assert middle[FAST_D] == "D"
    assert middle[SLOW_D] == "P"

    sandbox.clock.advance(timedelta(seconds=60))
    final = await call(sandbox, "status_batch", batch)
    assert statuses(final) == {
        FAST_D: "D",
        SLOW_D: "D",
        UNDELIVERED: "U",
        INVALID: "I",
        EXPIRED: "E",
        UNKNOWN: "?",
    }
    counts = {k: final[k] for k in final if k.startswith("num_")}
    assert counts == {
        "num_messages": 6,
        "num_delivered": 2,
        "num_undelivered": 1,
        "num_unknown": 1,
        "num_invalid": 1,
        "num_expired": 1,
    }
    assert final["batch_id"] == int(batch["batch_id"])


async def test_configured_mix_and_delay() -> None:
    """A configured mix and settle delay change outcomes and timing deterministically."""
    config = SandboxConfig(
        delivery=DeliveryModel(DeliveryMix(50, 50, 0, 0, 0), settle_delay_s=10, settle_spread=0)
    )
    async with running_sandbox("k", config=config) as sandbox:
        batch = {"batch_id": str(await send_to(sandbox, [447700900049, 447700900050]))}
        sandbox.clock.advance(timedelta(seconds=11))
        result = statuses(await call(sandbox, "status_batch", batch))
        assert result == {447700900049: "D", 447700900050: "U"}


async def test_status_message_and_history_follow_the_clock(sandbox: SandboxHandle) -> None:
    """status_message and get_history_api report the same evolving status per message."""
    reply = await call(sandbox, "send", {"numbers": str(UNDELIVERED), "message": "x"})
    message_id = reply["messages"][0]["id"]
    pending = await call(sandbox, "status_message", {"message_id": message_id})
    assert pending["message"]["status"] == "P"
    assert pending["message"]["recipient"] == UNDELIVERED
    sandbox.clock.advance(timedelta(minutes=5))
    settled = await call(sandbox, "status_message", {"message_id": message_id})
    assert settled["message"]["status"] == "U"
    history = await call(sandbox, "get_history_api")
    assert history["total"] == 1
    assert history["messages"][0]["id"] == message_id
    assert history["messages"][0]["status"] == "U"
    assert error_code(await call(sandbox, "status_message", {"message_id": "1"})) == 902


async def test_unknown_or_missing_batch_fails(sandbox: SandboxHandle) -> None:
    """status_batch of an unknown or missing batch id fails with the documented code 901."""
    assert error_code(await call(sandbox, "status_batch", {"batch_id": "123"})) == 901
    assert error_code(await call(sandbox, "status_batch")) == 901


async def test_history_group_filters_sorts_and_pages(sandbox: SandboxHandle) -> None:
    """get_history_group lists group sends with time window, sort order, start and limit."""
    group_id = await sandbox.admin.seed_contacts(None, "Loyal", [{"number": FAST_D}])
    start_s = sandbox.clock.now().timestamp()
    batches = []
    for text in ("first", "second", "third"):
        reply = await call(sandbox, "send", {"group_id": str(group_id), "message": text})
        batches.append(reply["batch_id"])
        sandbox.clock.advance(timedelta(hours=1))
    await call(sandbox, "send", {"numbers": str(SLOW_D), "message": "not a group send"})
    history = await call(sandbox, "get_history_group")
    assert history["total"] == 3
    assert [m["message"] for m in history["messages"]] == ["third", "second", "first"]
    entry = history["messages"][0]
    assert set(entry) == {
        "batch_id",
        "group_id",
        "group_name",
        "message",
        "datetime",
        "num_credits",
    }
    assert (entry["group_id"], entry["group_name"], entry["num_credits"]) == (group_id, "Loyal", 1)
    asc = await call(
        sandbox, "get_history_group", {"sort_order": "asc", "start": "1", "limit": "1"}
    )
    assert [m["batch_id"] for m in asc["messages"]] == [batches[1]]
    assert (asc["start"], asc["limit"], asc["total"]) == (1, 1, 3)
    window = {"min_time": str(int(start_s) + 1800), "max_time": str(int(start_s) + 5400)}
    assert [
        m["message"] for m in (await call(sandbox, "get_history_group", window))["messages"]
    ] == ["second"]


async def test_history_single_lists_number_sends_only(sandbox: SandboxHandle) -> None:
    """get_history_single has the sends to listed numbers, one entry per message."""
    group_id = await sandbox.admin.seed_contacts(None, "G", [{"number": FAST_D}])
    await call(sandbox, "send", {"group_id": str(group_id), "message": "group"})
    await send_to(sandbox, [SLOW_D, UNKNOWN])
    history = await call(sandbox, "get_history_single", {"limit": "1", "start": "1"})
    assert history["total"] == 2
    (entry,) = history["messages"]
    assert (entry["number"], entry["content"], entry["sender"]) == (UNKNOWN, "hello", "TXTLCL")


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A local HTTP endpoint that records the receipts POSTed to it."""
    received: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        received.append(dict(await request.post()))  # type: ignore[arg-type]
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/receipts", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/receipts", received
    await runner.cleanup()


async def test_receipts_are_posted_as_messages_settle(
    sandbox: SandboxHandle, receiver: tuple[str, list[dict[str, str]]]
) -> None:
    """Each settled message POSTs number, status, customID and datetime once; E reports as U."""
    url, received = receiver
    await send_to(sandbox, [FAST_D, SLOW_D, EXPIRED], receipt_url=url, custom="camp-7")
    # A flush waits for any round the background ticker has in flight, so after it every
    # receipt due by then has arrived, whoever sent it.
    await sandbox.admin.flush_receipts()
    assert received == []
    sandbox.clock.advance(timedelta(seconds=61))
    await sandbox.admin.flush_receipts()
    assert sorted(r["number"] for r in received) == [str(FAST_D), str(EXPIRED)]  # bucket 0
    sandbox.clock.advance(timedelta(seconds=60))
    await sandbox.admin.flush_receipts()
    await sandbox.admin.flush_receipts()
    by_number = {r["number"]: r for r in received}
    assert len(received) == 3
    assert by_number[str(FAST_D)]["status"] == "D"
    assert by_number[str(EXPIRED)]["status"] == "U"
    assert by_number[str(SLOW_D)]["customID"] == "camp-7"
    assert set(by_number[str(SLOW_D)]) == {"number", "status", "customID", "datetime"}
    assert len(by_number[str(SLOW_D)]["datetime"]) == len("2026-01-01 00:00:00")


@pytest.mark.parametrize("count", [10_000])
async def test_large_group_status_is_fast_and_complete(sandbox: SandboxHandle, count: int) -> None:
    """A 10,000-recipient group's report lists every recipient with consistent counts."""
    group_id = await sandbox.admin.generate_contacts("Big", count, first_number=447700000000)
    reply = await call(sandbox, "send", {"group_id": str(group_id), "message": "x"})
    assert len(reply["messages"]) == count
    sandbox.clock.advance(timedelta(days=1))
    report = await call(sandbox, "status_batch", {"batch_id": str(reply["batch_id"])})
    assert len(report["messages"]) == count
    assert report["num_delivered"] == count * 90 // 100
    total = sum(report[k] for k in report if k.startswith("num_") and k != "num_messages")
    assert total == report["num_messages"] == count


async def test_receipt_mode_posts_twice_in_reverse_and_retries_refusals(
    sandbox: SandboxHandle,
) -> None:
    """With the receipt mode set, each receipt is posted twice and a POST answered 503 is
    retried after its Retry-After; a 400 is not retried. (Reverse order is set too; with 16
    POSTs in flight the arrival order is not observable here.)"""
    received: list[dict[str, str]] = []
    answers = iter([503, 400])

    async def record(request: web.Request) -> web.Response:
        status = next(answers, 200)
        if status == 200:
            received.append(dict(await request.post()))  # type: ignore[arg-type]
        return web.Response(status=status, headers={"Retry-After": "0"})

    app = web.Application()
    app.router.add_post("/r", record)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        await sandbox.admin.set_receipt_mode(retries=2, duplicate=True, reverse=True)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/r"
        await send_to(sandbox, [FAST_D, EXPIRED], receipt_url=url, custom="camp-8")
        sandbox.clock.advance(timedelta(seconds=61))
        await sandbox.admin.flush_receipts()
        counts = await sandbox.admin.receipt_counts()
    finally:
        await runner.cleanup()
    # Four POSTs due (two receipts, twice); one is answered 503 then 400 (not retried again).
    assert counts == {"posted": 3, "failed": 1, "retried": 1}
    numbers = [r["number"] for r in received]
    assert sorted(set(numbers)) == sorted({str(FAST_D), str(EXPIRED)})
    assert len(numbers) == 3
