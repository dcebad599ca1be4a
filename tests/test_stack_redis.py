"""The real Redis server the tests (and the daemon) use keeps an append-only file."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

pytestmark = pytest.mark.integration


async def test_fixture_redis_has_aof_enabled(redis_client: aioredis.Redis) -> None:
    """The test Redis reports AOF persistence on, as the daemon requires."""
    persistence = await redis_client.info("persistence")
    assert persistence["aof_enabled"] == 1
    assert (await redis_client.config_get("appendonly")) in (
        {"appendonly": "yes"},
        {b"appendonly": b"yes"},
    )


async def test_key_prefix_isolates_tests(redis_client: aioredis.Redis, key_prefix: str) -> None:
    """Each test's key prefix is unique and starts empty."""
    assert [key async for key in redis_client.scan_iter(match=f"{key_prefix}*")] == []
    await redis_client.set(f"{key_prefix}probe", b"1")
    assert await redis_client.get(f"{key_prefix}probe") == b"1"
