"""How many parts, and so credits, a message costs, and where TextLocal cuts it off.

GSM limits are TextLocal's published table (≤160 one part, then 153 per part up to 5 parts, 765
characters). Unicode limits are not published: 70 for one part and 67 per part is the GSM norm.
"""

from __future__ import annotations

from typing import Final

MAX_PARTS: Final = 5
_GSM_SINGLE: Final = 160
_GSM_PART: Final = 153
_UNICODE_SINGLE: Final = 70
_UNICODE_PART: Final = 67
# Published thresholds: >160 → 2, >306 → 3, >459 → 4, >612 → 5.
_GSM_LIMITS: Final = (160, 306, 459, 612, 765)


def max_length(*, unicode: bool) -> int:
    """Longest message TextLocal keeps; longer ones are truncated to this."""
    return MAX_PARTS * (_UNICODE_PART if unicode else _GSM_PART)


def truncate(text: str, *, unicode: bool) -> str:
    return text[: max_length(unicode=unicode)]


def count_parts(text: str, *, unicode: bool) -> int:
    """Parts (= credits per recipient) for a message of this length."""
    length = len(text)
    if unicode:
        if length <= _UNICODE_SINGLE:
            return 1
        return min(MAX_PARTS, -(-length // _UNICODE_PART))
    for parts, limit in enumerate(_GSM_LIMITS, start=1):
        if length <= limit:
            return parts
    return MAX_PARTS
