"""The admin API (`/_sandbox/`) through SandboxAdminClient, the demo seed, and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.fixtures_sandbox import call, error_code
from textlocal_sandbox import (
    FaultRule,
    SandboxAdminClient,
    SandboxAdminError,
    SandboxConfig,
    SandboxHandle,
    running_sandbox,
    seed_demo,
)
from textlocal_sandbox.config import SandboxConfig as Config
from textlocal_sandbox.state import SandboxState

REPO = Path(__file__).resolve().parents[1]


async def test_clock_set_advance_and_now(sandbox: SandboxHandle) -> None:
    """set_clock and advance_clock move the sandbox clock that now() and the API see."""
    moment = datetime(2031, 5, 1, 12, 0, tzinfo=UTC)
    await sandbox.admin.set_clock(moment)
    assert abs((await sandbox.admin.now()) - moment) < timedelta(seconds=2)
    after = await sandbox.admin.advance_clock(timedelta(days=3))
    assert abs(after - (moment + timedelta(days=3))) < timedelta(seconds=2)
    assert abs(sandbox.clock.now() - after) < timedelta(seconds=2)
    with pytest.raises(ValueError, match="timezone"):
        await sandbox.admin.set_clock(datetime(2031, 5, 1))


async def test_seed_contacts_by_name_creates_then_reuses(sandbox: SandboxHandle) -> None:
    """Seeding by group name creates the group once and adds to it afterwards."""
    first = await sandbox.admin.seed_contacts(
        None, "Master", [{"number": 447700900001, "custom1": "C1"}]
    )
    second = await sandbox.admin.seed_contacts(None, "Master", [{"number": 447700900002}])
    assert first == second
    view = await sandbox.admin.group_contacts(first)
    assert (view.name, view.size) == ("Master", 2)
    assert view.contacts[0].custom1 == "C1"
    assert await sandbox.admin.group_size(first) == 2
    assert (await sandbox.admin.groups())[first] == ("Master", 2)
    with pytest.raises(SandboxAdminError) as missing:
        await sandbox.admin.group_contacts(9999)
    assert missing.value.status == 404


async def test_templates_seed_rename_update_delete(sandbox: SandboxHandle) -> None:
    """Templates seeded, renamed, rewritten and deleted show so in get_templates."""
    ids = await sandbox.admin.seed_templates(
        [{"title": "OPT_A", "body": "a"}, {"title": "OPT_B", "body": "b", "sender_name": "Shop"}]
    )
    await sandbox.admin.rename_template(ids[0], "OPT_A2")
    await sandbox.admin.update_template_body(ids[0], "a2")
    await sandbox.admin.delete_template(ids[1])
    templates = (await call(sandbox, "get_templates"))["templates"]
    assert [(t["id"], t["title"], t["body"]) for t in templates] == [(ids[0], "OPT_A2", "a2")]
    with pytest.raises(SandboxAdminError):
        await sandbox.admin.delete_template(ids[1])


async def test_message_log_and_batches(sandbox: SandboxHandle) -> None:
    """messages() lists each message sent (number, text, batch, time); batches() each send."""
    reply = await call(
        sandbox, "send", {"numbers": "447700900101,447700900102", "message": "Hi%21"}
    )
    await call(sandbox, "send", {"numbers": "447700900103", "message": "Other"})
    logged = await sandbox.admin.messages()
    assert [(m.number, m.text) for m in logged] == [
        (447700900101, "Hi!"),
        (447700900102, "Hi!"),
        (447700900103, "Other"),
    ]
    assert logged[0].batch_id == reply["batch_id"]
    assert logged[0].message_id == reply["messages"][0]["id"]
    assert abs(logged[0].sent_at - sandbox.clock.now()) < timedelta(seconds=5)
    assert await sandbox.admin.sent_numbers(reply["batch_id"]) == [447700900101, 447700900102]
    batches = await sandbox.admin.batches()
    first = batches[0]
    assert (first.batch_id, first.num_messages, first.left) == (reply["batch_id"], 2, True)


async def test_call_counts_are_exact_per_command(sandbox: SandboxHandle) -> None:
    """call_counts() counts every request per command name, failures included."""
    await call(sandbox, "balance")
    await call(sandbox, "balance")
    await call(sandbox, "get_groups", with_key=False)
    await call(sandbox, "send", {"message": "x"})
    assert await sandbox.admin.call_counts() == {"balance": 2, "get_groups": 1, "send": 1}
    await sandbox.admin.reset_call_counts()
    assert await sandbox.admin.call_counts() == {}


async def test_call_log_times_every_request_in_arrival_order(sandbox: SandboxHandle) -> None:
    """call_log() lists each request's command and real arrival time in order; reset empties it."""
    await sandbox.admin.advance_clock(timedelta(days=3))  # the log keeps real time regardless
    before = datetime.now(UTC)
    await call(sandbox, "balance")
    await call(sandbox, "get_groups", with_key=False)
    await call(sandbox, "balance")
    after = datetime.now(UTC)
    log = await sandbox.admin.call_log()
    assert [entry.command for entry in log] == ["balance", "get_groups", "balance"]
    assert all(before <= entry.at <= after for entry in log)
    assert [entry.at for entry in log] == sorted(entry.at for entry in log)
    await sandbox.admin.reset_call_counts()
    assert await sandbox.admin.call_log() == []


async def test_balance_read_and_set(sandbox: SandboxHandle) -> None:
    """balance() reads the account's credits; set_balance changes them."""
    assert (await sandbox.admin.balance()).sms == 100_000
    changed = await sandbox.admin.set_balance(sms=5, mms=0)
    assert (changed.sms, changed.mms) == (5, 0)
    assert (await call(sandbox, "balance"))["balance"] == {"sms": 5, "mms": 0}


async def test_reset_returns_to_a_fresh_account(sandbox: SandboxHandle) -> None:
    """reset() drops groups, templates, sends, faults and counters; balance back to start."""
    await sandbox.admin.seed_contacts(None, "G", [{"number": 447700900101}])
    await sandbox.admin.seed_templates([{"title": "T", "body": "b"}])
    await call(sandbox, "send", {"numbers": "447700900101", "message": "x"})
    await sandbox.admin.set_faults([FaultRule("http_5xx", command="status_batch")])
    await sandbox.admin.reset()
    assert [g["id"] for g in (await call(sandbox, "get_groups"))["groups"]] == [5, 6]
    assert (await call(sandbox, "get_templates"))["templates"] == []
    assert await sandbox.admin.messages() == []
    assert (await sandbox.admin.balance()).sms == 100_000
    assert await sandbox.admin.call_counts() == {"get_groups": 1, "get_templates": 1}
    assert error_code(await call(sandbox, "status_batch", {"batch_id": "100000001"})) == 901


async def test_generate_contacts_for_big_groups(sandbox: SandboxHandle) -> None:
    """generate_contacts fills a group with numbered contacts and customer ids."""
    group_id = await sandbox.admin.generate_contacts("Big", 2_500, first_number=447700000000)
    page = await sandbox.admin.group_contacts(group_id, start=2_499, limit=5)
    assert page.size == 2_500
    assert [(c.number, c.custom1) for c in page.contacts] == [(447700002499, "C0002500")]


async def test_generate_contacts_with_constant_fields(sandbox: SandboxHandle) -> None:
    """`fields` sets other fields to one value on every generated contact (id_field excepted)."""
    group_id = await sandbox.admin.generate_contacts(
        "Lang", 3, first_index=10, fields={"custom2": "fr", "first_name": "Ann"}
    )
    page = await sandbox.admin.group_contacts(group_id)
    assert [(c.custom1, c.custom2, c.first_name) for c in page.contacts] == [
        (f"C00000{i}", "fr", "Ann") for i in (10, 11, 12)
    ]
    with pytest.raises(SandboxAdminError):
        await sandbox.admin.generate_contacts("Lang", 1, fields={"custom1": "x"})


async def test_add_optouts_stands_for_contacts_texting_stop(sandbox: SandboxHandle) -> None:
    """Opted-out numbers join group 6 with new ids and stay in their other groups; a number
    already opted out keeps its id; an empty list is refused."""
    group_id = await sandbox.admin.seed_contacts(None, "Master", [{"number": 447700900001}])
    assert await sandbox.admin.add_optouts([447700900001, 447700900002]) == [1, 2]
    assert await sandbox.admin.add_optouts([447700900002]) == [2]
    groups = await sandbox.admin.groups()
    assert groups[6] == ("Opt-outs", 2)
    assert groups[group_id] == ("Master", 1)
    with pytest.raises(SandboxAdminError) as refused:
        await sandbox.admin.add_optouts([])
    assert refused.value.status == 400


async def test_admin_bad_requests_are_400(sandbox: SandboxHandle) -> None:
    """Malformed admin bodies are answered 400 with an error text, not a crash."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for method, path, body in [
            ("PUT", "clock", b"not json"),
            ("PUT", "clock", b'{"now": "2030-01-01T00:00:00"}'),
            ("POST", "contacts", b'{"contacts": [{"number": "abc"}]}'),
            ("PUT", "faults", b'{"rules": [{"kind": "latency", "bogus": 1}]}'),
        ]:
            url = f"{sandbox.url}_sandbox/{path}"
            async with session.request(method, url, data=body) as response:
                assert response.status == 400, (path, body)
                assert "error" in json.loads(await response.text())


def test_seed_demo_builds_the_demo_account() -> None:
    """seed_demo adds "Optimove customers" (1,000 contacts, ids C00001…) and OPT_ templates."""
    state = SandboxState(Config())
    group_id = seed_demo(state)
    group = state.groups[group_id]
    assert (group.name, len(group)) == ("Optimove customers", 1_000)
    first = group.get(447700900000)
    assert first is not None
    assert first.custom1 == "C00001"
    assert first.first_name
    titles = [t.title for t in state.templates.values()]
    assert sum(t.startswith("OPT_") for t in titles) == 3
    assert len(titles) - 3 == 1
    promo = next(t for t in state.templates.values() if t.title == "OPT_Promo")
    assert "[%PROMO_CODE%]" in promo.body


async def test_seed_demo_option_and_reset_reseeds() -> None:
    """With seed_demo configured, the account starts (and resets) with the demo data."""
    async with running_sandbox("k", config=SandboxConfig(seed_demo=True)) as handle:
        await handle.admin.reset()
        groups = await handle.admin.groups()
        assert ("Optimove customers", 1_000) in groups.values()


async def test_admin_client_as_context_manager(sandbox: SandboxHandle) -> None:
    """SandboxAdminClient works as `async with` on its own."""
    async with SandboxAdminClient(sandbox.url) as admin:
        assert (await admin.balance()).sms == 100_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_cli_help() -> None:
    """`python -m textlocal_sandbox --help` describes the options."""
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "textlocal_sandbox", "--help"],
        capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    for option in ("--port", "--api-key", "--host", "--seed-demo", "--balance", "--settle-delay-s"):
        assert option in result.stdout


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_cli_serves_logs_url_without_key_and_stops_cleanly(stop_signal: int) -> None:
    """The CLI logs its URL (never the key), answers, and exits 0 on SIGTERM or SIGINT."""
    port = free_port()
    key = "cli-secret-key-123"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "textlocal_sandbox", "--port", str(port), "--api-key", key,
        "--seed-demo", "--balance", "777",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), timeout=20)).decode()
    assert f"http://127.0.0.1:{port}/" in line
    handle = SandboxHandle(f"http://127.0.0.1:{port}/", key, None, None, SandboxAdminClient(""))  # type: ignore[arg-type]
    reply = await call(handle, "balance")
    assert reply["balance"]["sms"] == 777
    process.send_signal(stop_signal)
    rest = (await asyncio.wait_for(process.stdout.read(), timeout=20)).decode()
    assert await asyncio.wait_for(process.wait(), timeout=20) == 0
    assert key not in line + rest
    await handle.admin.close()
