"""Wire tests: the sandbox accepts requests exactly as real TextLocal clients put them on the wire.

Raw requests are built by hand: multipart the way TextLocal's PHP class (via cURL) sends it, and
urlencoded / query string / GET the way form-encoding clients do. Every form must lead to the
same state and the same reply.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from tests.fixtures_sandbox import Encoding, call, error_code, raw_call
from textlocal_sandbox import SandboxHandle

MESSAGE = "Hi & bye 50%+"
PHP_MESSAGE = "Hi%20%26%20bye%2050%25%2B"  # PHP rawurlencode(), as captured
PHP_SENDER = "Shop%20%26%20Co"
NUMBERS = "447700900101,447700900102"


def php_send_fields(api_key: str, **overrides: str) -> list[tuple[str, str]]:
    """The PHP class's send parts, in its order, unset ones present and empty."""
    fields = {
        "message": PHP_MESSAGE,
        "numbers": NUMBERS,
        "sender": PHP_SENDER,
        "schedule_time": "",
        "test": "",
        "receipt_url": "",
        "custom": "",
        "optouts": "",
        "simple_reply": "",
        "apiKey": api_key,
        "username": "",
    }
    fields.update(overrides)
    return list(fields.items())


def form_send_fields(api_key: str) -> list[tuple[str, str]]:
    """A form-encoding client: message and sender URL-encoded once before form encoding."""
    return [
        ("apikey", api_key),
        ("numbers", NUMBERS),
        ("message", quote(MESSAGE, safe="")),
        ("sender", quote("Shop & Co", safe="")),
    ]


def comparable(reply: dict[str, Any]) -> dict[str, Any]:
    """A send reply without what differs between two sends of the same thing (ids, balance)."""
    kept = {k: v for k, v in reply.items() if k not in ("batch_id", "balance", "messages")}
    kept["recipients"] = [m["recipient"] for m in reply["messages"]]
    return kept


async def test_php_multipart_send_is_decoded_once_more(sandbox: SandboxHandle) -> None:
    """A send from the PHP class arrives with message and sender decoded exactly once more."""
    body_fields = php_send_fields(sandbox.api_key)
    response = await raw_call(sandbox.url, "send/", body_fields, encoding="multipart")
    assert response.status == 200
    reply = json.loads(await response.text())
    assert reply["status"] == "success", reply
    assert reply["message"] == {"num_parts": 1, "sender": "Shop & Co", "content": MESSAGE}
    assert [m["recipient"] for m in reply["messages"]] == [447700900101, 447700900102]
    assert all(isinstance(m["id"], str) for m in reply["messages"])
    assert "test_mode" not in reply
    logged = await sandbox.admin.messages(reply["batch_id"])
    assert [(m.number, m.text, m.sender) for m in logged] == [
        (447700900101, MESSAGE, "Shop & Co"),
        (447700900102, MESSAGE, "Shop & Co"),
    ]


@pytest.mark.parametrize("encoding", ["multipart", "urlencoded", "query", "get"])
async def test_every_encoding_gives_the_same_send(
    sandbox: SandboxHandle, encoding: Encoding
) -> None:
    """PHP multipart, urlencoded POST, query-string POST and GET all produce the same send."""
    php = await raw_call(
        sandbox.url, "send/", php_send_fields(sandbox.api_key), encoding="multipart"
    )
    reference = json.loads(await php.text())
    fields = (
        php_send_fields(sandbox.api_key)
        if encoding == "multipart"
        else form_send_fields(sandbox.api_key)
    )
    response = await raw_call(sandbox.url, "send", fields, encoding=encoding)
    reply = json.loads(await response.text())
    assert comparable(reply) == comparable(reference)
    first = await sandbox.admin.messages(reference["batch_id"])
    second = await sandbox.admin.messages(reply["batch_id"])
    assert [(m.number, m.text, m.sender) for m in first] == [
        (m.number, m.text, m.sender) for m in second
    ]


async def test_query_and_body_are_merged(sandbox: SandboxHandle) -> None:
    """Parameters split between the query string and the body are read together."""
    target = f"send/?apikey={sandbox.api_key}&numbers={NUMBERS}"
    response = await raw_call(sandbox.url, target, [("message", quote(MESSAGE, safe=""))])
    reply = json.loads(await response.text())
    assert reply["status"] == "success", reply
    assert reply["message"]["content"] == MESSAGE
    assert reply["num_messages"] == 2


async def test_body_wins_over_query_and_empty_values_hide_nothing(sandbox: SandboxHandle) -> None:
    """A body value overrides the query's; an empty body value leaves the query's in force."""
    target = f"send/?apikey={sandbox.api_key}&numbers=447700900999&message=from%2520query"
    fields = [("numbers", "447700900101"), ("message", ""), ("apiKey", ""), ("username", "")]
    reply = json.loads(await (await raw_call(sandbox.url, target, fields)).text())
    assert reply["status"] == "success", reply
    assert [m["recipient"] for m in reply["messages"]] == [447700900101]
    assert reply["message"]["content"] == "from query"


@pytest.mark.parametrize("name", ["apikey", "apiKey", "APIKEY", "ApiKey"])
async def test_api_key_parameter_name_is_case_insensitive(
    sandbox: SandboxHandle, name: str
) -> None:
    """The key is found under any capitalisation of `apikey`."""
    response = await raw_call(sandbox.url, "balance/", [(name, sandbox.api_key)])
    assert json.loads(await response.text())["status"] == "success"


@pytest.mark.parametrize("path", ["balance", "balance/"])
async def test_path_with_or_without_trailing_slash(sandbox: SandboxHandle, path: str) -> None:
    """`/balance` and `/balance/` are the same command."""
    response = await raw_call(sandbox.url, path, [("apikey", sandbox.api_key)])
    assert json.loads(await response.text())["balance"] == {"sms": 100_000, "mms": 100}


async def test_bad_key_is_error_3_with_http_200(sandbox: SandboxHandle) -> None:
    """A wrong key is a JSON failure, code 3 "Invalid login details", on HTTP 200."""
    response = await raw_call(sandbox.url, "balance/", [("apikey", "wrong")])
    assert response.status == 200
    assert json.loads(await response.text()) == {
        "errors": [{"code": 3, "message": "Invalid login details"}],
        "status": "failure",
    }


async def test_missing_login_is_error_3(sandbox: SandboxHandle) -> None:
    """No key and no username is error 3."""
    assert error_code(await call(sandbox, "balance", with_key=False)) == 3


async def test_username_with_password_or_hash_logs_in() -> None:
    """username + password and username + hash both authenticate; a wrong password does not."""
    from textlocal_sandbox import SandboxConfig, running_sandbox

    config = SandboxConfig(username="ops@example.com", password="pw&1", login_hash="abc123")
    async with running_sandbox("unused-key", config=config) as handle:
        for fields, ok in [
            ([("username", "ops@example.com"), ("password", "pw&1")], True),
            ([("username", "ops@example.com"), ("hash", "abc123")], True),
            ([("username", "ops@example.com"), ("password", "nope")], False),
            ([("username", "someone@example.com"), ("hash", "abc123")], False),
        ]:
            reply = await call(handle, "balance", fields, with_key=False)
            assert (reply["status"] == "success") is ok, (fields, reply)


async def test_no_command_and_unknown_command(sandbox: SandboxHandle) -> None:
    """`/` is error 1 "No command specified"; an unknown path is error 2."""
    root = await raw_call(sandbox.url, "", [("apikey", sandbox.api_key)])
    assert error_code(json.loads(await root.text())) == 1
    assert error_code(await call(sandbox, "send_pigeon")) == 2
    nested = await raw_call(sandbox.url, "send/extra/", [("apikey", sandbox.api_key)])
    assert error_code(json.loads(await nested.text())) == 2


@pytest.mark.parametrize("value", ["1", "true", "TRUE"])
async def test_test_flag_true_values_do_not_store(sandbox: SandboxHandle, value: str) -> None:
    """`test=1`/`true` validates and answers `test_mode: true` but stores and charges nothing."""
    reply = await call(sandbox, "send", [("numbers", NUMBERS), ("message", "x"), ("test", value)])
    assert reply["test_mode"] is True
    assert reply["cost"] == 2
    assert (await sandbox.admin.balance()).sms == 100_000
    assert await sandbox.admin.messages() == []
    assert error_code(await call(sandbox, "status_batch", [("batch_id", reply["batch_id"])])) == 901


@pytest.mark.parametrize("value", ["0", "false", ""])
async def test_test_flag_false_values_send(sandbox: SandboxHandle, value: str) -> None:
    """`test=0`/`false`/empty means a real send."""
    reply = await call(sandbox, "send", [("numbers", NUMBERS), ("message", "x"), ("test", value)])
    assert "test_mode" not in reply
    assert len(await sandbox.admin.messages()) == 2


def php_contacts_json(contacts: list[dict[str, object]]) -> str:
    """PHP's urlencode(json_encode($contacts)): `+` for spaces, numbers as JSON numbers."""
    return quote_plus(json.dumps(contacts, separators=(",", ":")), safe="")


PHP_CONTACTS: list[dict[str, object]] = [
    {
        "number": 447700900101,
        "first_name": "Ann & Co",
        "last_name": "O'Neil",
        "custom1": "C00001",
        "custom2": "",
        "custom3": "",
        "groupID": None,
    },
    {
        "number": 447700900102,
        "first_name": "A+B",
        "last_name": "50% off",
        "custom1": "C00002",
        "custom2": "",
        "custom3": "",
        "groupID": None,
    },
]


async def test_php_create_contacts_bulk_is_decoded(sandbox: SandboxHandle) -> None:
    """PHP's URL-encoded contacts JSON (with `+` spaces, `%2B`, `groupID: null`) is read right."""
    group = await call(sandbox, "create_group", [("name", "Segment A")])
    group_id = str(group["group"]["id"])
    encoded = php_contacts_json(PHP_CONTACTS)
    assert encoded.startswith(
        "%5B%7B%22number%22%3A447700900101%2C%22first_name%22%3A%22Ann+%26+Co"
    )
    fields = [
        ("group_id", group_id),
        ("contacts", encoded),
        ("apiKey", sandbox.api_key),
        ("username", ""),
    ]
    response = await raw_call(sandbox.url, "create_contacts_bulk/", fields, encoding="multipart")
    reply = json.loads(await response.text())
    assert reply["status"] == "success", reply
    assert reply["num_contacts"] == 2
    assert reply["group_id"] == int(group_id)
    view = await sandbox.admin.group_contacts(int(group_id))
    assert [(c.number, c.first_name, c.last_name, c.custom1) for c in view.contacts] == [
        (447700900101, "Ann & Co", "O'Neil", "C00001"),
        (447700900102, "A+B", "50% off", "C00002"),
    ]


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
async def test_plain_json_contacts_are_not_decoded_again(
    sandbox: SandboxHandle, encoding: Encoding
) -> None:
    """Contacts JSON sent as is keeps its literal `+` and `%` (decoded only when not JSON)."""
    contacts = [{"number": "447700900103", "first_name": "A+B 100%25", "last_name": "x"}]
    fields = [("contacts", json.dumps(contacts)), ("apikey", sandbox.api_key)]
    response = await raw_call(sandbox.url, "create_contacts_bulk", fields, encoding=encoding)
    assert json.loads(await response.text())["num_contacts"] == 1
    view = await sandbox.admin.group_contacts(5)
    assert view.contacts[0].first_name == "A+B 100%25"


@pytest.mark.parametrize("encoding", ["urlencoded", "query", "get"])
async def test_php_and_form_contacts_give_the_same_group(
    sandbox: SandboxHandle, encoding: Encoding
) -> None:
    """The same contacts uploaded PHP-style and by a form client end up identical."""
    php_group = (await call(sandbox, "create_group", [("name", "php")]))["group"]["id"]
    form_group = (await call(sandbox, "create_group", [("name", "form")]))["group"]["id"]
    php_reply = await raw_call(
        sandbox.url,
        "create_contacts_bulk/",
        [
            ("group_id", str(php_group)),
            ("contacts", php_contacts_json(PHP_CONTACTS)),
            ("apiKey", sandbox.api_key),
            ("username", ""),
        ],
        encoding="multipart",
    )
    form_reply = await call(
        sandbox,
        "create_contacts_bulk",
        [("group_id", str(form_group)), ("contacts", json.dumps(PHP_CONTACTS))],
        encoding=encoding,
    )
    php_json = json.loads(await php_reply.text())
    assert {**php_json, "group_id": 0} == {**form_reply, "group_id": 0}
    php_view = await sandbox.admin.group_contacts(php_group)
    form_view = await sandbox.admin.group_contacts(form_group)
    assert php_view.contacts == form_view.contacts


async def test_malformed_multipart_answers_json(sandbox: SandboxHandle) -> None:
    """A broken multipart body is read as far as it goes and still gets a JSON answer."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            sandbox.url + "balance/",
            data=b'--xyz\r\nContent-Disposition: form-data; name="apikey"\r\n\r\nnope',
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        ) as response,
    ):
        assert response.status == 200
        assert error_code(json.loads(await response.text())) == 3
