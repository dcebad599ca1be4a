"""Structured logs: JSON lines with context, and a scrubber as the second line of defence."""

from __future__ import annotations

import json
import logging

from consumer.logs import JsonFormatter, Scrubber, TextFormatter, log_event


def record_for(event: str, **context: str | int) -> logging.LogRecord:
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
