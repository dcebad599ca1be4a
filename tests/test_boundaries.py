"""One owner per outside resource: only the store's modules use the Redis client (STYLE.md).

Structural checks over the source of `consumer/`, read with `ast` (nothing is imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

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
