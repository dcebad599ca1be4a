"""The sandbox's stored values other than contacts: templates and accepted sends."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Final

SMS: Final = "sms"
MMS: Final = "mms"


@dataclass(frozen=True)
class Template:
    id: int
    title: str
    body: str
    sender_name: str
    is_my_dnd: bool = False


@dataclass(frozen=True)
class Send:
    """One accepted send (a batch): its recipients as a packed array, never one object each.

    `texts` holds one text per recipient for `bulk_json`; otherwise every recipient gets `text`.
    Message ids are `first_message_id` + position. `send_at_s` is when it leaves (the schedule
    time, or the acceptance time); delivery is simulated from then.
    """

    batch_id: int
    kind: str
    recipients: array[int]
    text: str
    texts: tuple[str, ...] | None
    sender: str
    accepted_at_s: float
    send_at_s: float
    scheduled: bool
    group_id: int | None
    group_name: str
    num_parts: int
    cost: int
    receipt_url: str
    custom: str
    first_message_id: int
    invalid_positions: tuple[int, ...]

    def text_for(self, position: int) -> str:
        return self.text if self.texts is None else self.texts[position]

    def message_id(self, position: int) -> str:
        return str(self.first_message_id + position)
