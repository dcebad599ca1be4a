"""The sandbox's account, in memory: balance, groups, templates and sends. Pure: no I/O, no clock.

Callers pass `now_s` (Unix seconds from the sandbox clock) wherever time matters. Scheduled sends
are never moved anywhere: whether a send has left, and each message's status, are derived from
the time, so jumping the clock is all it takes to deliver them.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Final

from textlocal_sandbox.config import SandboxConfig
from textlocal_sandbox.contacts import Contact, ContactGroup
from textlocal_sandbox.model import Send, Template
from textlocal_sandbox.numbers import invalid_positions

MY_CONTACTS_ID: Final = 5
OPTOUTS_ID: Final = 6
BUILT_IN_GROUPS: Final = frozenset({MY_CONTACTS_ID, OPTOUTS_ID})
_FIRST_GROUP_ID: Final = 1001
_FIRST_TEMPLATE_ID: Final = 10_001
_FIRST_BATCH_ID: Final = 100_000_001
_FIRST_MESSAGE_ID: Final = 1_000_000_001


class SandboxState:
    """Everything the imitated account holds. Mutated only by commands and the admin API."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Back to a fresh account: the configured balance, the built-in groups, nothing else."""
        self.balance_sms = self.config.balance_sms
        self.balance_mms = self.config.balance_mms
        self.groups: dict[int, ContactGroup] = {
            MY_CONTACTS_ID: ContactGroup(MY_CONTACTS_ID, "My Contacts"),
            OPTOUTS_ID: ContactGroup(OPTOUTS_ID, "Opt-outs"),
        }
        # number → (opt-out id, when): the id is new each time a number (re-)enters group 6
        self.optouts: dict[int, tuple[int, float]] = {}
        self._next_optout_id = 1
        self.templates: dict[int, Template] = {}
        self.sends: dict[int, Send] = {}
        self.cancelled: set[int] = set()
        self.receipt_batches: list[int] = []
        self._message_starts: list[int] = []
        self._message_batches: list[int] = []
        self._next_group_id = _FIRST_GROUP_ID
        self._next_template_id = _FIRST_TEMPLATE_ID
        self._next_batch_id = _FIRST_BATCH_ID
        self._next_message_id = _FIRST_MESSAGE_ID
        self._next_short_url = 1

    # groups and contacts

    def group_named(self, name: str) -> ContactGroup | None:
        wanted = name.strip().casefold()
        return next((g for g in self.groups.values() if g.name.casefold() == wanted), None)

    def create_group(self, name: str) -> ContactGroup:
        group = ContactGroup(self._next_group_id, name.strip())
        self._next_group_id += 1
        self.groups[group.id] = group
        return group

    def delete_group(self, group_id: int) -> None:
        del self.groups[group_id]

    def add_contacts(self, group: ContactGroup, contacts: Iterable[Contact], now_s: float) -> int:
        """Upsert contacts into a group; returns how many were new. Opt-outs remember when."""
        if group.id != OPTOUTS_ID:
            return group.upsert(contacts)
        listed = list(contacts)
        for contact in listed:
            if contact.number not in self.optouts:
                self.optouts[contact.number] = (self._next_optout_id, now_s)
                self._next_optout_id += 1
        return group.upsert(listed)

    def remove_contact(self, group: ContactGroup, number: int) -> bool:
        if group.id == OPTOUTS_ID:
            self.optouts.pop(number, None)
        return group.remove(number)

    def opted_out(self) -> ContactGroup:
        return self.groups[OPTOUTS_ID]

    # templates

    def add_template(self, title: str, body: str, sender_name: str = "") -> Template:
        template = Template(
            self._next_template_id, title, body, sender_name or self.config.default_sender
        )
        self._next_template_id += 1
        self.templates[template.id] = template
        return template

    def update_template(self, template_id: int, *, title: str | None, body: str | None) -> None:
        current = self.templates[template_id]
        self.templates[template_id] = replace(
            current,
            title=current.title if title is None else title,
            body=current.body if body is None else body,
        )

    def delete_template(self, template_id: int) -> None:
        del self.templates[template_id]

    # sends

    def allocate_batch_id(self) -> int:
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        return batch_id

    def allocate_message_ids(self, count: int) -> int:
        """Reserve `count` consecutive message ids; returns the first."""
        first = self._next_message_id
        self._next_message_id += count
        return first

    def record_send(self, send: Send) -> None:
        """Store an accepted send and charge for it."""
        self.sends[send.batch_id] = send
        self._message_starts.append(send.first_message_id)
        self._message_batches.append(send.batch_id)
        if send.receipt_url:
            self.receipt_batches.append(send.batch_id)
        if send.kind == "mms":
            self.balance_mms -= send.cost
        else:
            self.balance_sms -= send.cost

    def cancel_send(self, batch_id: int) -> None:
        """Withdraw a scheduled send and refund it: it never leaves and is no longer a batch."""
        send = self.sends.pop(batch_id)
        self.cancelled.add(batch_id)
        if send.kind == "mms":
            self.balance_mms += send.cost
        else:
            self.balance_sms += send.cost

    def sent(self, now_s: float) -> Iterator[Send]:
        """Sends that have left by `now_s`, in acceptance order."""
        return (s for s in self.sends.values() if s.send_at_s <= now_s)

    def scheduled(self, now_s: float) -> Iterator[Send]:
        """Sends still waiting for their schedule time."""
        return (s for s in self.sends.values() if s.send_at_s > now_s)

    def find_message(self, message_id: int) -> tuple[Send, int] | None:
        index = bisect.bisect_right(self._message_starts, message_id) - 1
        if index < 0:
            return None
        send = self.sends.get(self._message_batches[index])
        if send is None:
            return None
        position = message_id - send.first_message_id
        return (send, position) if position < len(send.recipients) else None

    def next_short_url_id(self) -> int:
        value = self._next_short_url
        self._next_short_url += 1
        return value


def snapshot_recipients(numbers: Iterable[int]) -> tuple[array[int], tuple[int, ...]]:
    """The recipients as a packed array, with the positions of numbers that are not valid."""
    packed = numbers if isinstance(numbers, array) else array("q", numbers)
    return packed, invalid_positions(packed)
