"""The demo account: a master group of fictional UK customers and a few `OPT_` templates.

Numbers are in Ofcom's drama range (07700 900000–900999, never allocated to real phones). The
last three customers get deliberately odd numbers, so the product's "invalid number" paths have
something to find: one too short for the UK, one too long, and one Irish number.
"""

from __future__ import annotations

from typing import Final

from textlocal_sandbox.contacts import Contact
from textlocal_sandbox.state import SandboxState

DEMO_GROUP_NAME: Final = "Optimove customers"
DEMO_CONTACTS: Final = 1_000
DEMO_FIRST_NUMBER: Final = 447_700_900_000
ODD_NUMBERS: Final = {
    998: 44_770_090_099,  # 11 digits: too short for a UK number
    999: 4_477_009_009_990,  # 13 digits: too long for a UK number
    1000: 353_871_234_567,  # an Irish mobile: valid, but not in the UK range
}
_FIRST_NAMES: Final = (
    "Ann",
    "Ben",
    "Chloe",
    "Dev",
    "Erin",
    "Femi",
    "Grace",
    "Hamza",
    "Isla",
    "Jon",
)
_LAST_NAMES: Final = ("Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Patel", "Khan")
DEMO_TEMPLATES: Final = (
    ("OPT_Welcome", "Welcome to Shop & Co! Reply STOP to opt out."),
    ("OPT_Promo", "Your code [%PROMO_CODE%] gives 20% off this weekend. Reply STOP to opt out."),
    ("OPT_Reminder", "Your basket is waiting for you at Shop & Co."),
    ("Internal_Test", "Internal test message: not for Optimove."),
)


def demo_contacts(count: int = DEMO_CONTACTS) -> list[Contact]:
    """Customers C00001… with names, custom1 = customer id."""
    contacts = []
    for index in range(1, count + 1):
        number = ODD_NUMBERS.get(index, DEMO_FIRST_NUMBER + index - 1)
        contacts.append(
            Contact(
                number=number,
                first_name=_FIRST_NAMES[index % len(_FIRST_NAMES)],
                last_name=_LAST_NAMES[index % len(_LAST_NAMES)],
                custom1=f"C{index:05d}",
            )
        )
    return contacts


def seed_demo(state: SandboxState, now_s: float = 0.0) -> int:
    """Add the demo group and templates to `state`; returns the group's id."""
    group = state.group_named(DEMO_GROUP_NAME) or state.create_group(DEMO_GROUP_NAME)
    state.add_contacts(group, demo_contacts(), now_s)
    for title, body in DEMO_TEMPLATES:
        state.add_template(title, body)
    return group.id
