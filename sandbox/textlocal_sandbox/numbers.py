"""Phone numbers as TextLocal takes them: international digits, no leading zero or plus.

The sandbox keeps every number as an int, so a number is valid when it has 10–15 digits and, when
it starts with the UK's 44, exactly 12 (44 + a 10-digit national number without its 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

_MIN_VALID: Final = 10**9
_MAX_VALID: Final = 10**15
# Numbers that start with 44 but are not 12 digits long: [44·10^(L-2), 45·10^(L-2)) per length L.
_BAD_UK_RANGES: Final = tuple(
    (44 * 10 ** (length - 2), 45 * 10 ** (length - 2)) for length in (10, 11, 13, 14, 15)
)
# Fast path for large batches: every number in this block is a 12-digit UK mobile.
_UK_MOBILE_LOW: Final = 447_000_000_000
_UK_MOBILE_HIGH: Final = 448_000_000_000


def is_valid_number(number: int) -> bool:
    """Whether TextLocal would accept this number as a recipient."""
    if not _MIN_VALID <= number < _MAX_VALID:
        return False
    return not any(low <= number < high for low, high in _BAD_UK_RANGES)


def parse_number(text: str) -> int | None:
    """The number in `text` ("447700900123", " +447700900123 "), or None when it is not valid."""
    digits = text.strip()
    if digits.startswith("+"):
        digits = digits[1:]
    if not digits.isascii() or not digits.isdigit() or digits.startswith("0"):
        return None
    number = int(digits)
    return number if is_valid_number(number) else None


def invalid_positions(numbers: Sequence[int]) -> tuple[int, ...]:
    """Positions of the numbers that are not valid; quick when all are UK mobiles."""
    if not numbers or (min(numbers) >= _UK_MOBILE_LOW and max(numbers) < _UK_MOBILE_HIGH):
        return ()
    return tuple(i for i, n in enumerate(numbers) if not is_valid_number(n))
