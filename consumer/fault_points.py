"""Named points in the workflow where a test can crash the daemon on purpose.

Crash-safety tests must stop the process at an exact step boundary (after the segment group was
created, in the middle of loading contacts, after TextLocal accepted a send but before it was
recorded, ...), not after a lucky sleep. The workflow calls `points.reached(name)` at each
boundary; in production nothing happens. A test sets

    TEXTLOCAL_CONSUMER_TEST_KILL_AT=<point>[:<n>]

and the process SIGKILLs itself the n-th time (default: first) it reaches that point. This
variable is for tests only and is logged loudly when set.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from typing import Protocol

from consumer.errors import ConfigError
from consumer.logs import log_event

log = logging.getLogger("consumer.fault_points")

KILL_AT_ENV = "TEXTLOCAL_CONSUMER_TEST_KILL_AT"
POINTS = frozenset(
    {
        "segment.created",  # create_group answered; the group id is not recorded yet
        "contacts.chunk_loaded",  # a chunk was accepted and recorded; more remain
        "send.returned",  # TextLocal accepted the send; its batch id is not recorded yet
        "personal.chunk_sent",  # TextLocal accepted a bulk_json chunk; not recorded yet
        "send.recorded",  # SENT is recorded with its status event, not yet published
        # Receipts turned into outcome records (in the outbox), the receipts not yet deleted.
        "receipts.outcomes_recorded",
        "poll.recorded",  # a poll and its CustomerOutcomes are recorded, not yet published
    }
)


class FaultPoints(Protocol):
    def reached(self, point: str) -> None: ...


class NoFaultPoints:
    def reached(self, point: str) -> None:
        pass


class KillAtPoint:
    """SIGKILLs this process the n-th time `point` is reached."""

    def __init__(self, point: str, occurrence: int = 1) -> None:
        self.point = point
        self.occurrence = occurrence
        self._seen = 0

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self._seen += 1
        if self._seen == self.occurrence:
            log_event(log, "test.kill_point_reached", logging.WARNING, point=point)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


def fault_points_from_env(environ: Mapping[str, str]) -> FaultPoints:
    spec = environ.get(KILL_AT_ENV, "").strip()
    if not spec:
        return NoFaultPoints()
    point, _, occurrence = spec.partition(":")
    if point not in POINTS:
        raise ConfigError(KILL_AT_ENV, f"unknown point {point!r}; known: {sorted(POINTS)}")
    try:
        count = int(occurrence or "1")
    except ValueError:
        raise ConfigError(KILL_AT_ENV, "occurrence after ':' must be a whole number") from None
    log_event(log, "test.kill_point_armed", logging.WARNING, point=point, occurrence=count)
    return KillAtPoint(point, count)
