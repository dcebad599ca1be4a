"""The daemon refuses a Redis that would lose campaign state on restart (no AOF)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from consumer.errors import ConfigError
from consumer.keys import RedisKeys
from consumer.store import CampaignStore
from tests.conftest import service_unavailable
from tests.daemon import free_port
from tests.helpers import REGISTRY

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis_without_aof(tmp_path: Path) -> AsyncIterator[str]:
    """A throwaway redis-server with persistence off."""
    server = shutil.which("redis-server")
    if server is None:
        service_unavailable("redis-server is not installed")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *[
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            "no",
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=asyncio.subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.Redis.from_url(url)
    try:
        for _ in range(50):
            try:
                await client.ping()
                break
            except aioredis.ConnectionError:
                await asyncio.sleep(0.1)
        yield url
    finally:
        await client.aclose()
        process.terminate()
        await process.wait()


async def test_redis_without_aof_is_refused_unless_allowed(redis_without_aof: str) -> None:
    """Without AOF the store refuses to start, naming the override; allowed, it says so."""
    client = aioredis.Redis.from_url(redis_without_aof)
    store = CampaignStore(client, RedisKeys(), REGISTRY)
    try:
        with pytest.raises(ConfigError, match="REDIS_ALLOW_NO_PERSISTENCE") as error:
            await store.check_persistence(allow_without=False)
        assert error.value.setting == "redis.url"
        assert await store.check_persistence(allow_without=True) is False
    finally:
        await client.aclose()
