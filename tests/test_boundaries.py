"""One owner per outside resource (STYLE.md): only the store's modules use the Redis client, and
a campaign's hash is one typed value whose field names are declared once.

The structural checks read the source of `consumer/` with `ast`.
"""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consumer.campaign_record import (
    FIELD_NAMES,
    FIELDS,
    CampaignUpdate,
    encode_update,
    lua_with_fields,
    parse_campaign,
)
from consumer.clock import to_millis
from consumer.workflow import CampaignState

CONSUMER = Path(__file__).resolve().parents[1] / "consumer"
# The store layer: the campaign store and the contact index's store. Only these hold the client.
STORE_MODULES = {"store.py", "contact_store.py"}


def modules() -> dict[str, ast.Module]:
    """Every module of the daemon's package, parsed, by file name."""
    return {
        path.name: ast.parse(path.read_text(), filename=str(path))
        for path in sorted(CONSUMER.glob("*.py"))
    }


def imported_modules(tree: ast.Module) -> set[str]:
    """The top-level package of everything a module imports."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def terminal_name(node: ast.expr) -> str:
    """`store` for `store`, `self._store`, `parts.store`; "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def test_only_the_store_modules_import_redis() -> None:
    """No module of the daemon but the store's imports redis-py."""
    importing = {name for name, tree in modules().items() if "redis" in imported_modules(tree)}
    assert importing <= STORE_MODULES
    assert "store.py" in importing  # the check looks at the right files


def client_uses(tree: ast.Module) -> list[int]:
    """Lines that use a store's Redis client (`store.redis`, `self._store._redis`, ...) or
    register a Lua script."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and (
            (node.attr in {"redis", "_redis"} and "store" in terminal_name(node.value).lower())
            or node.attr == "register_script"
        )
    ]


def test_no_module_reaches_through_the_store_to_its_client() -> None:
    """Nothing outside the store layer uses `<store>.redis`, nor registers a Lua script."""
    reaching = {
        name: lines
        for name, tree in modules().items()
        if name not in STORE_MODULES and (lines := client_uses(tree))
    }
    assert reaching == {}


def test_the_check_sees_a_reach_through_the_store() -> None:
    """The check above finds `self._store.redis` and `parts.store.redis` where they are."""
    source = "async def f(self, parts):\n    await self._store.redis.get('k')\n"
    source += "    parts.store.redis.register_script('')\n"
    assert sorted(client_uses(ast.parse(source))) == [2, 3, 3]
    assert client_uses(ast.parse("settings.redis.url\n")) == []


# --- the campaign record: one typed value, its field names declared once ---------------------


def test_store_lua_scripts_name_campaign_fields_only_through_the_record() -> None:
    """The store's Lua scripts write `$name` for a campaign field, never the bare name."""
    tree = modules()["store.py"]
    scripts = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and "redis.call" in node.value
    ]
    assert scripts
    spelled = {name for script in scripts for name in FIELD_NAMES if f"'{name}'" in script}
    assert spelled == set()


def test_lua_placeholders_must_be_fields_of_the_record() -> None:
    """A script naming a field the record does not declare fails as it is built."""
    assert lua_with_fields("redis.call('HGET', KEYS[1], '$group_id')") == (
        "redis.call('HGET', KEYS[1], 'group_id')"
    )
    with pytest.raises(KeyError):
        lua_with_fields("redis.call('HGET', KEYS[1], '$no_such_field')")


def test_every_writable_field_is_a_field_of_the_record() -> None:
    """`CampaignUpdate` (what `Transition.set` takes) names only fields the record reads."""
    assert CampaignUpdate.__optional_keys__ <= FIELDS.keys()
    with pytest.raises(KeyError):
        encode_update({"no_such_field": "x"})


def test_fields_read_back_as_they_were_written() -> None:
    """Each kind of field encodes a value so that the record reads the same value back."""
    sent_at = datetime(2025, 3, 1, 12, 30, 15, 250_000, tzinfo=UTC)
    written = CampaignUpdate(
        group_id=42,
        cost=1.5,
        sent_at=sent_at,
        scheduled=True,
        unicode=False,
        batch_ids=[7, 8],
        group_name="OPT_seg-x",
        polls_done=3,
    )
    flat = encode_update(written)
    raw = {str(name): str(value) for name, value in zip(flat[0::2], flat[1::2], strict=True)}
    assert raw["sent_at"] == str(to_millis(sent_at))
    assert raw["scheduled"] == "1"
    record = parse_campaign("1:c:2", {"state": "SENT", **raw}, None)
    assert record is not None
    assert (record.state, record.group_id, record.cost, record.sent_at) == (
        CampaignState.SENT,
        42,
        1.5,
        sent_at,
    )
    assert (record.scheduled, record.unicode, record.batch_ids) == (True, False, [7, 8])
    assert (record.group_name, record.polls_done, record.send_at, record.matched) == (
        "OPT_seg-x",
        3,
        None,
        0,
    )
    assert parse_campaign("1:c:2", raw, None) is None  # no state: no campaign
