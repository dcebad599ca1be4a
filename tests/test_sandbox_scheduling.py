"""Scheduled sends: listed until their time, cancellable with a refund, then sent on time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from consumer.clock import to_unix_s
from tests.fixtures_sandbox import call, error_code
from textlocal_sandbox import SandboxHandle

NUMBERS = "447700900101,447700900102,447700900103"


async def schedule(sandbox: SandboxHandle, at: datetime, **extra: str) -> dict[str, object]:
    fields = {"numbers": NUMBERS, "message": "Sale%20starts", "schedule_time": str(to_unix_s(at))}
    fields.update(extra)
    reply = await call(sandbox, "send", fields)
    assert reply["status"] == "success", reply
    return reply


async def test_scheduled_send_is_listed_until_its_time(sandbox: SandboxHandle) -> None:
    """get_scheduled lists the send, all fields strings, with id = batch id, until it leaves."""
    at = (sandbox.clock.now() + timedelta(hours=2)).replace(microsecond=0)
    reply = await schedule(sandbox, at, custom="camp-1")
    listed = (await call(sandbox, "get_scheduled"))["scheduled"]
    assert listed == [
        {
            "id": str(reply["batch_id"]),
            "scheduledFor": at.astimezone(UTC).strftime("%Y-%m-%d-%H-%M-%S"),
            "howmany": "3",
            "message": "Sale starts",
            "origin": "TXTLCL",
            "groupName": "",
            "groupid": "0",
        }
    ]
    assert await sandbox.admin.messages() == []
    sandbox.clock.advance(timedelta(hours=2, seconds=1))
    assert (await call(sandbox, "get_scheduled"))["scheduled"] == []
    sent = await sandbox.admin.messages(int(str(reply["batch_id"])))
    assert [m.number for m in sent] == [447700900101, 447700900102, 447700900103]
    assert {m.sent_at for m in sent} == {at}


async def test_group_schedule_lists_group_name_and_id(sandbox: SandboxHandle) -> None:
    """A scheduled group send names its group in get_scheduled."""
    group_id = await sandbox.admin.seed_contacts(
        None, "Segment", [{"number": 447700900101}, {"number": 447700900102}]
    )
    at = sandbox.clock.now() + timedelta(days=1)
    fields = {"group_id": str(group_id), "message": "x", "schedule_time": str(to_unix_s(at))}
    await call(sandbox, "send", fields)
    (listed,) = (await call(sandbox, "get_scheduled"))["scheduled"]
    assert (listed["groupName"], listed["groupid"], listed["howmany"]) == (
        "Segment",
        str(group_id),
        "2",
    )


async def test_cancel_scheduled_refunds_and_never_sends(sandbox: SandboxHandle) -> None:
    """cancel_scheduled withdraws the send: refunded, unlisted, never sent, no longer a batch."""
    reply = await schedule(sandbox, sandbox.clock.now() + timedelta(hours=1))
    assert (await sandbox.admin.balance()).sms == 100_000 - 3
    cancelled = await call(sandbox, "cancel_scheduled", {"sent_id": str(reply["batch_id"])})
    assert cancelled == {"status": "success"}
    assert (await sandbox.admin.balance()).sms == 100_000
    assert (await call(sandbox, "get_scheduled"))["scheduled"] == []
    sandbox.clock.advance(timedelta(days=1))
    assert await sandbox.admin.messages() == []
    status = await call(sandbox, "status_batch", {"batch_id": str(reply["batch_id"])})
    assert error_code(status) == 901


async def test_cancel_after_the_time_or_twice_fails(sandbox: SandboxHandle) -> None:
    """A send that already left, or was already cancelled, cannot be cancelled."""
    left = await schedule(sandbox, sandbox.clock.now() + timedelta(minutes=5))
    sandbox.clock.advance(timedelta(minutes=6))
    assert (
        error_code(await call(sandbox, "cancel_scheduled", {"sent_id": str(left["batch_id"])}))
        == 903
    )
    later = await schedule(sandbox, sandbox.clock.now() + timedelta(minutes=5))
    await call(sandbox, "cancel_scheduled", {"sent_id": str(later["batch_id"])})
    again = await call(sandbox, "cancel_scheduled", {"sent_id": str(later["batch_id"])})
    assert error_code(again) == 903
    assert error_code(await call(sandbox, "cancel_scheduled")) == 903


async def test_bad_schedule_times(sandbox: SandboxHandle) -> None:
    """Non-numeric → 8, in the past → 9, more than a year ahead → 191."""
    now = sandbox.clock.now()
    for value, code in [
        ("tomorrow", 8),
        (str(to_unix_s(now - timedelta(minutes=1))), 9),
        (str(to_unix_s(now + timedelta(days=400))), 191),
    ]:
        reply = await call(
            sandbox, "send", {"numbers": NUMBERS, "message": "x", "schedule_time": value}
        )
        assert error_code(reply) == code, value


async def test_scheduled_batch_is_pending_until_sent_then_settles(sandbox: SandboxHandle) -> None:
    """status_batch of a scheduled send shows P until its time, then evolves from there."""
    reply = await schedule(sandbox, sandbox.clock.now() + timedelta(hours=1))
    batch = {"batch_id": str(reply["batch_id"])}
    before = await call(sandbox, "status_batch", batch)
    assert {m["status"] for m in before["messages"]} == {"P"}
    sandbox.clock.advance(timedelta(hours=1, minutes=30))
    after = await call(sandbox, "status_batch", batch)
    assert after["num_delivered"] == 3


async def test_schedule_history_appears_only_after_sending(sandbox: SandboxHandle) -> None:
    """get_history_group shows a scheduled group send only once it has left."""
    group_id = await sandbox.admin.seed_contacts(None, "G", [{"number": 447700900101}])
    at = sandbox.clock.now() + timedelta(hours=3)
    fields = {"group_id": str(group_id), "message": "x", "schedule_time": str(to_unix_s(at))}
    await call(sandbox, "send", fields)
    assert (await call(sandbox, "get_history_group"))["total"] == 0
    sandbox.clock.advance(timedelta(hours=4))
    assert (await call(sandbox, "get_history_group"))["total"] == 1
