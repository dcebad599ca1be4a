"""The error codes the sandbox answers with, and the exception that carries one out of a command.

Codes 1–202 and their texts are TextLocal's, as published. Where a command needs an error that
TextLocal publishes no code for (an unknown batch, message, scheduled send or inbox), the sandbox
uses a code from 901 up: a range TextLocal does not use, so a client can tell an assumption from a
published answer. ASSUMPTIONS.md lists them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

PUBLISHED_ERRORS: Final[Mapping[int, str]] = {
    1: "No command specified",
    2: "Unrecognised command",
    3: "Invalid login details",
    4: "No recipients specified",
    5: "No message content",
    6: "Message too long",
    7: "Insufficient credits",
    8: "Invalid schedule date",
    9: "Schedule date is in the past",
    10: "Invalid group ID",
    11: "Selected group is empty",
    12: "No group name specified",
    13: "Group name is too long",
    14: "Group already exists",
    15: "Invalid JSON string",
    25: "No group ID specified",
    32: "Invalid number format",
    33: "You have supplied too many numbers",
    34: "You have supplied both a group ID and a set of numbers",
    43: "Invalid sender name",
    44: "No sender name specified",
    51: "No valid numbers specified",
    55: "No numbers specified",
    56: "Invalid number(s) specified",
    61: "Specified number(s) not found",
    62: "Cannot delete specified group",
    185: "No URL specified",
    186: "Invalid URL specified",
    191: "Schedule time is outside that allowed",
    192: "You cannot send message at this time",
    202: "Invalid or duplicate numbers specified",
}

ASSUMED_ERRORS: Final[Mapping[int, str]] = {
    901: "Invalid batch ID",
    902: "Invalid message ID",
    903: "Invalid scheduled message ID",
    904: "Invalid inbox ID",
    905: "No keyword specified",
}

ALL_ERRORS: Final[Mapping[int, str]] = {**PUBLISHED_ERRORS, **ASSUMED_ERRORS}

WARNING_INVALID_NUMBER: Final = 3
WARNING_TEXTS: Final[Mapping[int, str]] = {WARNING_INVALID_NUMBER: "Invalid number"}


class CommandFailed(Exception):
    """A command refused the request; the API answers `status: failure` with this code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"error {code} {ALL_ERRORS[code]}")
        self.code = code
        self.message = ALL_ERRORS[code]
