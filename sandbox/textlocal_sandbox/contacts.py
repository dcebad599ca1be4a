"""Contact groups stored compactly enough to hold a million contacts.

A group is a dict from the number (an int) to the contact's other fields packed into one UTF-8
bytes value, plus an array of numbers in insertion order so that pages (`start`, `limit`) cost
only the page. A contact with no names or custom fields shares one empty bytes object.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

_SEPARATOR: Final = "\x1f"  # ASCII unit separator: never typed in a name
_EMPTY: Final = b""
_FIELD_COUNT: Final = 5


@dataclass(frozen=True, slots=True)
class Contact:
    """One contact as TextLocal returns it."""

    number: int
    first_name: str = ""
    last_name: str = ""
    custom1: str = ""
    custom2: str = ""
    custom3: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "number": self.number,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "custom1": self.custom1,
            "custom2": self.custom2,
            "custom3": self.custom3,
        }


def _pack(contact: Contact) -> bytes:
    fields = (
        contact.first_name,
        contact.last_name,
        contact.custom1,
        contact.custom2,
        contact.custom3,
    )
    if not any(fields):
        return _EMPTY
    return _SEPARATOR.join(f.replace(_SEPARATOR, "") for f in fields).encode()


def _unpack(number: int, packed: bytes) -> Contact:
    if not packed:
        return Contact(number)
    first, last, c1, c2, c3 = packed.decode().split(_SEPARATOR, _FIELD_COUNT - 1)
    return Contact(number, first, last, c1, c2, c3)


class ContactGroup:
    """A named group of contacts, keyed by number (adding a number again replaces its fields)."""

    def __init__(self, group_id: int, name: str) -> None:
        self.id = group_id
        self.name = name
        self._records: dict[int, bytes] = {}
        self._order = array("q")
        self._removed = 0

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, number: int) -> bool:
        return number in self._records

    def upsert(self, contacts: Iterable[Contact]) -> int:
        """Add or replace contacts; returns how many were new to the group."""
        self._compact()  # a removed number added again must not appear twice in the order
        records = self._records
        order = self._order
        added = 0
        for contact in contacts:
            if contact.number not in records:
                order.append(contact.number)
                added += 1
            records[contact.number] = _pack(contact)
        return added

    def remove(self, number: int) -> bool:
        if self._records.pop(number, None) is None:
            return False
        self._removed += 1
        return True

    def get(self, number: int) -> Contact | None:
        packed = self._records.get(number)
        return None if packed is None else _unpack(number, packed)

    def numbers(self) -> array[int]:
        """The group's numbers in insertion order, as a fresh array (a snapshot)."""
        self._compact()
        return array("q", self._order)

    def page(self, start: int, limit: int) -> list[Contact]:
        self._compact()
        records = self._records
        return [_unpack(n, records[n]) for n in self._order[start : start + limit]]

    def __iter__(self) -> Iterator[Contact]:
        return iter(self.page(0, len(self)))

    def _compact(self) -> None:
        # Removals leave their numbers in the order array; drop them in one pass when next read.
        if self._removed:
            records = self._records
            self._order = array("q", (n for n in self._order if n in records))
            self._removed = 0
