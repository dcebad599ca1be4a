"""Commands and their published reply shapes: credits, opt-outs, groups, contacts, templates,
account calls, and the other commands TextLocal's PHP class wraps."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest

from tests.fixtures_sandbox import call, error_code
from textlocal_sandbox import SandboxConfig, SandboxHandle, running_sandbox

NUMBER = "447700900101"


@pytest.mark.parametrize(
    ("length", "unicode", "parts"),
    [
        (1, False, 1), (160, False, 1), (161, False, 2), (306, False, 2), (307, False, 3),
        (459, False, 3), (460, False, 4), (612, False, 4), (613, False, 5), (765, False, 5),
        (70, True, 1), (71, True, 2), (134, True, 2), (135, True, 3), (335, True, 5),
    ],
)  # fmt: skip
async def test_credits_follow_the_published_table(
    sandbox: SandboxHandle, length: int, unicode: bool, parts: int
) -> None:
    """Parts and cost per recipient follow TextLocal's table (unicode: 70 / 67 per part)."""
    fields = {"numbers": f"{NUMBER},447700900102", "message": "a" * length}
    if unicode:
        fields["unicode"] = "true"
    reply = await call(sandbox, "send", fields)
    assert reply["message"]["num_parts"] == parts
    assert reply["cost"] == 2 * parts
    assert reply["balance"] == 100_000 - 2 * parts
    assert (await sandbox.admin.balance()).sms == 100_000 - 2 * parts


async def test_long_messages_are_truncated(sandbox: SandboxHandle) -> None:
    """A message over 765 characters is cut to 765 and costs 5 credits."""
    reply = await call(sandbox, "send", {"numbers": NUMBER, "message": "b" * 900})
    assert len(reply["message"]["content"]) == 765
    assert reply["cost"] == 5


async def test_insufficient_credits(sandbox: SandboxHandle) -> None:
    """A send costing more than the balance is error 7 and changes nothing."""
    await sandbox.admin.set_balance(sms=1)
    reply = await call(sandbox, "send", {"numbers": f"{NUMBER},447700900102", "message": "x"})
    assert error_code(reply) == 7
    assert await sandbox.admin.messages() == []


async def test_send_reply_shape(sandbox: SandboxHandle) -> None:
    """A send answers balance, batch_id, cost, num_messages, message, receipt_url, custom,
    messages[{id (string), recipient (int)}] and status, in TextLocal's types."""
    reply = await call(
        sandbox,
        "send",
        {"numbers": NUMBER, "message": "x", "custom": "c-1", "receipt_url": "https://r.example/x"},
    )
    assert list(reply) == [
        "balance", "batch_id", "cost", "num_messages", "message", "receipt_url", "custom",
        "messages", "status",
    ]  # fmt: skip
    assert isinstance(reply["batch_id"], int)
    assert reply["messages"] == [{"id": reply["messages"][0]["id"], "recipient": int(NUMBER)}]
    assert (reply["custom"], reply["receipt_url"]) == ("c-1", "https://r.example/x")


async def test_money_as_float() -> None:
    """With money_as_float, balance and cost come as floats (the Webex Interact typing)."""
    async with running_sandbox("k", config=SandboxConfig(money_as_float=True)) as sandbox:
        reply = await call(sandbox, "send", {"numbers": NUMBER, "message": "x"})
        assert reply["cost"] == 1.0
        assert isinstance(reply["cost"], float)
        assert isinstance((await call(sandbox, "balance"))["balance"]["sms"], float)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"message": "x"}, 4),
        ({"numbers": NUMBER}, 5),
        ({"numbers": NUMBER, "message": "%20"}, 5),
        ({"numbers": NUMBER, "group_id": "5", "message": "x"}, 34),
        ({"numbers": "07700,abc", "message": "x"}, 51),
        ({"numbers": ",".join(["447700900101"] * 10_001), "message": "x"}, 33),
        ({"group_id": "999", "message": "x"}, 10),
        ({"group_id": "5", "message": "x"}, 11),
        ({"numbers": NUMBER, "message": "x", "sender": "A"}, 43),
        ({"numbers": NUMBER, "message": "x", "sender": "WayTooLongSenderName"}, 43),
        ({"numbers": NUMBER, "message": "x", "receipt_url": "ftp://x"}, 186),
    ],
)
async def test_send_errors(sandbox: SandboxHandle, fields: dict[str, str], code: int) -> None:
    """Each invalid send gets its published error code."""
    assert error_code(await call(sandbox, "send", fields)) == code


async def test_invalid_and_duplicate_numbers(sandbox: SandboxHandle) -> None:
    """Invalid numbers are skipped with warning 3; a number listed twice gets one message."""
    numbers = f"{NUMBER}, +447700900102,0770090010,{NUMBER},4477009001"
    reply = await call(sandbox, "send", {"numbers": numbers, "message": "x"})
    assert [m["recipient"] for m in reply["messages"]] == [447700900101, 447700900102]
    assert reply["warnings"] == [{"code": 3, "message": "Invalid number"}] * 2


async def test_optouts_are_honoured_only_when_asked(sandbox: SandboxHandle) -> None:
    """With optouts=true, numbers in group 6 are neither sent to nor charged."""
    await sandbox.admin.seed_contacts(6, None, [{"number": 447700900102}])
    group_id = await sandbox.admin.seed_contacts(
        None, "G", [{"number": 447700900101}, {"number": 447700900102}]
    )
    honoured = await call(
        sandbox, "send", {"group_id": str(group_id), "message": "x", "optouts": "true"}
    )
    assert [m["recipient"] for m in honoured["messages"]] == [447700900101]
    assert honoured["cost"] == 1
    ignored = await call(sandbox, "send", {"group_id": str(group_id), "message": "x"})
    assert ignored["num_messages"] == 2
    listed = await call(
        sandbox, "send", {"numbers": "447700900102", "message": "x", "optouts": "1"}
    )
    assert error_code(listed) == 51


async def test_get_optouts_lists_group_6(sandbox: SandboxHandle) -> None:
    """Numbers added to group 6 through the API show in get_optouts with an id and a datetime."""
    await call(sandbox, "create_contacts", {"group_id": "6", "numbers": "447700900105"})
    reply = await call(sandbox, "get_optouts")
    assert reply["num_optouts"] == 1
    assert reply["optouts"][0]["id"] == 1
    assert reply["optouts"][0]["number"] == 447700900105
    assert len(reply["optouts"][0]["datetime"]) == 19
    assert list(reply)[-1] == "status"


async def test_get_optouts_since_a_time_oldest_first(sandbox: SandboxHandle) -> None:
    """`time` keeps the opt-outs from that second on, oldest first; a number that opts out
    again after being removed is a new opt-out with a new id and time."""
    start = await sandbox.admin.set_clock(datetime(2025, 3, 5, 9, 0, tzinfo=UTC))
    assert await sandbox.admin.add_optouts([447700900101, 447700900102]) == [1, 2]
    await sandbox.admin.advance_clock(timedelta(hours=1))
    assert await sandbox.admin.add_optouts([447700900103, 447700900101]) == [3, 1]
    later = int(start.timestamp()) + 3600
    recent = await call(sandbox, "get_optouts", {"time": str(later)})
    assert [(o["id"], o["number"]) for o in recent["optouts"]] == [(3, 447700900103)]
    assert recent["optouts"][0]["datetime"] == "2025-03-05 10:00:00"
    await call(sandbox, "delete_contact", {"group_id": "6", "number": "447700900101"})
    await sandbox.admin.advance_clock(timedelta(hours=1))
    assert await sandbox.admin.add_optouts([447700900101]) == [4]
    every = await call(sandbox, "get_optouts")
    assert [o["id"] for o in every["optouts"]] == [2, 3, 4]
    assert every["num_optouts"] == 3


async def test_groups_lifecycle(sandbox: SandboxHandle) -> None:
    """create_group, get_groups, delete_group with their published errors."""
    groups = await call(sandbox, "get_groups")
    assert groups["groups"] == [
        {"id": 5, "name": "My Contacts", "size": 0},
        {"id": 6, "name": "Opt-outs", "size": 0},
    ]
    assert groups["num_groups"] == 2
    created = await call(sandbox, "create_group", {"name": "Spring Sale"})
    group_id = created["group"]["id"]
    assert created["group"] == {"id": group_id, "name": "Spring Sale"}
    assert error_code(await call(sandbox, "create_group", {"name": "spring sale"})) == 14
    assert error_code(await call(sandbox, "create_group")) == 12
    assert error_code(await call(sandbox, "create_group", {"name": "x" * 51})) == 13
    assert (await call(sandbox, "create_group", {"name": "x" * 50}))["status"] == "success"
    await call(sandbox, "create_contacts", {"group_id": str(group_id), "numbers": NUMBER})
    assert await call(sandbox, "delete_group", {"group_id": str(group_id)}) == {"status": "success"}
    assert error_code(await call(sandbox, "delete_group", {"group_id": str(group_id)})) == 10
    assert error_code(await call(sandbox, "delete_group", {"group_id": "5"})) == 62
    assert error_code(await call(sandbox, "delete_group", {"group_id": "6"})) == 62
    assert error_code(await call(sandbox, "delete_group")) == 25


async def test_contacts_bulk_upsert_and_paging(sandbox: SandboxHandle) -> None:
    """create_contacts_bulk re-adding a number updates it; get_contacts pages in order."""
    group_id = (await call(sandbox, "create_group", {"name": "Seg"}))["group"]["id"]
    contacts = [
        {"number": 447700900100 + i, "first_name": f"N{i}", "custom1": f"C{i}"} for i in range(5)
    ]
    fields = {"group_id": str(group_id), "contacts": json.dumps(contacts)}
    first = await call(sandbox, "create_contacts_bulk", fields)
    assert (first["group_id"], first["num_contacts"]) == (group_id, 5)
    contacts[0]["first_name"] = "Renamed"
    again = await call(
        sandbox, "create_contacts_bulk", fields | {"contacts": json.dumps(contacts[:1])}
    )
    assert again["num_contacts"] == 1
    page = await call(
        sandbox, "get_contacts", {"group_id": str(group_id), "start": "0", "limit": "2"}
    )
    assert (page["num_contacts"], page["start"], page["limit"]) == (5, 0, 2)
    assert page["contacts"][0] == {
        "number": 447700900100, "first_name": "Renamed", "last_name": "",
        "custom1": "C0", "custom2": "", "custom3": "",
    }  # fmt: skip
    rest = await call(
        sandbox, "get_contacts", {"group_id": str(group_id), "start": "4", "limit": "2"}
    )
    assert [c["number"] for c in rest["contacts"]] == [447700900104]
    one = await call(sandbox, "get_contacts", {"group_id": str(group_id), "number": "447700900103"})
    assert [c["custom1"] for c in one["contacts"]] == ["C3"]


async def test_contacts_bulk_errors(sandbox: SandboxHandle) -> None:
    """Invalid JSON → 15, over 1,500 → 33, unknown group → 10, bad numbers → warnings."""
    assert error_code(await call(sandbox, "create_contacts_bulk", {"contacts": "{nope"})) == 15
    many = json.dumps([{"number": 447700000000 + i} for i in range(1_501)])
    assert error_code(await call(sandbox, "create_contacts_bulk", {"contacts": many})) == 33
    exactly = json.dumps([{"number": 447700000000 + i} for i in range(1_500)])
    assert (await call(sandbox, "create_contacts_bulk", {"contacts": exactly}))[
        "num_contacts"
    ] == 1_500
    bad_group = {"group_id": "4242", "contacts": "[]"}
    assert error_code(await call(sandbox, "create_contacts_bulk", bad_group)) == 10
    mixed = json.dumps([{"number": "0770"}, {"number": 447700900101}])
    reply = await call(sandbox, "create_contacts_bulk", {"contacts": mixed})
    assert reply["num_contacts"] == 1
    assert reply["warnings"] == [{"code": 3, "message": "Invalid number"}]


async def test_create_and_delete_contact(sandbox: SandboxHandle) -> None:
    """create_contacts adds numbers (to group 5 by default); delete_contact removes one."""
    created = await call(sandbox, "create_contacts", {"numbers": f"{NUMBER},447700900102"})
    assert created["num_contacts"] == 2
    assert (await sandbox.admin.group_contacts(5)).size == 2
    removed = await call(sandbox, "delete_contact", {"group_id": "5", "number": NUMBER})
    assert removed == {"status": "success"}
    again = await call(sandbox, "delete_contact", {"group_id": "5", "number": NUMBER})
    assert error_code(again) == 61
    assert error_code(await call(sandbox, "delete_contact", {"group_id": "5", "number": "x"})) == 32
    await call(sandbox, "create_contacts", {"numbers": NUMBER})
    view = await sandbox.admin.group_contacts(5)
    assert [c.number for c in view.contacts] == [447700900102, 447700900101]


async def test_templates_reply(sandbox: SandboxHandle) -> None:
    """get_templates lists id, title, body, senderName and isMyDND."""
    (template_id,) = await sandbox.admin.seed_templates(
        [{"title": "OPT_Hi", "body": "Hi [%NAME%]"}]
    )
    reply = await call(sandbox, "get_templates")
    assert reply["templates"] == [
        {
            "id": template_id,
            "title": "OPT_Hi",
            "body": "Hi [%NAME%]",
            "senderName": "TXTLCL",
            "isMyDND": "0",
        }
    ]


async def test_account_commands(sandbox: SandboxHandle) -> None:
    """balance, get_sender_names, get_inboxes, get_messages, check_keyword, create_shorturl."""
    assert (await call(sandbox, "balance"))["balance"] == {"sms": 100_000, "mms": 100}
    names = await call(sandbox, "get_sender_names")
    assert (names["default_sender_name"], names["sender_names"]) == ("TXTLCL", ["TXTLCL"])
    inboxes = await call(sandbox, "get_inboxes")
    inbox_id = inboxes["inboxes"][0]["id"]
    assert inboxes["num_inboxes"] == 1
    assert (await call(sandbox, "get_messages", {"inbox_id": inbox_id}))["messages"] == []
    assert error_code(await call(sandbox, "get_messages", {"inbox_id": "77"})) == 904
    assert (await call(sandbox, "check_keyword", {"keyword": "PIZZA"}))["available"] is True
    assert error_code(await call(sandbox, "check_keyword")) == 905
    short = await call(sandbox, "create_shorturl", {"url": "https://shop.example/p?a=1"})
    assert short["shorturl"].startswith("https://")
    assert error_code(await call(sandbox, "create_shorturl")) == 185
    assert error_code(await call(sandbox, "create_shorturl", {"url": "not a url"})) == 186


async def test_send_mms_is_accepted_and_charged_in_mms_credits(sandbox: SandboxHandle) -> None:
    """send_mms is answered like send, charging MMS credits and logging an mms message."""
    reply = await call(
        sandbox,
        "send_mms",
        {"numbers": NUMBER, "url": "https://cdn.example/a.jpg", "message": quote("Look!")},
    )
    assert reply["status"] == "success", reply
    assert (await sandbox.admin.balance()).mms == 99
    (logged,) = await sandbox.admin.messages()
    assert (logged.kind, logged.text) == ("mms", "Look!")
    assert error_code(await call(sandbox, "send_mms", {"numbers": NUMBER})) == 185


async def test_bulk_json_sends_one_text_per_recipient(sandbox: SandboxHandle) -> None:
    """bulk_json sends each message's own text in one batch; cost sums the parts."""
    data = {
        "sender": "Shop & Co",
        "messages": [
            {"number": "447700900101", "text": "Code A1 for Ann"},
            {"number": 447700900102, "text": "x" * 200},
            {"number": "0770", "text": "bad number"},
        ],
    }
    reply = await call(sandbox, "bulk_json", {"data": json.dumps(data)})
    assert reply["status"] == "success", reply
    assert (reply["num_messages"], reply["cost"]) == (2, 3)
    assert reply["warnings"] == [{"code": 3, "message": "Invalid number"}]
    logged = await sandbox.admin.messages(reply["batch_id"])
    assert [(m.number, m.text, m.sender) for m in logged] == [
        (447700900101, "Code A1 for Ann", "Shop & Co"),
        (447700900102, "x" * 200, "Shop & Co"),
    ]
    test = await call(sandbox, "bulk_json", {"data": json.dumps(data | {"test": True})})
    assert test["test_mode"] is True
    assert error_code(await call(sandbox, "bulk_json", {"data": "[1"})) == 15
    assert error_code(await call(sandbox, "bulk_json", {"data": '{"messages": []}'})) == 4


@pytest.mark.parametrize(
    ("command", "fields"),
    [
        ("send", {"numbers": NUMBER, "message": "x", "schedule_time": "--5"}),
        ("send", {"numbers": NUMBER, "message": "x", "receipt_url": "http://["}),
        ("create_shorturl", {"url": "https://[::1"}),
        ("get_contacts", {"group_id": "5", "start": "--1", "limit": "9" * 40}),
    ],
)
async def test_odd_values_get_an_error_or_a_default(
    sandbox: SandboxHandle, command: str, fields: dict[str, str]
) -> None:
    """Malformed numbers and URLs are refused or defaulted, never a server error."""
    reply = await call(sandbox, command, fields)
    assert reply["status"] in ("success", "failure")


async def test_bulk_json_sender_is_taken_as_written(sandbox: SandboxHandle) -> None:
    """A sender inside bulk_json's JSON is not URL-decoded again: `A+B` stays `A+B` (refused,
    `+` is not allowed in a sender) instead of becoming `A B`."""
    data = {"sender": "A+B", "messages": [{"number": NUMBER, "text": "hi"}]}
    assert error_code(await call(sandbox, "bulk_json", {"data": json.dumps(data)})) == 43
    data["sender"] = "A&B Shop"
    reply = await call(sandbox, "bulk_json", {"data": json.dumps(data)})
    assert reply["message"]["sender"] == "A&B Shop"
