"""Running the sandbox: the aiohttp application, and `running_sandbox` for in-process use."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from textlocal_sandbox.admin_client import SandboxAdminClient
from textlocal_sandbox.admin_routes import add_admin_routes
from textlocal_sandbox.api_routes import add_api_routes
from textlocal_sandbox.clock import ManualClock
from textlocal_sandbox.config import SandboxConfig
from textlocal_sandbox.runtime import RUNTIME, SandboxRuntime
from textlocal_sandbox.state import SandboxState

_log = logging.getLogger(__name__)
# A million-recipient send carries ~13 MB of numbers; bulk calls stay far below this.
MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True)
class SandboxHandle:
    """A running sandbox: where it listens, its key, its clock, its state and an admin client."""

    url: str
    api_key: str
    clock: ManualClock
    state: SandboxState
    admin: SandboxAdminClient


def build_app(runtime: SandboxRuntime) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[RUNTIME] = runtime
    add_admin_routes(app)  # before the API's catch-all routes
    add_api_routes(app)
    return app


async def _deliver_receipts(runtime: SandboxRuntime) -> None:
    """Background: POST receipts as messages settle, on a short real-time tick."""
    while True:
        await asyncio.sleep(runtime.config.tick_interval_s)
        await runtime.dispatch_receipts()


@contextlib.asynccontextmanager
async def running_sandbox(
    api_key: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: ManualClock | None = None,
    config: SandboxConfig | None = None,
) -> AsyncIterator[SandboxHandle]:
    """Serve a sandbox on `host:port` (0 = a free port) for the duration of the block."""
    runtime = SandboxRuntime(api_key, clock or ManualClock(), config or SandboxConfig())
    runner = web.AppRunner(build_app(runtime), access_log=None)
    await runner.setup()
    ticker: asyncio.Task[None] | None = None
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        url = f"http://{url_host}:{bound_port}/"
        ticker = asyncio.create_task(_deliver_receipts(runtime))
        async with SandboxAdminClient(url) as admin:
            yield SandboxHandle(url, api_key, runtime.clock, runtime.state, admin)
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        await runtime.receipts.close()
        await runner.cleanup()
