"""The campaign rules as pure functions: plain values in, decisions out."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.events import (
    EVENT_ID_NAMESPACE,
    CampaignRef,
    CampaignScheduled,
    StatusError,
    output_event_id,
)
from consumer.workflow import (
    _GSM_BASIC,
    _GSM_EXTENSION,
    CampaignState,
    ContactGroup,
    IntakeLimits,
    Step,
    contact_group_for,
    identity_problem,
    message_cost,
    next_step,
    normalise_number,
    poll_count,
    poll_slot,
    render_message,
    retry_delay,
    segment_group_name,
    sender_problem,
    short_reference,
    validate_scheduled,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
GROUPS = (
    ContactGroup(10, "UK", "OPT_", "custom1"),
    ContactGroup(11, "UK VIP", "OPT_VIP_", "custom2", sender="ShopVIP"),
)
HEADER = CampaignScheduled(
    event_id="e1",
    occurred_at=NOW,
    ref=CampaignRef(42, "2.38", 505),
    template_id=7,
    template_name="OPT_Welcome",
    scheduled_at=NOW,
    message_type="SMS",
    recipient_count=100,
    batch_count=1,
)


def problem(**changes: object) -> str | None:
    error = validate_scheduled(replace(HEADER, **changes), GROUPS, NOW, IntakeLimits())  # type: ignore[arg-type]
    return None if error is None else error.code


def test_valid_header_passes() -> None:
    """A complete SMS header for a known prefix, due now, is accepted."""
    assert problem() is None


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"message_type": "MMS"}, "MMS_NOT_SUPPORTED"),
        ({"template_name": "PROMO_x"}, "UNKNOWN_TEMPLATE_PREFIX"),
        ({"recipient_count": 0}, "EMPTY_TARGET"),
        ({"batch_count": 0}, "EMPTY_TARGET"),
        ({"recipient_count": 20_001, "batch_count": 2}, "INVALID_FIELD"),
        ({"scheduled_at": NOW - timedelta(hours=2)}, "SEND_TIME_PASSED"),
        ({"metrics_window_days": 0}, "INVALID_FIELD"),
        ({"validity_hours": 73}, "INVALID_FIELD"),
        ({"sender": "A!"}, "INVALID_SENDER"),
        ({"event_id": " "}, "MISSING_FIELD"),
        ({"scheduled_at": datetime(9999, 12, 31, 23, 59, tzinfo=UTC)}, "SEND_TIME_TOO_FAR"),
        ({"scheduled_at": NOW + timedelta(days=400)}, "SEND_TIME_TOO_FAR"),
        ({"recipient_count": 5, "batch_count": 10**9}, "INVALID_FIELD"),
        ({"recipient_count": 10**9, "batch_count": 10**6}, "INVALID_FIELD"),
        ({"metrics_window_days": -3}, "INVALID_FIELD"),
        ({"metadata": {"blob": "m" * 16_385}}, "METADATA_TOO_LARGE"),
        ({"template_name": "OPT_" + "t" * 300}, "INVALID_FIELD"),
        ({"promo_codes": ("C" * 65,)}, "INVALID_FIELD"),
    ],
)
def test_invalid_headers_name_their_reason(changes: dict[str, object], code: str) -> None:
    """Each kind of invalid header is refused with its own reason code."""
    assert problem(**changes) == code


def test_error_messages_quote_a_bounded_part_of_the_bad_value() -> None:
    """A megabyte of template name gives a short message that still names the value."""
    error = validate_scheduled(
        replace(HEADER, template_name="XYZ_" + "x" * 150), GROUPS, NOW, IntakeLimits()
    )
    assert error is not None
    assert error.code == "UNKNOWN_TEMPLATE_PREFIX"
    assert "'XYZ_xx" in error.message
    assert "(154 characters)" in error.message
    assert len(error.message) < 200


def test_identities_too_long_or_with_control_characters_are_unusable() -> None:
    """Event and campaign ids that would go into every key are bounded and printable."""
    assert identity_problem("e1", "2.38") is None
    assert identity_problem("e" * 129, "2.38") is not None
    assert identity_problem("e1", "c" * 129) is not None
    assert identity_problem("e1", "a\nb") is not None


def test_slightly_late_send_time_is_accepted() -> None:
    """A send time within the allowed delay is accepted (it is sent at once)."""
    assert problem(scheduled_at=NOW - timedelta(minutes=59)) is None


def test_longest_prefix_picks_the_contact_group() -> None:
    """OPT_VIP_ templates go to the VIP group, other OPT_ templates to the main one."""
    assert contact_group_for("OPT_VIP_Gold", GROUPS) == GROUPS[1]
    assert contact_group_for("OPT_Welcome", GROUPS) == GROUPS[0]
    assert contact_group_for("Other", GROUPS) is None
    catch_all = (ContactGroup(1, "all", "", "custom1"),)
    assert contact_group_for("Anything", catch_all) == catch_all[0]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("447700900123", "447700900123"),
        ("+44 7700 900123", "447700900123"),
        ("0044-7700-900123", "447700900123"),
        ("353871234567", "353871234567"),
        ("07700900123", None),
        ("4477009001", None),
        ("44770090012345", None),
        ("12345", None),
        ("44770090012a", None),
        ("", None),
    ],
)
def test_numbers_are_normalised_or_refused(raw: str, expected: str | None) -> None:
    """International digits pass (separators dropped); national, short and odd UK numbers fail."""
    assert normalise_number(raw) == expected


@given(st.text(max_size=30))
def test_normalised_numbers_are_always_plain_digits(raw: str) -> None:
    """Whatever the input, a normalised number is 10–15 ASCII digits or None."""
    number = normalise_number(raw)
    assert number is None or (number.isascii() and number.isdigit() and 10 <= len(number) <= 15)


@pytest.mark.parametrize(
    ("text", "length", "parts", "unicode"),
    [
        ("a" * 160, 160, 1, False),
        ("a" * 161, 161, 2, False),
        ("a" * 306, 306, 2, False),
        ("a" * 307, 307, 3, False),
        ("€" * 80, 160, 1, False),  # extension characters cost two septets
        ("ü" * 70, 70, 1, False),  # in the GSM basic set
        ("ć" * 70, 70, 1, True),
        ("ć" * 71, 71, 2, True),
        ("😀" * 35, 70, 1, True),  # surrogate pairs count twice
    ],
)
def test_message_cost_follows_textlocals_table(
    text: str, length: int, parts: int, unicode: bool
) -> None:
    """GSM-7 texts cost 160/153 characters per part; anything else is unicode at 70/67."""
    cost = message_cost(text)
    assert (cost.length, cost.parts, cost.unicode) == (length, parts, unicode)


def _reference_cost(text: str) -> tuple[int, bool]:
    """message_cost's rule spelled out character by character: (length, unicode)."""
    gsm = set(_GSM_BASIC) | set(_GSM_EXTENSION)
    if all(c in gsm for c in text):
        return sum(2 if c in _GSM_EXTENSION else 1 for c in text), False
    return len(text.encode("utf-16-le")) // 2, True


def test_message_cost_matches_the_character_rule_for_every_character() -> None:
    """Each GSM character alone, in a text, and next to one that is not: as the rule says."""
    for c in [*sorted(_GSM_BASIC | _GSM_EXTENSION), *map(chr, range(0x0, 0x3000))]:
        for text in (c, f"Hi {c}{c} there", f"{c}ć"):
            cost = message_cost(text)
            assert (cost.length, cost.unicode) == _reference_cost(text), repr(text)


@given(st.text(alphabet=st.sampled_from("aZ9 €^{}\\[~]|\f\n\rüßćΔ😀-"), max_size=400))
def test_message_cost_matches_the_character_rule(text: str) -> None:
    """Random texts of GSM, extension and other characters: length and unicode as the rule."""
    cost = message_cost(text)
    assert (cost.length, cost.unicode) == _reference_cost(text)


def test_promo_code_fills_its_placeholder() -> None:
    """The campaign's single promo code replaces the placeholder."""
    assert render_message("Use [%PROMO_CODE%] now", ["SAVE10"]) == "Use SAVE10 now"
    assert render_message("No code here", []) == "No code here"


@pytest.mark.parametrize(
    ("body", "codes", "code"),
    [
        ("Use [%PROMO_CODE%]", [], "PROMO_CODE_MISSING"),
        ("Use [%PROMO_CODE%]", ["A", "B"], "PROMO_CODE_AMBIGUOUS"),
        ("   ", [], "EMPTY_MESSAGE"),
        ("x" * 766, [], "MESSAGE_TOO_LONG"),
        ("ć" * 400, [], "MESSAGE_TOO_LONG"),
    ],
)
def test_unsendable_messages_are_refused(body: str, codes: list[str], code: str) -> None:
    """Missing or ambiguous codes, empty and over-long texts are refused, not truncated."""
    result = render_message(body, codes)
    assert isinstance(result, StatusError)
    assert result.code == code


def test_sender_rules() -> None:
    """Senders are 3–11 letters/digits with a letter, or up to 13 digits."""
    assert sender_problem("ShopCo") is None
    assert sender_problem("447700900123") is None
    assert sender_problem("Shop & Co") is not None
    assert sender_problem("AB") is not None
    assert sender_problem("TwelveLetter") is not None


def test_segment_names_are_deterministic_and_bounded() -> None:
    """One campaign always maps to one group name, short enough for TextLocal."""
    ref = CampaignRef(42, "2.38", 505)
    name = segment_group_name(GROUPS[0], ref, "event-1")
    assert name.startswith("OPT_seg-2.38-")
    assert len(name) <= 40
    assert name == segment_group_name(GROUPS[0], ref, "event-1")
    assert short_reference(ref).startswith("42.2.38-")
    assert len(short_reference(ref)) <= 32
    long_ref = CampaignRef(42, "a-very-long-campaign-identifier-from-optimove" * 2, 505)
    long_name = segment_group_name(GROUPS[0], long_ref, "event-1")
    assert len(long_name) <= 40
    assert long_name == segment_group_name(GROUPS[0], long_ref, "event-1")
    assert segment_group_name(GROUPS[0], replace(long_ref, channel_id=506), "event-1") != long_name
    long_prefix = replace(GROUPS[0], template_prefix="P" * 30)
    assert len(segment_group_name(long_prefix, ref, "event-1")) <= 40


def test_names_and_references_never_collide() -> None:
    """Ids differing only in dropped characters, or in how '-' splits them, map apart."""
    refs = [
        CampaignRef(1, "col:1", 5),
        CampaignRef(1, "col 1", 5),
        CampaignRef(1, "col_1", 5),
        CampaignRef(1, "Ä", 5),
        CampaignRef(1, "Ö", 5),
        CampaignRef(12, "3", 5),
        CampaignRef(1, "23", 5),
        CampaignRef(1, "x" * 60 + "a", 5),
        CampaignRef(1, "x" * 60 + "b", 5),
    ]
    names = {segment_group_name(GROUPS[0], ref, "event-1") for ref in refs}
    references = {short_reference(ref) for ref in refs}
    assert len(names) == len(refs)
    assert len(references) == len(refs)
    # A campaign id run again (a new header event) gets a new group, never the old run's.
    assert segment_group_name(GROUPS[0], refs[0], "event-2") not in names


def test_a_week_of_daily_polls() -> None:
    """A 7-day window polled daily gives 7 polls, the 7th at the window's end and final."""
    sent = NOW
    slots = [poll_slot(sent, timedelta(days=1), timedelta(days=7), n) for n in range(1, 8)]
    assert [s.due_at for s in slots] == [sent + timedelta(days=n) for n in range(1, 8)]
    assert [s.is_final for s in slots] == [False] * 6 + [True]
    assert poll_count(timedelta(days=1), timedelta(days=7)) == 7


def test_a_window_shorter_than_a_whole_number_of_intervals_ends_on_time() -> None:
    """A 2.5-day window gets polls at days 1, 2 and a final one at 2.5."""
    slots = [poll_slot(NOW, timedelta(days=1), timedelta(days=2.5), n) for n in (1, 2, 3)]
    assert slots[-1].due_at == NOW + timedelta(days=2.5)
    assert [s.is_final for s in slots] == [False, False, True]


@pytest.mark.parametrize(
    ("state", "cancel", "now", "step"),
    [
        (CampaignState.READY, False, NOW, Step.CREATE_SEGMENT),
        (CampaignState.SEGMENT_CREATED, False, NOW, Step.LOAD_CONTACTS),
        (CampaignState.CONTACTS_LOADED, False, NOW, Step.SEND),
        (CampaignState.SEND_PENDING, False, NOW, Step.RECONCILE_SEND),
        (CampaignState.SEND_PENDING, False, NOW + timedelta(days=1), Step.RECONCILE_SEND),
        (CampaignState.READY, True, NOW, Step.CANCEL),
        (CampaignState.SENT, True, NOW, Step.CANCEL),
        (CampaignState.SENT, False, NOW, Step.NONE),
        (CampaignState.DONE, True, NOW, Step.NONE),
        (CampaignState.CONTACTS_LOADED, False, NOW + timedelta(hours=2), Step.MISS_SEND_WINDOW),
    ],
)
def test_next_step(state: CampaignState, cancel: bool, now: datetime, step: Step) -> None:
    """The executor's next step follows the state, cancellation first, a missed window next."""
    assert (
        next_step(
            state,
            cancel_requested=cancel,
            scheduled_at=NOW,
            now=now,
            max_send_delay=timedelta(hours=1),
        )
        == step
    )


def test_retry_delay_grows_and_is_capped() -> None:
    """Backoff doubles per failure and stops at five minutes."""
    assert [retry_delay(n).total_seconds() for n in (1, 2, 3)] == [2, 4, 8]
    assert retry_delay(40) == timedelta(minutes=5)


def test_output_event_ids_cannot_be_forged_through_separators() -> None:
    """A campaign id or qualifier containing '/' never yields another event's id."""
    first = output_event_id(CampaignRef(1, "a", 2), "status", "REJECTED", "x/status/SENT")
    second = output_event_id(CampaignRef(1, "a", 2), "status", "REJECTED/x", "status/SENT")
    assert first != second
    # Ids of parts without separators are unchanged (re-emissions after an upgrade match).
    plain = output_event_id(CampaignRef(1, "a", 2), "status", "SENT", "")
    assert plain == str(uuid.uuid5(EVENT_ID_NAMESPACE, "1:a:2/status/SENT/"))
