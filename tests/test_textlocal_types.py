"""Reply parsing with plain values: TextLocal's typing quirks, and skipping per-recipient arrays."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.textlocal_types import (
    Balance,
    Contact,
    JsonObject,
    MalformedReply,
    MessageStatusBuffer,
    MessageStatuses,
    NewContact,
    OptOut,
    SendResult,
    TopLevelArraySkipper,
    failure_of,
    parse_balance,
    parse_batch_status,
    parse_bulk,
    parse_contacts_page,
    parse_created_group,
    parse_groups,
    parse_history_page,
    parse_message_statuses,
    parse_optouts,
    parse_scheduled,
    parse_send,
    parse_sender_names,
    parse_templates,
    skip_top_level_arrays,
)

MESSAGES = frozenset({"messages"})


def test_send_reply_with_int_credits() -> None:
    """A classic send reply (ints for balance and cost) becomes a SendResult."""
    reply = {
        "status": "success",
        "balance": 1162,
        "batch_id": 123456789,
        "cost": 2,
        "num_messages": 2,
        "message": {"num_parts": 1, "sender": "Jims Autos", "content": "Hi there"},
        "receipt_url": "",
        "custom": "",
        "messages": [],
    }
    assert parse_send(reply) == SendResult(
        batch_id=123456789,
        cost=2.0,
        num_messages=2,
        num_parts=1,
        sender="Jims Autos",
        content="Hi there",
        test_mode=False,
        balance=1162.0,
    )


def test_send_reply_with_float_credits_and_string_ids() -> None:
    """Webex-era floats and ids as strings are accepted."""
    reply = {
        "status": "success",
        "balance": "1161.5",
        "batch_id": "987",
        "cost": 0.5,
        "num_messages": "1",
        "message": {"num_parts": "2", "sender": "Shop", "content": "x"},
    }
    result = parse_send(reply)
    assert (result.batch_id, result.cost, result.balance, result.num_parts) == (987, 0.5, 1161.5, 2)


def test_test_mode_send_may_lack_a_batch_id() -> None:
    """A test send is not stored, so a missing batch id is accepted only in test mode."""
    reply = {"status": "success", "test_mode": True, "num_messages": 1, "cost": 1, "balance": 5}
    assert parse_send(reply).batch_id is None
    with pytest.raises(MalformedReply, match="batch_id"):
        parse_send({"status": "success", "num_messages": 1})


def test_send_result_repr_hides_the_message_body() -> None:
    """The message body is left out of SendResult's repr, so logging a result is safe."""
    result = parse_send(
        {"batch_id": 1, "num_messages": 1, "message": {"content": "SECRET-PROMO-42"}}
    )
    assert "SECRET-PROMO-42" not in repr(result)


def test_malformed_field_is_named_without_its_value() -> None:
    """A mistyped field is reported by name; the offending value is not echoed."""
    with pytest.raises(MalformedReply) as raised:
        parse_send({"batch_id": "447700900123x", "num_messages": 1})
    assert "batch_id" in str(raised.value)
    assert "447700900123" not in str(raised.value)


def test_templates_on_both_services() -> None:
    """Templates parse with or without the India service's senderName and isMyDND."""
    reply = {
        "templates": [
            {"id": "42", "title": "OPT_Welcome", "body": "Hi [First Name]"},
            {"id": 7, "title": "OPT_Bye", "body": "Bye", "senderName": "SHOP", "isMyDND": "n"},
        ]
    }
    templates = parse_templates(reply)
    assert [(t.id, t.title, t.sender_name) for t in templates] == [
        (42, "OPT_Welcome", None),
        (7, "OPT_Bye", "SHOP"),
    ]


def test_groups_and_created_group() -> None:
    """Group ids and sizes given as strings or ints both parse; a new group has size 0."""
    groups = parse_groups(
        {"groups": [{"id": "5", "name": "My Contacts", "size": "12"}, {"id": 9, "name": "X"}]}
    )
    assert [(g.id, g.name, g.size) for g in groups] == [(5, "My Contacts", 12), (9, "X", 0)]
    created = parse_created_group({"group": {"id": 31, "name": "OPT_c1"}})
    assert (created.id, created.name, created.size) == (31, "OPT_c1", 0)


def test_contacts_page_with_numeric_numbers() -> None:
    """Numbers arrive as JSON numbers and become digit strings; missing fields become ""."""
    page = parse_contacts_page(
        {
            "group_id": 5,
            "start": 0,
            "limit": 2,
            "num_contacts": 2,
            "contacts": [
                {"number": 447700900001, "first_name": "Ann", "custom1": "C-1"},
                {"number": "447700900002", "first_name": "Bob", "last_name": None},
            ],
        },
        group_id=5,
        start=0,
        limit=2,
    )
    assert page.contacts[0] == Contact("447700900001", "Ann", "", "C-1", "", "")
    assert page.contacts[1].number == "447700900002"
    assert page.contacts[1].last_name == ""


def test_contact_reprs_hide_personal_data() -> None:
    """Contacts' reprs leave out the number and the names."""
    shown = repr(Contact("447700900001", "Ann", "Lee", "C-1", "", "")) + repr(
        NewContact("447700900001", "Ann", "Lee", "C-1")
    )
    for personal in ("447700900001", "Ann", "Lee"):
        assert personal not in shown
    assert "C-1" in shown


def test_batch_status_pending_is_the_remainder() -> None:
    """Without num_pending, pending is what is not yet delivered, undelivered, invalid, ..."""
    status = parse_batch_status(
        {
            "batch_id": "77",
            "num_messages": 10,
            "num_delivered": 5,
            "num_undelivered": 1,
            "num_invalid": 1,
            "num_expired": 0,
            "num_unknown": "1",
        }
    )
    assert (status.batch_id, status.delivered, status.unknown, status.pending) == (77, 5, 1, 2)


def test_batch_status_uses_a_given_pending_count() -> None:
    """A reply that does count pending messages is believed."""
    status = parse_batch_status({"batch_id": 1, "num_messages": 4, "num_pending": 4})
    assert status.pending == 4


def test_scheduled_sends_are_all_strings() -> None:
    """get_scheduled's all-string entries parse, with scheduledFor as an aware UTC datetime."""
    scheduled = parse_scheduled(
        {
            "scheduled": [
                {
                    "id": "123",
                    "scheduledFor": "2025-03-02-09-30-00",
                    "howmany": "1500",
                    "message": "Hello",
                    "origin": "API",
                    "groupName": "OPT_c1",
                    "groupid": "31",
                },
                {"id": "124", "scheduledFor": "2025-03-02 10:00:00", "groupid": ""},
                {"id": "125", "scheduledFor": "1740909600", "groupid": "0"},
            ]
        }
    )
    assert scheduled[0].scheduled_for == datetime(2025, 3, 2, 9, 30, tzinfo=UTC)
    assert (scheduled[0].id, scheduled[0].group_id, scheduled[0].how_many) == (123, 31, 1500)
    assert scheduled[1].group_id is None
    assert scheduled[1].scheduled_for == datetime(2025, 3, 2, 10, 0, tzinfo=UTC)
    assert scheduled[2].group_id is None
    assert scheduled[2].scheduled_for == datetime(2025, 3, 2, 10, 0, tzinfo=UTC)


def test_history_page() -> None:
    """get_history_group's page parses with its paging fields and UTC send times."""
    page = parse_history_page(
        {
            "messages": [
                {
                    "batch_id": 55,
                    "group_id": "31",
                    "group_name": "OPT_c1",
                    "message": "Hi",
                    "datetime": "2025-03-01 08:00:01",
                    "num_credits": "1500",
                }
            ],
            "start": 0,
            "limit": 1000,
            "total": "1",
        },
        start=0,
        limit=1000,
    )
    entry = page.entries[0]
    assert (page.total, entry.batch_id, entry.group_id, entry.num_credits) == (1, 55, 31, 1500.0)
    assert entry.sent_at == datetime(2025, 3, 1, 8, 0, 1, tzinfo=UTC)


def test_balance_and_sender_names() -> None:
    """Balance accepts ints and floats; sender names come as a tuple with the default."""
    assert parse_balance({"balance": {"sms": 1162, "mms": 0.5}}) == Balance(1162.0, 0.5)
    names = parse_sender_names({"default_sender_name": "SHOP", "sender_names": ["SHOP", "Deals"]})
    assert (names.default, names.names) == ("SHOP", ("SHOP", "Deals"))


def test_bulk_reply_is_tolerant() -> None:
    """bulk_json's unpublished reply is read for whatever counts and batch ids it has."""
    result = parse_bulk(
        {
            "status": "success",
            "balance_post_send": 90,
            "messages": [{"batch_id": 5, "number": 1}, {"batch_id": "5"}, {"batch_id": 6}],
        }
    )
    assert (result.num_messages, result.batch_ids, result.balance, result.cost) == (
        3,
        (5, 6),
        90.0,
        None,
    )


def test_failure_reply_gives_the_first_error() -> None:
    """A failure reply yields its first error's code and message; success yields None."""
    reply = {"status": "failure", "errors": [{"code": "10", "message": "Invalid group ID"}]}
    assert failure_of(reply) == (10, "Invalid group ID")
    assert failure_of({"status": "success"}) is None
    with pytest.raises(MalformedReply):
        failure_of({"status": "failure", "errors": []})
    with pytest.raises(MalformedReply):
        failure_of({"result": "ok"})


# --- skipping per-recipient arrays -----------------------------------------------------------


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_skipper_drops_only_the_top_level_array() -> None:
    """The top-level `messages` array becomes []; a nested one and everything else is kept."""
    reply = {
        "status": "success",
        "messages": [{"id": "1", "recipient": 447700900001, "odd": 'a]["\\'}],
        "message": {"content": 'brackets [ ] { } and "quotes"'},
        "nested": {"messages": [1, 2]},
        "after": [1, [2, 3]],
    }
    kept = skip_top_level_arrays(json.dumps(reply).encode(), MESSAGES)
    assert kept == {**reply, "messages": []}


def test_skipper_handles_a_key_that_merely_ends_in_messages() -> None:
    """A key spelled with an escaped quote before "messages" is not mistaken for it."""
    raw = b'{"x\\"messages": [1, 2], "messages": [3]}'
    assert skip_top_level_arrays(raw, MESSAGES) == {'x"messages': [1, 2], "messages": []}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab[]{}",:\\ é\n', max_size=6),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["messages", "a", "b[", '"]']), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    reply=st.dictionaries(st.sampled_from(["messages", "status", "x", "m"]), json_values),
    chunk_size=st.integers(min_value=1, max_value=40),
    indent=st.sampled_from([None, 1]),
)
def test_skipper_agrees_with_json_whatever_the_chunking(
    reply: dict[str, object], chunk_size: int, indent: int | None
) -> None:
    """For any object and any chunk boundaries, the result is json.loads minus the array."""
    raw = json.dumps(reply, indent=indent).encode()
    expected = dict(reply)
    if isinstance(expected.get("messages"), list):
        expected["messages"] = []
    assert skip_top_level_arrays(_chunks(raw, chunk_size), MESSAGES) == expected


def test_skipper_refuses_truncated_replies() -> None:
    """A reply cut off inside the skipped array is malformed, not an empty list."""
    skipper = TopLevelArraySkipper(MESSAGES)
    skipper.feed(b'{"batch_id": 1, "messages": [{"id": "1"},')
    with pytest.raises(MalformedReply, match="truncated"):
        skipper.result()


def test_skipper_bounds_what_it_keeps() -> None:
    """A reply whose kept part exceeds the bound is refused rather than held."""
    skipper = TopLevelArraySkipper(MESSAGES, max_kept_bytes=100)
    with pytest.raises(MalformedReply, match="larger"):
        skipper.feed(json.dumps({"other": ["x" * 200]}).encode())


def million_recipient_send_reply(recipients: int) -> Iterator[bytes]:
    """A send reply listing `recipients` messages, produced in ~64 KB chunks, never whole."""
    yield (
        b'{"status":"success","balance":1234.5,"batch_id":4242,"cost":1000000,'
        b'"num_messages":' + str(recipients).encode() + b","
        b'"message":{"num_parts":1,"sender":"Shop","content":"Hi [there]"},'
        b'"receipt_url":"","custom":"c-1","messages":['
    )
    per_chunk = 1500
    for first in range(0, recipients, per_chunk):
        last = min(first + per_chunk, recipients)
        entries = ",".join(
            f'{{"id":"{9_000_000_000 + n}","recipient":{447_700_000_000 + n}}}'
            for n in range(first, last)
        )
        yield (b"," if first else b"") + entries.encode()
    yield b'],"test_mode":false}'


def test_million_recipient_reply_is_parsed_in_little_memory() -> None:
    """A 1M-recipient send reply (~45 MB) parses to the right counts with a small peak."""
    recipients = 1_000_000
    # Produced before tracing starts, so the peak below is the parser's alone.
    chunks = list(million_recipient_send_reply(recipients))
    total_bytes = sum(map(len, chunks))
    skipper = TopLevelArraySkipper(MESSAGES)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        for chunk in chunks:
            skipper.feed(chunk)
        result = parse_send(skipper.result())
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed_s = time.perf_counter() - started
    print(
        f"\n1M-recipient send reply: {total_bytes / 1e6:.1f} MB parsed in {elapsed_s:.2f}s, "
        f"peak traced allocation {peak_bytes / 1e3:.1f} KB"
    )
    assert total_bytes > 40_000_000
    assert (result.batch_id, result.num_messages, result.cost) == (4242, recipients, 1000000.0)
    assert result.content == "Hi [there]"
    assert peak_bytes < 1_000_000


# --- capturing the per-message statuses -------------------------------------------------------


def capture_all(chunks: list[bytes]) -> tuple[list[object], JsonObject]:
    skipper = TopLevelArraySkipper(MESSAGES, capture="messages")
    items: list[object] = []
    for chunk in chunks:
        skipper.feed(chunk)
        items += skipper.take_items()
    return items, skipper.result()


@given(
    messages=st.lists(
        st.fixed_dictionaries(
            {
                "recipient": st.integers(min_value=10**9, max_value=10**14),
                "status": st.sampled_from(["D", "U", "P", "I", "E", "?"]),
            },
            optional={"id": st.text(alphabet='ab[]{}",:\\ é', max_size=5)},
        ),
        max_size=8,
    ),
    chunk_size=st.integers(min_value=1, max_value=40),
    indent=st.sampled_from([None, 1]),
)
def test_captured_messages_agree_with_json_whatever_the_chunking(
    messages: list[dict[str, object]], chunk_size: int, indent: int | None
) -> None:
    """For any chunk boundaries, the captured elements are the array's, in order, and the rest
    of the reply is json.loads' with the array emptied."""
    reply = {"batch_id": 7, "messages": messages, "num_messages": len(messages), "z": [1]}
    raw = json.dumps(reply, indent=indent).encode()
    items, rest = capture_all(_chunks(raw, chunk_size))
    assert items == messages
    assert rest == {**reply, "messages": []}


def test_captured_statuses_are_numbers_and_letters() -> None:
    """Recipients as ints or digit strings become digit strings beside their letters."""
    raw = (
        b'{"messages":[{"recipient":447700900001,"status":"D"},'
        b'{"recipient":"447700900002","status":"P"}]}'
    )
    items, _ = capture_all([raw])
    statuses = parse_message_statuses(items)
    assert statuses.numbers == ("447700900001", "447700900002")
    assert statuses.statuses == ("D", "P")
    assert "4477" not in repr(statuses)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages":[{"recipient":1,"status":"D"} {"recipient":2,"status":"D"}]}',
        b'{"messages":[,{"recipient":1,"status":"D"}]}',
        b'{"messages":[1, 2]}',
        b'{"messages":[{"recipient":{"nested":1},"status":"D"}]}',
    ],
)
def test_a_per_message_list_not_as_documented_is_malformed(raw: bytes) -> None:
    """Missing commas, non-objects or nested objects in the list are refused, not guessed."""

    def read() -> None:
        items, _ = capture_all(_chunks(raw, 5))
        parse_message_statuses(items)

    with pytest.raises(MalformedReply, match=r"per-message|truncated"):
        read()


def test_a_reply_cut_inside_the_captured_list_is_truncated() -> None:
    """A reply ending inside the per-message list is malformed."""
    skipper = TopLevelArraySkipper(MESSAGES, capture="messages")
    skipper.feed(b'{"batch_id": 1, "messages": [{"recipient": 1, "status": "D"},')
    with pytest.raises(MalformedReply, match="truncated"):
        skipper.result()


def test_optouts_reply_with_and_without_ids() -> None:
    """get_optouts entries: number (int or text) and datetime; `id` when the reply has one; a
    reply without the list has no opt-outs."""
    reply = {
        "optouts": [
            {"id": "12", "number": 447700900101, "datetime": "2025-03-05 09:10:11"},
            {"number": " 447700900102 ", "datetime": 1741166400},
        ],
        "num_optouts": 2,
        "status": "success",
    }
    assert parse_optouts(reply) == [
        OptOut("447700900101", datetime(2025, 3, 5, 9, 10, 11, tzinfo=UTC), 12),
        OptOut("447700900102", datetime(2025, 3, 5, 9, 20, tzinfo=UTC), None),
    ]
    assert parse_optouts({"status": "success"}) == []


def test_an_optout_without_a_number_is_malformed_and_not_quoted() -> None:
    """A missing number or time is a MalformedReply naming the field, never echoing values."""
    with pytest.raises(MalformedReply, match="'number' is missing"):
        parse_optouts({"optouts": [{"datetime": "2025-03-05 09:10:11"}]})
    with pytest.raises(MalformedReply) as bad_time:
        parse_optouts({"optouts": [{"number": 447700900101, "datetime": "yesterday"}]})
    assert "447700900101" not in str(bad_time.value)


def test_a_status_buffer_gives_back_its_runs_in_order() -> None:
    """Runs come back as they went in, odd ones (a comma in a number, a two-letter status)
    included, each once; the buffer counts messages and empties as it is drained."""
    plain = MessageStatuses(("447700000001", "447700000002"), ("D", "P"))
    odd = MessageStatuses(("44,77", "447700000003"), ("D", "XX"))
    buffer = MessageStatusBuffer()
    for run in (plain, MessageStatuses((), ()), odd, plain):
        buffer.add(run)
    assert len(buffer) == 6
    assert "4477" not in repr(buffer)
    assert list(buffer.drain()) == [plain, odd, plain]
    assert len(buffer) == 0
    buffer.add(plain)
    buffer.clear()
    assert list(buffer.drain()) == []
