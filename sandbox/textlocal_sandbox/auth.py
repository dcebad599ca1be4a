"""Login checks: an API key, or a username with its hash or password (error 3 otherwise)."""

from __future__ import annotations

import hmac

from textlocal_sandbox.config import SandboxConfig
from textlocal_sandbox.wire import RequestParams


def is_authenticated(params: RequestParams, api_key: str, config: SandboxConfig) -> bool:
    """A given key must be right; without one, the username and its hash or password must be.

    With a key, a username (sent empty by the PHP class, or filled in) is ignored.
    """
    key = params.text("apikey")
    if key is not None:
        return _same(key, api_key)
    username = params.text("username")
    if username is None or not _same(username, config.username):
        return False
    login_hash = params.text("hash")
    if login_hash is not None:
        return config.login_hash is not None and _same(login_hash, config.login_hash)
    password = params.text("password")
    return password is not None and config.password is not None and _same(password, config.password)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
