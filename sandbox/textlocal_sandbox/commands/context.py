"""What every command gets: the account, the delivery model and the sandbox time of the request."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from textlocal_sandbox.codes import CommandFailed
from textlocal_sandbox.config import SandboxConfig
from textlocal_sandbox.state import SandboxState
from textlocal_sandbox.wire import RequestParams

Reply = dict[str, object]
_INTEGER = re.compile(r"-?[0-9]{1,30}")


@dataclass(frozen=True)
class CommandContext:
    state: SandboxState
    config: SandboxConfig
    now_s: float

    def money(self, amount: int) -> int | float:
        """Balance and cost as this account types them (ints, or floats after Webex Interact)."""
        return float(amount) if self.config.money_as_float else amount


Command = Callable[[CommandContext, RequestParams], Reply]


def parse_int(text: str | None, *, failure: int | None = None) -> int | None:
    """An integer parameter, None when not given; not an integer: CommandFailed(failure) or None."""
    if text is None:
        return None
    stripped = text.strip()
    if _INTEGER.fullmatch(stripped):
        return int(stripped)
    if failure is not None:
        raise CommandFailed(failure)
    return None


def page_bounds(params: RequestParams, *, default_limit: int, max_limit: int) -> tuple[int, int]:
    """`start` and `limit`, clamped to sane values (bad values fall back to the defaults)."""
    start = max(0, parse_int(params.text("start")) or 0)
    limit = parse_int(params.text("limit"))
    if limit is None or limit <= 0:
        limit = default_limit
    return start, min(limit, max_limit)


def format_datetime(unix_s: float) -> str:
    """TextLocal's `Y-m-d H:i:s`, in UTC."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d %H:%M:%S")
