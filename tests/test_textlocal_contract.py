"""Contract tests: the TextLocal client against the sandbox over real HTTP, for every command
the product uses and the error codes it must recognise.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, timedelta

import pytest

from consumer.errors import TextLocalApiError
from consumer.textlocal import TextLocalClient, TextLocalCredentials, TextLocalSettings
from consumer.textlocal_types import NewContact
from textlocal_sandbox import SandboxConfig, SandboxHandle, running_sandbox

pytestmark = pytest.mark.integration

FIRST_NUMBER = 447_700_100_000
TRICKY_TEXT = "Hi & bye 50%+ £5 = [deal] #1 100% off? %20 +44"


@contextlib.asynccontextmanager
async def client_for(url: str, credentials: TextLocalCredentials) -> AsyncIterator[TextLocalClient]:
    settings = TextLocalSettings(api_url=url, rate_limit_per_s=1000.0, max_concurrency=8)
    async with TextLocalClient(settings, credentials) as client:
        yield client


@pytest.fixture
async def client(sandbox: SandboxHandle) -> AsyncIterator[TextLocalClient]:
    async with client_for(sandbox.url, TextLocalCredentials.from_api_key(sandbox.api_key)) as c:
        yield c


async def api_error(sandbox: SandboxHandle, call: object) -> TextLocalApiError:
    """The TextLocalApiError an awaitable raises, checked to carry no secret."""
    with pytest.raises(TextLocalApiError) as raised:
        await call  # type: ignore[misc]
    error = raised.value
    assert sandbox.api_key not in f"{error!s} {error!r}"
    return error


async def seed_group(sandbox: SandboxHandle, name: str, count: int) -> int:
    """A group of `count` contacts with consecutive numbers and customer ids C0000001…."""
    return await sandbox.admin.generate_contacts(name, count, first_number=FIRST_NUMBER)


# --- account ---------------------------------------------------------------------------------


async def test_balance_and_sender_names(client: TextLocalClient) -> None:
    """balance and get_sender_names read the account as TextLocal reports it."""
    balance = await client.balance()
    assert (balance.sms, balance.mms) == (100_000.0, 100.0)
    names = await client.get_sender_names()
    assert names.default == "TXTLCL"
    assert "TXTLCL" in names.names


async def test_an_account_with_float_credits() -> None:
    """After the Webex Interact migration balance and cost are floats; both still parse."""
    api_key = secrets.token_hex(8)
    async with (
        running_sandbox(api_key, config=SandboxConfig(money_as_float=True)) as sandbox,
        client_for(sandbox.url, TextLocalCredentials.from_api_key(api_key)) as client,
    ):
        assert (await client.balance()).sms == 100_000.0
        sent = await client.send(message="Hello", numbers=["447700900001"])
        assert (sent.cost, sent.balance) == (1.0, 99_999.0)


async def test_templates(sandbox: SandboxHandle, client: TextLocalClient) -> None:
    """get_templates returns every template with its id, title, body and sender."""
    ids = await sandbox.admin.seed_templates(
        [
            {"title": "OPT_Welcome", "body": "Hi, use [code] & save 10%", "sender_name": "SHOP"},
            {"title": "Other", "body": "Plain"},
        ]
    )
    templates = {t.id: t for t in await client.get_templates()}
    assert set(templates) == set(ids)
    welcome = templates[ids[0]]
    assert (welcome.title, welcome.body, welcome.sender_name) == (
        "OPT_Welcome",
        "Hi, use [code] & save 10%",
        "SHOP",
    )


@pytest.mark.parametrize("way", ["password", "hash"])
async def test_username_logins(way: str) -> None:
    """A username with its password or hash logs in; a wrong one is error 3."""
    config = SandboxConfig(password="Right-Password-1", login_hash="Right-Hash-1")
    if way == "password":
        right = TextLocalCredentials.from_password(config.username, "Right-Password-1")
        wrong = TextLocalCredentials.from_password(config.username, "Wrong-Secret")
    else:
        right = TextLocalCredentials.from_hash(config.username, "Right-Hash-1")
        wrong = TextLocalCredentials.from_hash(config.username, "Wrong-Secret")
    async with running_sandbox(secrets.token_hex(8), config=config) as sandbox:
        async with client_for(sandbox.url, right) as client:
            assert (await client.balance()).sms == 100_000.0
        async with client_for(sandbox.url, wrong) as client:
            with pytest.raises(TextLocalApiError) as raised:
                await client.balance()
    assert raised.value.code == 3
    assert "Wrong-Secret" not in f"{raised.value!s} {raised.value!r}"


async def test_invalid_login_is_error_3(sandbox: SandboxHandle) -> None:
    """A wrong API key is TextLocal error 3, and the exception does not show the key."""
    wrong = TextLocalCredentials.from_api_key("not-the-key-0123")
    async with client_for(sandbox.url, wrong) as client:
        with pytest.raises(TextLocalApiError) as raised:
            await client.get_groups()
    assert (raised.value.code, raised.value.message) == (3, "Invalid login details")
    assert "not-the-key-0123" not in f"{raised.value!s} {raised.value!r}"


# --- groups and contacts --------------------------------------------------------------------


async def test_group_lifecycle(sandbox: SandboxHandle, client: TextLocalClient) -> None:
    """create_group, its error 14 on a taken name, contacts added and read, delete_group."""
    group = await client.create_group("OPT_campaign-1")
    assert (group.name, group.size) == ("OPT_campaign-1", 0)
    assert (await api_error(sandbox, client.create_group("OPT_campaign-1"))).code == 14

    contacts = [
        NewContact("447700900001", "Ann & Co", "Lee", custom1="C+1"),
        NewContact("447700900002", custom1="C2"),
        NewContact("447700900003", custom1="C3", custom3="x"),
    ]
    assert await client.create_contacts_bulk(group.id, contacts) == 3
    groups = {g.id: g for g in await client.get_groups()}
    assert groups[group.id].size == 3
    assert {5, 6} <= set(groups)  # My Contacts and the opt-outs are always there

    page = await client.get_contacts(group.id)
    assert (page.group_id, page.num_contacts) == (group.id, 3)
    by_number = {c.number: c for c in page.contacts}
    first = by_number["447700900001"]
    assert (first.first_name, first.last_name, first.custom1) == ("Ann & Co", "Lee", "C+1")
    assert by_number["447700900003"].custom3 == "x"

    await client.delete_group(group.id)
    assert group.id not in {g.id for g in await client.get_groups()}
    assert (await api_error(sandbox, client.delete_group(group.id))).code == 10


async def test_group_name_errors(sandbox: SandboxHandle, client: TextLocalClient) -> None:
    """An empty group name is error 12, a too long one 13; a built-in group cannot go (62)."""
    assert (await api_error(sandbox, client.create_group(""))).code == 12
    assert (await api_error(sandbox, client.create_group("x" * 200))).code == 13
    assert (await api_error(sandbox, client.delete_group(5))).code == 62


async def test_contacts_of_an_unknown_group_are_error_10(
    sandbox: SandboxHandle, client: TextLocalClient
) -> None:
    """get_contacts and create_contacts_bulk on a group that does not exist: error 10."""
    assert (await api_error(sandbox, client.get_contacts(424242))).code == 10
    call = client.create_contacts_bulk(424242, [NewContact("447700900001")])
    assert (await api_error(sandbox, call)).code == 10


async def test_contacts_are_paged(sandbox: SandboxHandle, client: TextLocalClient) -> None:
    """iter_contacts walks a 2,500-contact group in pages of 1,000 and sees each contact once."""
    group_id = await seed_group(sandbox, "master", 2500)
    pages = [page async for page in client.iter_contacts(group_id)]
    assert [len(page) for page in pages] == [1000, 1000, 500]
    numbers = [c.number for page in pages for c in page]
    assert len(set(numbers)) == 2500
    assert pages[0][0].custom1 == "C0000001"
    last_page = await client.get_contacts(group_id, start=2000, limit=1000)
    assert (last_page.start, last_page.num_contacts, len(last_page.contacts)) == (2000, 2500, 500)


async def test_adding_the_same_contacts_twice_changes_nothing(
    sandbox: SandboxHandle, client: TextLocalClient
) -> None:
    """create_contacts_bulk is safe to repeat: the group keeps one contact per number."""
    group = await client.create_group("segment")
    chunk = [NewContact(str(FIRST_NUMBER + n), custom1=f"C{n}") for n in range(1500)]
    await client.create_contacts_bulk(group.id, chunk)
    await client.create_contacts_bulk(group.id, chunk)
    assert await sandbox.admin.group_size(group.id) == 1500


# --- sending -------------------------------------------------------------------------------


async def test_send_to_a_group_and_follow_its_delivery(
    sandbox: SandboxHandle, client: TextLocalClient
) -> None:
    """A group send is accepted once with the exact text, and status_batch counts its outcomes."""
    group_id = await seed_group(sandbox, "OPT_c1", 100)
    sent = await client.send(
        message=TRICKY_TEXT, group_id=group_id, sender="Shop & Co", custom="c-1", optouts=True
    )
    assert (sent.num_messages, sent.cost, sent.num_parts, sent.test_mode) == (100, 100.0, 1, False)
    assert (sent.sender, sent.content, sent.balance) == ("Shop & Co", TRICKY_TEXT, 99_900.0)
    assert sent.batch_id is not None

    logged = await sandbox.admin.messages(sent.batch_id)
    assert len(logged) == 100
    assert {m.text for m in logged} == {TRICKY_TEXT}
    assert {m.sender for m in logged} == {"Shop & Co"}
    assert [b.custom for b in await sandbox.admin.batches()] == ["c-1"]

    at_once = await client.status_batch(sent.batch_id)
    assert (at_once.batch_id, at_once.num_messages) == (sent.batch_id, 100)
    assert (
        at_once.pending
        + at_once.delivered
        + at_once.undelivered
        + at_once.invalid
        + (at_once.expired + at_once.unknown)
        == 100
    )

    await sandbox.admin.advance_clock(timedelta(days=5))
    settled = await client.status_batch(sent.batch_id)
    # The sandbox's default mix, by the numbers' last two digits 00..99.
    assert (settled.delivered, settled.undelivered, settled.invalid) == (90, 4, 2)
    assert (settled.expired, settled.unknown, settled.pending) == (2, 2, 0)


async def test_send_to_numbers_in_test_mode(
    sandbox: SandboxHandle, client: TextLocalClient
) -> None:
    """A test send is answered but neither sent nor charged, and its batch cannot be queried."""
    sent = await client.send(
        message="Hello", numbers=["447700900001", 447700900002], test=True, unicode=True
    )
    assert sent.test_mode
    assert sent.num_messages == 2
    assert await sandbox.admin.messages() == []
    assert (await client.balance()).sms == 100_000.0
    if sent.batch_id is not None:
        assert (await api_error(sandbox, client.status_batch(sent.batch_id))).code == 901


async def test_send_options_reach_the_batch(
    sandbox: SandboxHandle, client: TextLocalClient
) -> None:
    """validity and receipt_url are accepted, and a long message costs several parts."""
    now = sandbox.clock.now()
    sent = await client.send(
        message="x" * 200,
        numbers=["447700900001"],
        validity=now + timedelta(hours=24),
        receipt_url="http://127.0.0.1:9/receipts",
    )
    assert (sent.num_parts, sent.cost) == (2, 2.0)


@pytest.mark.parametrize(
    ("arguments", "code"),
    [
        ({"group_id": 424242}, 10),
        ({"numbers": ["447700900001"], "sender": "X"}, 43),
        ({"numbers": ["447700900001"], "message": ""}, 5),
    ],
)
async def test_send_errors(
    sandbox: SandboxHandle, client: TextLocalClient, arguments: dict[str, object], code: int
) -> None:
    """An unknown group (10), a bad sender (43) and an empty message (5) are refused."""
    fields: dict[str, object] = {"message": "Hello", **arguments}
    assert (await api_error(sandbox, client.send(**fields))).code == code  # type: ignore[arg-type]


async def test_send_to_an_empty_group_is_error_11(
    sandbox: SandboxHandle, client: TextLocalClient
) -> None:
    """Sending to a group without contacts is error 11."""
    group = await client.create_group("empty")
    assert (await api_error(sandbox, client.send(message="Hi", group_id=group.id))).code == 11


async def test_insufficient_credits_is_error_7(
    sandbox: SandboxHandle, client: TextLocalClient
) -> None:
    """A send costing more than the balance is error 7, and nothing is sent."""
    await sandbox.admin.set_balance(sms=1)
    call = client.send(message="Hi", numbers=["447700900001", "447700900002"])
    assert (await api_error(sandbox, call)).code == 7
    assert await sandbox.admin.messages() == []


async def test_schedule_in_the_past_is_error_9(
    sandbox: SandboxHandle, client: TextLocalClient
) -> None:
    """A schedule time before TextLocal's now is error 9."""
    past = sandbox.clock.now() - timedelta(hours=1)
    call = client.send(message="Hi", numbers=["447700900001"], schedule_time=past)
    assert (await api_error(sandbox, call)).code == 9


async def test_scheduled_send_is_listed_and_cancelled(
    sandbox: SandboxHandle, client: TextLocalClient
) -> None:
    """A future send appears in get_scheduled (UTC time, group, count) until cancelled."""
    group_id = await seed_group(sandbox, "OPT_c2", 10)
    when = (sandbox.clock.now() + timedelta(days=1)).replace(microsecond=0)
    sent = await client.send(message="Later", group_id=group_id, schedule_time=when)
    [scheduled] = await client.get_scheduled()
    assert scheduled.id == sent.batch_id
    assert scheduled.scheduled_for == when.astimezone(UTC)
    assert (scheduled.group_id, scheduled.group_name, scheduled.how_many) == (
        group_id,
        "OPT_c2",
        10,
    )
    assert scheduled.message == "Later"

    await client.cancel_scheduled(scheduled.id)
    assert await client.get_scheduled() == []
    assert (await api_error(sandbox, client.cancel_scheduled(scheduled.id))).code == 903
    await sandbox.admin.advance_clock(timedelta(days=2))
    assert await sandbox.admin.messages() == []


async def test_history_of_group_sends(sandbox: SandboxHandle, client: TextLocalClient) -> None:
    """get_history_group lists group sends in the window, paged, newest first by default."""
    group_id = await seed_group(sandbox, "OPT_c3", 3)
    since = sandbox.clock.now() - timedelta(seconds=1)
    batch_ids = []
    for n in range(3):
        sent = await client.send(message=f"Send {n}", group_id=group_id)
        batch_ids.append(sent.batch_id)
        await sandbox.admin.advance_clock(timedelta(minutes=1))
    await client.send(message="Not a group send", numbers=["447700900001"])

    page = await client.get_history_group(min_time=since, max_time=sandbox.clock.now())
    assert page.total == 3
    assert [e.batch_id for e in page.entries] == batch_ids[::-1]
    newest = page.entries[0]
    assert (newest.group_id, newest.group_name, newest.num_credits) == (group_id, "OPT_c3", 3.0)
    assert newest.sent_at.tzinfo is not None
    assert since <= newest.sent_at <= sandbox.clock.now()

    pages = [
        p async for p in client.iter_history_group(min_time=since, page_size=2, sort_order="asc")
    ]
    assert [[e.batch_id for e in p] for p in pages] == [batch_ids[:2], batch_ids[2:]]


async def test_bulk_json_sends_personal_texts(
    sandbox: SandboxHandle, client: TextLocalClient
) -> None:
    """bulk_json sends each number its own text, once, in one batch."""
    result = await client.bulk_json(
        [("447700900001", "Hi Ann, code A1 & 10% off"), ("447700900002", "Hi Bob, code B2")],
        sender="SHOP",
    )
    assert result.num_messages == 2
    assert len(result.batch_ids) == 1
    logged = await sandbox.admin.messages(result.batch_ids[0])
    assert {(m.number, m.text, m.sender) for m in logged} == {
        (447700900001, "Hi Ann, code A1 & 10% off", "SHOP"),
        (447700900002, "Hi Bob, code B2", "SHOP"),
    }


async def test_bulk_json_in_test_mode_sends_nothing(
    sandbox: SandboxHandle, client: TextLocalClient
) -> None:
    """A test bulk_json is answered but not sent."""
    result = await client.bulk_json([("447700900001", "Hi")], test=True)
    assert result.num_messages == 1
    assert await sandbox.admin.messages() == []


@pytest.mark.slow
async def test_a_million_recipient_group_send(
    sandbox: SandboxHandle, client: TextLocalClient
) -> None:
    """A send to a 1M-contact group and its status report come back as counts."""
    group_id = await sandbox.admin.generate_contacts("big", 1_000_000, first_number=FIRST_NUMBER)
    await sandbox.admin.set_balance(sms=2_000_000)
    sent = await client.send(message="Hi", group_id=group_id)
    assert (sent.num_messages, sent.cost) == (1_000_000, 1_000_000.0)
    assert sent.batch_id is not None
    await sandbox.admin.advance_clock(timedelta(days=5))
    status = await client.status_batch(sent.batch_id)
    assert (status.num_messages, status.delivered, status.pending) == (1_000_000, 900_000, 0)
