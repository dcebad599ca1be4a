"""The `sandbox` fixture: a fresh TextLocal sandbox per test, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest_asyncio

from consumer.sandbox import SandboxHandle, running_sandbox


@pytest_asyncio.fixture
async def sandbox() -> AsyncIterator[SandboxHandle]:
    """A sandbox on a free port with a random API key and an empty account."""
    async with running_sandbox(secrets.token_hex(16)) as handle:
        yield handle
