"""The TextLocal API over HTTP: `/{command}` or `/{command}/`, GET or POST, always JSON.

Per request: read the parameters, count and log the call, apply any injected fault, check the
login, run the command and answer. API errors are HTTP 200 with `status: failure`, as TextLocal
does.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from textlocal_sandbox.auth import is_authenticated
from textlocal_sandbox.codes import ALL_ERRORS, CommandFailed
from textlocal_sandbox.commands import COMMANDS, CommandContext
from textlocal_sandbox.faults import DROP_AFTER, DROP_BEFORE, HTTP_429
from textlocal_sandbox.reply import render_failure, render_success
from textlocal_sandbox.runtime import RUNTIME, SandboxRuntime
from textlocal_sandbox.wire import RequestParams, read_params

_log = logging.getLogger(__name__)


def add_api_routes(app: web.Application) -> None:
    app.router.add_route("*", "/", handle_command)
    app.router.add_route("*", "/{command}", handle_command)
    app.router.add_route("*", "/{command}/", handle_command)
    app.router.add_route("*", "/{tail:.+}", handle_command)


async def handle_command(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    command = request.match_info.get("command", request.match_info.get("tail", ""))
    params = await read_params(request)
    runtime.count_call(command)
    decision = runtime.faults.decide(command)
    if decision.latency_s:
        await asyncio.sleep(decision.latency_s)
    failure = decision.failure
    if failure is not None and failure.kind == DROP_BEFORE:
        return _drop(request)
    if failure is not None and failure.kind == HTTP_429:
        return web.Response(
            status=429,
            text="Too Many Requests",
            headers={"Retry-After": str(failure.retry_after_s)},
        )
    if failure is not None and failure.kind != DROP_AFTER:
        return web.Response(status=failure.status, text="Service Unavailable")
    body = execute(runtime, command, params)
    if failure is not None:
        return _drop(request)
    return web.Response(text=body, content_type="application/json")


def execute(runtime: SandboxRuntime, command: str, params: RequestParams) -> str:
    """Run one command against the state; the reply body, success or failure."""
    try:
        if not command:
            raise CommandFailed(1)
        handler = COMMANDS.get(command)
        if handler is None:
            raise CommandFailed(2)
        if not is_authenticated(params, runtime.api_key, runtime.config):
            raise CommandFailed(3)
        context = CommandContext(runtime.state, runtime.config, runtime.now_s())
        return render_success(handler(context, params))
    except CommandFailed as failed:
        return render_failure(failed.code, ALL_ERRORS[failed.code])


def _drop(request: web.Request) -> web.StreamResponse:
    # Abort (not close) so nothing buffered is flushed: the client sees the connection die with
    # no reply. aiohttp then discards the response below, written to a closed transport.
    if request.transport is not None:
        request.transport.abort()
    _log.info("sandbox.fault.dropped", extra={"command": request.match_info.get("command", "")})
    return web.Response(status=200)
