"""The `sandbox` fixture (a fresh TextLocal sandbox per test, over real HTTP on 127.0.0.1) and
helpers that put raw requests on the wire the way real TextLocal clients do."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urlencode

import aiohttp
import pytest_asyncio
import yarl

from textlocal_sandbox import SandboxHandle, running_sandbox

Fields = Sequence[tuple[str, str]] | Mapping[str, str]
Encoding = Literal["urlencoded", "multipart", "query", "get"]


@pytest_asyncio.fixture
async def sandbox() -> AsyncIterator[SandboxHandle]:
    """A sandbox on a free port with a random API key and an empty account."""
    async with running_sandbox(secrets.token_hex(16)) as handle:
        yield handle


def php_multipart(fields: Sequence[tuple[str, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body as PHP's cURL builds it from an array: one bare part per key."""
    boundary = "------------------------" + secrets.token_hex(8)
    chunks = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields
    ]
    body = ("".join(chunks) + f"--{boundary}--\r\n").encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def raw_call(
    url: str, command_path: str, fields: Fields, *, encoding: Encoding = "urlencoded"
) -> aiohttp.ClientResponse:
    """Send one request and return the response with its body already read."""
    pairs = list(fields.items()) if isinstance(fields, Mapping) else list(fields)
    target = url.rstrip("/") + "/" + command_path.lstrip("/")
    async with aiohttp.ClientSession() as session:
        if encoding == "multipart":
            body, content_type = php_multipart(pairs)
            request = session.post(target, data=body, headers={"Content-Type": content_type})
        elif encoding == "urlencoded":
            form = urlencode(pairs).encode()
            form_type = {"Content-Type": "application/x-www-form-urlencoded"}
            request = session.post(target, data=form, headers=form_type)
        elif encoding == "query":
            request = session.post(_with_query(target, pairs))
        else:
            request = session.get(_with_query(target, pairs))
        async with request as response:
            await response.read()
            return response


async def call(
    handle: SandboxHandle,
    command: str,
    fields: Fields = (),
    *,
    encoding: Encoding = "urlencoded",
    with_key: bool = True,
) -> dict[str, Any]:
    """Call a command (`/command/`) with the handle's API key; returns the JSON reply."""
    pairs = list(fields.items()) if isinstance(fields, Mapping) else list(fields)
    if with_key:
        pairs.append(("apikey", handle.api_key))
    response = await raw_call(handle.url, f"{command}/", pairs, encoding=encoding)
    assert response.status == 200, response.status
    reply: dict[str, Any] = json.loads(await response.text())
    return reply


def _with_query(target: str, pairs: list[tuple[str, str]]) -> yarl.URL:
    """The target with `pairs` appended to its query string, encoded as clients do."""
    joiner = "&" if "?" in target else "?"
    return yarl.URL(target + joiner + urlencode(pairs), encoded=True)


def error_code(reply: Mapping[str, Any]) -> int:
    """The first error code of a failure reply (fails the test on a success)."""
    assert reply["status"] == "failure", reply
    code: int = reply["errors"][0]["code"]
    return code
