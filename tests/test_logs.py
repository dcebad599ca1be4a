"""Structured logs: JSON lines with context, and a scrubber as the second line of defence."""

from __future__ import annotations

import json
import logging
import re
import string
import sys
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.logs import JsonFormatter, Scrubber, TextFormatter, log_event

DIGIT_RUN = re.compile(r"\d{10,}")


def record_for(event: str, **context: object) -> logging.LogRecord:
    logger = logging.getLogger("test.logs")
    captured: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record)

    handler = Capture()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_event(logger, event, **context)
    finally:
        logger.removeHandler(handler)
    return captured[0]


def test_json_line_has_event_and_context() -> None:
    """A JSON log line carries the dotted event name and its context fields."""
    record = record_for("campaign.sent", campaign="1:2:3", batch_id=9)
    line = JsonFormatter(Scrubber()).format(record)
    parsed = json.loads(line)
    assert parsed["event"] == "campaign.sent"
    assert parsed["campaign"] == "1:2:3"
    assert parsed["batch_id"] == 9
    assert parsed["level"] == "info"


def test_scrubber_masks_secrets_and_phone_numbers() -> None:
    """Registered secrets and long digit runs never reach the output."""
    scrub = Scrubber(["sup3r-secret-key"])
    text = TextFormatter(scrub).format(
        record_for("oops", detail="key sup3r-secret-key for +447700900123 batch 12345")
    )
    assert "sup3r-secret-key" not in text
    assert "447700900123" not in text
    assert "12345" in text  # short numbers (ids, counts) stay readable


def strict_json(line: str) -> object:
    """The line parsed as standard JSON: NaN and Infinity, which json.loads accepts, are refused."""

    def refuse(constant: str) -> object:
        raise ValueError(f"not standard JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_a_ten_digit_batch_id_keeps_the_line_valid_json() -> None:
    """A 10-digit batch id is written as the JSON string "<number>", not spliced into the JSON."""
    line = JsonFormatter(Scrubber()).format(record_for("campaign.sent", batch_id=4012345678))
    parsed = strict_json(line)
    assert isinstance(parsed, dict)
    assert parsed["batch_id"] == "<number>"
    assert parsed["event"] == "campaign.sent"
    assert "4012345678" not in line


def test_short_numbers_stay_numbers() -> None:
    """Ids and counts below 10 digits, and booleans, are written as they are."""
    record = record_for("poll.recorded", batch_id=401234567, recipients=-25000, final=True)
    parsed = strict_json(JsonFormatter(Scrubber()).format(record))
    assert isinstance(parsed, dict)
    assert (parsed["batch_id"], parsed["recipients"], parsed["final"]) == (401234567, -25000, True)


def test_nested_values_and_floats_are_masked_in_place() -> None:
    """Numbers inside lists and dicts are masked where they are; floats keep six decimals."""
    record = record_for(
        "oops",
        numbers=[447700900123, 12, "+447700900123 and 42"],
        detail={"to": 447700900123.0, 447700900123: "key", "took_s": 0.1 + 0.2},
        limits=(float("nan"), float("inf"), 999999999.9999999),
    )
    parsed = strict_json(JsonFormatter(Scrubber()).format(record))
    assert isinstance(parsed, dict)
    assert parsed["numbers"] == ["<number>", 12, "<number> and 42"]
    assert parsed["detail"] == {"to": "<number>", "<number>": "key", "took_s": 0.3}
    assert parsed["limits"] == ["nan", "inf", "<number>"]


def test_secrets_are_masked_in_the_event_context_and_exception() -> None:
    """A registered secret is masked wherever it appears: event, context, keys, exception text."""
    secret = "sup3r-secret-key"
    record = record_for(f"event.{secret}", detail=[{f"k-{secret}": f"uses {secret}!"}])
    try:
        raise RuntimeError(f"refused {secret} for 447700900123")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter(Scrubber([secret])).format(record)
    parsed = strict_json(line)
    assert isinstance(parsed, dict)
    assert secret not in line
    assert parsed["event"] == "event.***"
    assert parsed["detail"] == [{"k-***": "uses ***!"}]
    assert "RuntimeError: refused *** for <number>" in parsed["exception"]


# Credentials as they are: letters and digits (and some punctuation), at least 8 characters.
# Left out: what the scrubber itself writes ("*", "<", ">"), JSON's own punctuation, and a first
# letter that JSON uses in an escape (as in "\n"), which could form a secret the value never held.
SECRET_CHARACTERS = string.ascii_letters + string.digits + "_!#%^()~/@?"
secrets_strategy = st.lists(
    st.text(SECRET_CHARACTERS, min_size=8, max_size=24).filter(
        lambda s: (
            any(c.isalpha() for c in s) and any(c.isdigit() for c in s) and s[0] not in "bfnrtu"
        )
    ),
    min_size=1,
    max_size=3,
)


def texts(secrets: list[str]) -> st.SearchStrategy[str]:
    """Any text, including pieces that are secrets, digit runs and phone numbers, joined up."""
    piece = st.one_of(
        st.text(max_size=8),
        st.sampled_from(secrets),
        st.from_regex(r"\+?[0-9]{1,16}", fullmatch=True),
        st.text("0123456789\u0660\u0661\u0662\u0663\x01\n ", max_size=14),
    )
    return st.lists(piece, max_size=5).map("".join)


def values(secrets: list[str]) -> st.SearchStrategy[object]:
    scalar = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(10**16), max_value=10**16),
        st.floats(),
        texts(secrets),
    )
    return st.recursive(
        scalar,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.one_of(texts(secrets), st.integers()), children, max_size=4),
        ),
        max_leaves=12,
    )


def strings_in(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings_in(item)


# The strategies depend on the drawn secrets, so they are built inside the test; on a fresh machine
# the first of them builds Hypothesis's Unicode table (about 2 s), which would fail the check.
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_json_line_is_valid_and_scrubbed(data: st.DataObject) -> None:
    """Whatever the context holds, a line is one valid JSON object without secrets or numbers."""
    secrets = data.draw(secrets_strategy, "secrets")
    event = data.draw(texts(secrets), "event")
    context = data.draw(st.dictionaries(texts(secrets), values(secrets), max_size=6), "context")
    record = logging.LogRecord("test.logs", logging.INFO, __file__, 1, event, None, None)
    record.context = context  # as log_event passes it, but any key, even "event", is allowed
    if data.draw(st.booleans(), "with an exception"):
        error = ValueError(data.draw(texts(secrets), "exception text"))
        record.exc_info = (ValueError, error, None)
    line = JsonFormatter(Scrubber(secrets)).format(record)
    parsed = strict_json(line)
    assert isinstance(parsed, dict)
    assert "\n" not in line
    assert DIGIT_RUN.search(line) is None
    for secret in secrets:
        assert secret not in line
        assert not any(secret in text for text in strings_in(parsed))
