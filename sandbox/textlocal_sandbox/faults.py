"""Injected faults: what goes wrong with a request, decided per request by rules with rates.

Kinds:
- `latency`: wait `latency_s` before answering (combines with any other fault);
- `http_5xx`: answer HTTP `status` (default 503) without applying the command;
- `http_429`: answer HTTP 429 with `Retry-After: retry_after_s`, without applying;
- `drop_before`: close the connection without applying the command or answering;
- `drop_after`: apply the command, then close the connection without answering (the reply is
  lost: the client cannot know the command took effect).

Each rule fires with probability `rate` (0..1), only for `command` when one is given, and at most
`limit` times when one is given. With a seed the draws are reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Final

LATENCY: Final = "latency"
HTTP_5XX: Final = "http_5xx"
HTTP_429: Final = "http_429"
DROP_BEFORE: Final = "drop_before"
DROP_AFTER: Final = "drop_after"
KINDS: Final = frozenset({LATENCY, HTTP_5XX, HTTP_429, DROP_BEFORE, DROP_AFTER})


@dataclass(frozen=True)
class FaultRule:
    kind: str
    rate: float = 1.0
    command: str | None = None
    latency_s: float = 0.0
    status: int = 503
    retry_after_s: int = 1
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(KINDS)}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate must be within 0..1, got {self.rate}")
        if self.kind == HTTP_5XX and not 500 <= self.status <= 599:
            raise ValueError(f"http_5xx status must be 5xx, got {self.status}")
        if self.latency_s < 0 or self.retry_after_s < 0 or (self.limit or 0) < 0:
            raise ValueError("latency_s, retry_after_s and limit must not be negative")

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> FaultRule:
        allowed = set(cls.__dataclass_fields__)
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        return cls(**data)  # type: ignore[arg-type]  # checked in __post_init__


@dataclass(frozen=True)
class FaultDecision:
    """What happens to one request: a delay, then at most one failure kind (or none)."""

    latency_s: float = 0.0
    failure: FaultRule | None = None


@dataclass
class FaultPlan:
    """The rules in force, with their random source and how often each has fired."""

    rules: Sequence[FaultRule] = ()
    seed: int | None = None
    fired: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self.fired = [0] * len(self.rules)

    def decide(self, command: str) -> FaultDecision:
        """Roll every matching rule in order; the first failure that fires wins."""
        latency_s = 0.0
        failure: FaultRule | None = None
        for index, rule in enumerate(self.rules):
            if rule.command is not None and rule.command != command:
                continue
            if rule.limit is not None and self.fired[index] >= rule.limit:
                continue
            if rule.kind != LATENCY and failure is not None:
                continue
            if self._random.random() >= rule.rate:
                continue
            self.fired[index] += 1
            if rule.kind == LATENCY:
                latency_s += rule.latency_s
            else:
                failure = rule
        return FaultDecision(latency_s, failure)
