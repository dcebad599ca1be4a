"""Property tests: whatever arrives, the sandbox answers HTTP 200 JSON, a success or a failure
carrying one of its catalogued error codes (TextLocal's published ones, plus the few documented
in ASSUMPTIONS.md), and never crashes."""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures_sandbox import php_multipart, raw_call
from textlocal_sandbox import SandboxHandle
from textlocal_sandbox.codes import ALL_ERRORS, PUBLISHED_ERRORS
from textlocal_sandbox.commands import COMMANDS

PARAM_NAMES = [
    "message", "numbers", "group_id", "sender", "schedule_time", "test", "receipt_url",
    "custom", "optouts", "unicode", "validity", "contacts", "data", "batch_id", "sent_id",
    "name", "number", "start", "limit", "min_time", "max_time", "sort_order", "url",
    "message_id", "inbox_id", "keyword", "time", "username", "hash", "password",
]  # fmt: skip
INTERESTING = st.sampled_from(
    [
        "", "0", "1", "-1", "true", "5", "6", "99999999999", "447700900123",
        "447700900123,447700900124", "[]", "{}", "null", '[{"number":447700900101}]',
        '{"messages":[{"number":"447700900101","text":"hi"}]}', "%5B%5D", "%", "%%2", "+",
        "x" * 800, "https://example.com/r", "asc", "desc", "é€😀", "\x00", "--5", "-1e3",
        "http://[", "1" * 40, '{"messages":[{"number":true,"text":"a"}],"sender":"%"}',
        '[{"number":"447700900101","first_name":null,"custom1":1.5}]',
    ]
)  # fmt: skip
VALUES = st.one_of(INTERESTING, st.text(max_size=60))
PARAMS = st.lists(
    st.tuples(st.one_of(st.sampled_from(PARAM_NAMES), st.text(max_size=10)), VALUES),
    max_size=8,
)
COMMAND_NAMES = st.one_of(st.sampled_from(sorted(COMMANDS)), st.text(max_size=12))
ENCODINGS = st.sampled_from(["urlencoded", "multipart", "query", "get"])
# SANDBOX_FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps the suite quick.
SETTINGS = settings(
    max_examples=int(os.environ.get("SANDBOX_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def assert_well_formed(body: str) -> None:
    reply: Any = json.loads(body)
    assert isinstance(reply, dict)
    assert reply["status"] in ("success", "failure"), reply
    if reply["status"] == "failure":
        errors = reply["errors"]
        assert len(errors) == 1
        assert errors[0]["code"] in ALL_ERRORS, reply
        assert errors[0]["message"] == ALL_ERRORS[errors[0]["code"]]


@SETTINGS
@given(command=COMMAND_NAMES, params=PARAMS, encoding=ENCODINGS, with_key=st.booleans())
async def test_arbitrary_parameters_always_get_a_json_answer(
    sandbox: SandboxHandle,
    command: str,
    params: list[tuple[str, str]],
    encoding: str,
    with_key: bool,
) -> None:
    """Any command name, parameter names and values, in any encoding, get a well-formed reply."""
    # Names and values must survive the chosen transport (multipart names cannot hold quotes or
    # line breaks in our hand-built body); what matters is what the server does with them.
    fields = [(n.replace('"', "").replace("\r", "").replace("\n", ""), v) for n, v in params]
    if with_key:
        fields.append(("apikey", sandbox.api_key))
    path = quote(command, safe="")
    response = await raw_call(sandbox.url, path + "/", fields, encoding=encoding)  # type: ignore[arg-type]
    assert response.status == 200
    assert_well_formed(await response.text())


@SETTINGS
@given(body=st.binary(max_size=300), content_type=st.sampled_from([
    "multipart/form-data; boundary=xyz", "multipart/form-data", "application/x-www-form-urlencoded",
    "application/json", "text/plain", "multipart/form-data; boundary=",
]))  # fmt: skip
async def test_arbitrary_bodies_never_crash(
    sandbox: SandboxHandle, body: bytes, content_type: str
) -> None:
    """Random bytes under any content type still get a JSON answer on HTTP 200."""
    import aiohttp

    url = sandbox.url + f"send/?apikey={sandbox.api_key}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers={"Content-Type": content_type}) as response,
    ):
        assert response.status == 200
        assert_well_formed(await response.text())


@SETTINGS
@given(
    numbers=st.lists(st.integers(min_value=0, max_value=10**16), max_size=5),
    message=st.text(max_size=900),
    extra=st.lists(st.tuples(st.sampled_from(PARAM_NAMES), VALUES), max_size=4),
)
async def test_sends_answer_success_or_a_published_code(
    sandbox: SandboxHandle, numbers: list[int], message: str, extra: list[tuple[str, str]]
) -> None:
    """A send with arbitrary numbers, text and options is a success or a published failure."""
    fields = [
        ("numbers", ",".join(str(n) for n in numbers)),
        ("message", message),
        *[(n, v) for n, v in extra if n not in ("numbers", "username", "hash", "password")],
        ("apikey", sandbox.api_key),
    ]
    response = await raw_call(sandbox.url, "send/", fields, encoding="multipart")
    body = await response.text()
    assert_well_formed(body)
    reply = json.loads(body)
    if reply["status"] == "failure":
        assert reply["errors"][0]["code"] in PUBLISHED_ERRORS


def test_hand_built_multipart_is_parseable() -> None:
    """The test helper builds the body cURL would (sanity check of the test's own tool)."""
    body, content_type = php_multipart([("a", "1"), ("b", "")])
    boundary = content_type.split("boundary=")[1]
    assert body.count(boundary.encode()) == 3
