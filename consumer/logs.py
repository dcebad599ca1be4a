"""Structured logs: one line per unit of work, a dotted event name and key/value context.

    log_event(log, "campaign.sent", campaign="42:2.38:505", batch_id=123, recipients=25000)

JSON lines in production (and whenever stderr is not a terminal), `key=value` text on a terminal.
Phone numbers, message bodies and secrets are never passed in; as a second line of defence every
record is scrubbed of registered secrets (→ `***`) and of runs of 10 or more digits, which look
like phone numbers (→ `<number>`).

The JSON formatter scrubs the values before serialising them, so every line stays valid JSON:
strings (keys, values, the event name, the exception text) are scrubbed as text; an int of 10 or
more digits, or a float of 10 or more integer digits, becomes the string "<number>"; other floats
are written to six decimal places and non-finite ones as strings ("nan", "inf"); control
characters in strings become U+FFFD, since JSON writes them as `\\u00XX` escapes whose digits
would join the digits around them. Values of other types are written as their `str()`, scrubbed.
The text formatter scrubs its finished line.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else on a record is our context.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
# 10 or more digits in a row (optionally after "+") look like a phone number: masked.
_PHONE_LIKE = re.compile(r"\+?\d{10,}")
_PHONE_LIKE_FROM = 10**9  # the smallest 10-digit number
# The characters json.dumps(ensure_ascii=False) writes as \u00XX (the rest have \n-style escapes).
_JSON_HEX_ESCAPED = re.compile(r"[\x00-\x07\x0b\x0e-\x1f]")
_FLOAT_DECIMALS = 6


def log_event(
    logger: logging.Logger, event: str, level: int = logging.INFO, /, **context: Any
) -> None:
    """Log `event` (a stable dotted name) with context fields."""
    logger.log(level, event, extra={"context": context})


class Scrubber:
    """Removes secrets and phone-number-like digit runs from text, or from a JSON line's values."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted(
            {*self._secrets, *(s for s in secrets if len(s) >= 4)}, key=len, reverse=True
        )

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _PHONE_LIKE.sub("<number>", text)

    def json_value(self, value: object) -> object:
        """`value` scrubbed, as plain JSON types that serialise without a long digit run.

        See the module docstring for what each type becomes.
        """
        if isinstance(value, str):
            return self._json_text(value)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return "<number>" if abs(value) >= _PHONE_LIKE_FROM else value
        if isinstance(value, float):
            if not math.isfinite(value):
                return str(value)
            rounded = round(value, _FLOAT_DECIMALS)  # 999999999.9999999 rounds up to 10 digits
            return "<number>" if abs(rounded) >= _PHONE_LIKE_FROM else rounded
        if isinstance(value, dict):
            return {
                self._json_text(key if isinstance(key, str) else str(key)): self.json_value(item)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.json_value(item) for item in value]
        return self._json_text(str(value))

    def _json_text(self, text: str) -> str:
        return _JSON_HEX_ESCAPED.sub("\ufffd", self(text))


def _context(record: logging.LogRecord) -> dict[str, Any]:
    context = dict(getattr(record, "context", {}) or {})
    for name, value in vars(record).items():
        if name not in _STANDARD_ATTRIBUTES and name != "context":
            context[name] = value
    return context


class JsonFormatter(logging.Formatter):
    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self._scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(self._scrub.json_value(line), ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self._scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        fields = " ".join(f"{name}={value}" for name, value in _context(record).items())
        line = f"{when} {record.levelname:<7} {record.getMessage()} {fields}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return self._scrub(line)


SCRUBBER = Scrubber()


def configure_logging(log_format: str = "auto", level: str = "INFO") -> None:
    """Route every logger to stderr as JSON ("json"), text ("text") or by terminal ("auto")."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(SCRUBBER) if use_json else TextFormatter(SCRUBBER))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print every request line; our events say what matters.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
