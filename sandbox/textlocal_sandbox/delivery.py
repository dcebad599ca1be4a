"""Simulated delivery: a message's status is a pure function of its number, send time and now.

Nothing per message is stored. Each message is `P` (pending) until it settles, then takes its
outcome. Both depend only on the number's last four digits, so a batch of any size is described by
one table of 10,000 entries:
- the outcome by the last two digits, in bands sized by `DeliveryMix` (by default 00–89 delivered,
  90–93 undelivered, 94–95 invalid, 96–97 expired, 98–99 unknown);
- the settle delay by the two digits before those: `settle_delay_s` for 00 up to
  `settle_delay_s × (1 + settle_spread)` for 99, so results arrive spread over time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

PENDING: Final = "P"
DELIVERED: Final = "D"
UNDELIVERED: Final = "U"
INVALID: Final = "I"
EXPIRED: Final = "E"
UNKNOWN: Final = "?"
_TABLE_SIZE: Final = 10_000
DELAY_BUCKETS: Final = 100


@dataclass(frozen=True)
class DeliveryMix:
    """Percentages of each outcome, given to numbers by their last two digits, in this order."""

    delivered: int = 90
    undelivered: int = 4
    invalid: int = 2
    expired: int = 2
    unknown: int = 2

    def __post_init__(self) -> None:
        shares = (self.delivered, self.undelivered, self.invalid, self.expired, self.unknown)
        if any(share < 0 for share in shares) or sum(shares) != 100:
            raise ValueError(f"delivery mix must be non-negative and add up to 100, got {shares}")

    def outcome(self, last_two_digits: int) -> str:
        bands = (
            (self.delivered, DELIVERED),
            (self.undelivered, UNDELIVERED),
            (self.invalid, INVALID),
            (self.expired, EXPIRED),
            (self.unknown, UNKNOWN),
        )
        upper = 0
        for share, status in bands:
            upper += share
            if last_two_digits < upper:
                return status
        return UNKNOWN


@dataclass(frozen=True)
class DeliveryModel:
    """When and how each message settles."""

    mix: DeliveryMix = field(default_factory=DeliveryMix)
    settle_delay_s: float = 60.0
    settle_spread: float = 1.0

    def __post_init__(self) -> None:
        if self.settle_delay_s < 0 or self.settle_spread < 0:
            raise ValueError("settle_delay_s and settle_spread must not be negative")

    def delay_bucket(self, number: int) -> int:
        """0–99: which of the hundred settle delays this number gets."""
        return (number // 100) % DELAY_BUCKETS

    def bucket_delay_s(self, bucket: int) -> float:
        return self.settle_delay_s * (1 + self.settle_spread * bucket / (DELAY_BUCKETS - 1))

    def settle_delay_s_for(self, number: int) -> float:
        return self.bucket_delay_s(self.delay_bucket(number))

    def final_status(self, number: int) -> str:
        return self.mix.outcome(number % 100)

    def status(self, number: int, sent_at_s: float, now_s: float) -> str:
        if now_s < sent_at_s + self.settle_delay_s_for(number):
            return PENDING
        return self.final_status(number)

    def statuses(
        self,
        numbers: Sequence[int],
        sent_at_s: float,
        now_s: float,
        invalid_positions: Sequence[int] = (),
    ) -> list[str]:
        """Status of every message of one send; numbers that are not valid settle as `I`."""
        table = self._table(sent_at_s, now_s)
        result = [table[n % _TABLE_SIZE] for n in numbers]
        for position in invalid_positions:
            if result[position] != PENDING:
                result[position] = INVALID
        return result

    def settled_buckets(self, sent_at_s: float, now_s: float) -> int:
        """How many delay buckets (from bucket 0 up) have settled by `now_s`."""
        return sum(1 for b in range(DELAY_BUCKETS) if sent_at_s + self.bucket_delay_s(b) <= now_s)

    def _table(self, sent_at_s: float, now_s: float) -> list[str]:
        settled = self.settled_buckets(sent_at_s, now_s)
        outcomes = [self.mix.outcome(d) for d in range(100)]
        table: list[str] = []
        for bucket in range(DELAY_BUCKETS):
            if bucket < settled:
                table.extend(outcomes)
            else:
                table.extend([PENDING] * 100)
        return table
