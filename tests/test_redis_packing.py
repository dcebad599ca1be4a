"""The daemon's Redis connections pack commands with hiredis (pure: no server needed)."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from consumer.store import _HiredisPacking, connect_redis


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    """The daemon's connections pack with hiredis (consumer.store._HiredisPacking): the same
    bytes as redis-py's own packer for every kind of argument we send, and the same DataError
    for a value Redis cannot take."""
    pool = connect_redis("redis://127.0.0.1:1/0").connection_pool
    packing = pool.connection_class(**pool.connection_kwargs)
    assert isinstance(packing, _HiredisPacking)
    reference = Connection()
    commands: list[tuple[str | bytes | int | float, ...]] = [
        ("HSET", "k", "447700100000", "-C1,é%", 7, 2.5, b"\x00\xff"),
        ("CONFIG GET", "maxmemory"),
        (b"CLIENT SETNAME", "x"),
        ("EVALSHA", "0" * 40, 2, "a", "b", "x" * 100_000),
    ]
    for command in commands:
        assert b"".join(packing.pack_command(*command)) == b"".join(
            reference.pack_command(*command)
        )
    for bad in (None, True, [1]):
        with pytest.raises(DataError):
            packing.pack_command("SET", "k", bad)  # type: ignore[arg-type]
