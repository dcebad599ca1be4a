"""The sandbox's settings: the account it imitates and how its simulated network behaves."""

from __future__ import annotations

from dataclasses import dataclass, field

from textlocal_sandbox.delivery import DeliveryModel


@dataclass(frozen=True)
class SandboxConfig:
    """Everything about a sandbox run that is not the API key, the address or the clock.

    `money_as_float` makes `balance`/`cost` floats, as after the Webex Interact migration, so a
    client can be tested against both typings.
    """

    balance_sms: int = 100_000
    balance_mms: int = 100
    username: str = "sandbox@example.com"
    password: str | None = None
    login_hash: str | None = None
    default_sender: str = "TXTLCL"
    sender_names: tuple[str, ...] = ("TXTLCL",)
    delivery: DeliveryModel = field(default_factory=DeliveryModel)
    list_group_messages: bool = True
    money_as_float: bool = False
    seed_demo: bool = False
    receipt_concurrency: int = 16
    receipt_timeout_s: float = 5.0
    tick_interval_s: float = 0.5
