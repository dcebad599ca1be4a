"""Fault injection: latency, 5xx, 429 with Retry-After, and connections dropped before or after
the command is applied, per command, with rates, limits and reproducible seeds."""

from __future__ import annotations

import time

import aiohttp
import pytest

from tests.fixtures_sandbox import call, raw_call
from textlocal_sandbox import FaultRule, SandboxHandle

SEND = {"numbers": "447700900101", "message": "x"}


async def send_raw(sandbox: SandboxHandle) -> aiohttp.ClientResponse:
    fields = [*SEND.items(), ("apikey", sandbox.api_key)]
    return await raw_call(sandbox.url, "send/", fields)


async def test_latency_delays_the_reply(sandbox: SandboxHandle) -> None:
    """A latency fault holds the reply back, then answers normally."""
    await sandbox.admin.set_faults([FaultRule("latency", latency_s=0.3)])
    started = time.monotonic()
    assert (await call(sandbox, "balance"))["status"] == "success"
    assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_http_5xx_does_not_apply(sandbox: SandboxHandle, status: int) -> None:
    """An HTTP 5xx fault answers that status and leaves the state untouched."""
    await sandbox.admin.set_faults([FaultRule("http_5xx", status=status)])
    response = await send_raw(sandbox)
    assert response.status == status
    assert await sandbox.admin.messages() == []


async def test_http_429_carries_retry_after(sandbox: SandboxHandle) -> None:
    """A 429 fault answers with Retry-After and applies nothing."""
    await sandbox.admin.set_faults([FaultRule("http_429", retry_after_s=7)])
    response = await send_raw(sandbox)
    assert response.status == 429
    assert response.headers["Retry-After"] == "7"
    assert await sandbox.admin.messages() == []


async def test_drop_before_apply_loses_the_request(sandbox: SandboxHandle) -> None:
    """drop_before closes the connection with no reply and nothing applied."""
    await sandbox.admin.set_faults([FaultRule("drop_before")])
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await send_raw(sandbox)
    await sandbox.admin.clear_faults()
    assert await sandbox.admin.messages() == []
    assert (await sandbox.admin.balance()).sms == 100_000


async def test_drop_after_apply_applies_but_loses_the_reply(sandbox: SandboxHandle) -> None:
    """drop_after really sends (logged, charged, a batch exists) yet the client sees no reply."""
    await sandbox.admin.set_faults([FaultRule("drop_after", command="send")])
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await send_raw(sandbox)
    logged = await sandbox.admin.messages()
    assert [m.number for m in logged] == [447700900101]
    assert (await sandbox.admin.balance()).sms == 100_000 - 1
    history = await call(sandbox, "get_history_api")  # not a send: answered normally
    assert history["total"] == 1


async def test_fault_for_one_command_only(sandbox: SandboxHandle) -> None:
    """A fault bound to one command leaves the others alone."""
    await sandbox.admin.set_faults([FaultRule("http_5xx", command="send")])
    assert (await call(sandbox, "balance"))["status"] == "success"
    assert (await send_raw(sandbox)).status == 503


async def test_limit_fires_a_fault_only_n_times(sandbox: SandboxHandle) -> None:
    """A rule with limit=1 fails the first matching request only."""
    await sandbox.admin.set_faults([FaultRule("http_5xx", limit=1)])
    assert (await send_raw(sandbox)).status == 503
    assert (await send_raw(sandbox)).status == 200
    assert await sandbox.admin.faults_fired() == [1]


async def outcomes(sandbox: SandboxHandle, seed: int, count: int) -> list[int]:
    await sandbox.admin.set_faults([FaultRule("http_5xx", rate=0.5)], seed=seed)
    results = []
    for _ in range(count):
        response = await raw_call(sandbox.url, "balance/", [("apikey", sandbox.api_key)])
        results.append(response.status)
    return results


async def test_rate_is_reproducible_with_a_seed(sandbox: SandboxHandle) -> None:
    """The same seed gives the same sequence of faults; a rate of 0.5 fails about half."""
    first = await outcomes(sandbox, seed=42, count=60)
    second = await outcomes(sandbox, seed=42, count=60)
    assert first == second
    assert 15 <= first.count(503) <= 45


async def test_rate_zero_never_fires_and_clear_removes_faults(sandbox: SandboxHandle) -> None:
    """A rate of 0 never fires; clear_faults removes every rule."""
    await sandbox.admin.set_faults([FaultRule("drop_before", rate=0.0)])
    assert (await call(sandbox, "balance"))["status"] == "success"
    await sandbox.admin.set_faults([FaultRule("http_5xx")])
    await sandbox.admin.clear_faults()
    assert (await call(sandbox, "balance"))["status"] == "success"


async def test_faulted_requests_are_counted(sandbox: SandboxHandle) -> None:
    """Every request reaching the sandbox is counted, faulted or not."""
    await sandbox.admin.set_faults([FaultRule("http_429", command="send", limit=2)])
    for _ in range(3):
        await send_raw(sandbox)
    assert (await sandbox.admin.call_counts())["send"] == 3


async def test_bad_fault_rules_are_refused(sandbox: SandboxHandle) -> None:
    """Unknown kinds and rates outside 0..1 are refused, locally and by the admin API."""
    from textlocal_sandbox import SandboxAdminError

    with pytest.raises(ValueError, match="unknown fault kind"):
        FaultRule("gremlins")
    with pytest.raises(ValueError, match="rate"):
        FaultRule("latency", rate=1.5)
    async with aiohttp.ClientSession() as session:
        rules = {"rules": [{"kind": "http_5xx", "status": 200}]}
        async with session.put(sandbox.url + "_sandbox/faults", json=rules) as response:
            assert response.status == 400
    assert SandboxAdminError(400, "x").status == 400
