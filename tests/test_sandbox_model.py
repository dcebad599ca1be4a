"""The sandbox's pure parts with plain values: numbers, credits, delivery model, contact storage."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from textlocal_sandbox.contacts import Contact, ContactGroup
from textlocal_sandbox.credits import count_parts, max_length
from textlocal_sandbox.delivery import DeliveryMix, DeliveryModel
from textlocal_sandbox.numbers import invalid_positions, is_valid_number, parse_number
from textlocal_sandbox.wire import params_from_pairs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("447700900123", 447700900123),
        (" +447700900123 ", 447700900123),
        ("353871234567", 353871234567),
        ("07700900123", None),
        ("44770090012", None),
        ("4477009001234", None),
        ("44 7700 900123", None),
        ("١٢٣٤٥٦٧٨٩٠١", None),
        ("", None),
    ],
)
def test_parse_number(text: str, expected: int | None) -> None:
    """International digits only; UK numbers must be 44 + 10 digits."""
    assert parse_number(text) == expected


def test_invalid_positions_fast_path_and_slow_path() -> None:
    """All-UK-mobile batches skip the scan; others report each invalid position."""
    assert invalid_positions(array("q", [447700900001, 447700900002])) == ()
    assert invalid_positions(array("q", [447700900001, 44770090, 353871234567])) == (1,)
    assert not is_valid_number(10**15)


@given(st.integers(min_value=0, max_value=2_000))
def test_parts_grow_with_length_and_stop_at_five(length: int) -> None:
    """Parts never decrease as a message grows, and never exceed 5."""
    for unicode in (False, True):
        parts = count_parts("a" * length, unicode=unicode)
        assert 1 <= parts <= 5
        assert parts <= count_parts("a" * (length + 1), unicode=unicode)
    assert max_length(unicode=False) == 765
    assert max_length(unicode=True) == 335


def test_delivery_mix_must_add_up() -> None:
    """A mix that does not add up to 100 is refused."""
    with pytest.raises(ValueError, match="100"):
        DeliveryMix(90, 5, 0, 0, 0)


@given(st.integers(min_value=10**9, max_value=10**15), st.floats(min_value=0, max_value=10**6))
def test_status_is_pending_then_final_and_statuses_agree(number: int, elapsed_s: float) -> None:
    """One message's status and a batch's statuses agree at every moment."""
    model = DeliveryModel()
    single = model.status(number, 1_000.0, 1_000.0 + elapsed_s)
    assert single in ("P", model.final_status(number))
    assert model.statuses([number], 1_000.0, 1_000.0 + elapsed_s) == [single]


def test_contact_group_upsert_remove_and_order() -> None:
    """A group keeps insertion order across updates, removals and re-adds."""
    group = ContactGroup(7, "g")
    assert group.upsert([Contact(1, "a"), Contact(2), Contact(3, custom3="z")]) == 3
    assert group.upsert([Contact(2, "b")]) == 0
    assert group.remove(1)
    assert not group.remove(1)
    assert group.upsert([Contact(1, "again")]) == 1
    assert [c.number for c in group.page(0, 10)] == [2, 3, 1]
    assert group.get(2) == Contact(2, "b")
    assert group.get(3) == Contact(3, custom3="z")
    assert list(group.numbers()) == [2, 3, 1]


def test_separator_in_a_field_cannot_corrupt_a_record() -> None:
    """A unit separator typed into a name is dropped rather than splitting the record."""
    group = ContactGroup(7, "g")
    group.upsert([Contact(1, "a\x1fb", "c")])
    assert group.get(1) == Contact(1, "ab", "c")


def test_params_merge_and_empty_values() -> None:
    """Later sources win, empty values never hide given ones, apikey is case-insensitive."""
    params = params_from_pairs(
        [("apiKey", "k"), ("message", "q")], [("message", ""), ("APIKEY", ""), ("x", "1")]
    )
    assert params.text("apikey") == "k"
    assert params.text("message") == "q"
    assert params.flag("x")
    assert params.url_decoded("message") == "q"


@given(st.text(alphabet=st.sampled_from(list("ab=&%+;# \x00é€😀2FfC3\r\n?/")), max_size=40))
def test_form_parsing_matches_urllib(text: str) -> None:
    """The fast form parser reads bodies exactly as urllib's parse_qsl does."""
    from urllib.parse import parse_qsl

    from textlocal_sandbox.wire import parse_urlencoded

    assert parse_urlencoded(text) == parse_qsl(text, keep_blank_values=True, errors="replace")
