"""Redis and Kafka as the daemon sees them: up or down, watched, and waited out (DESIGN §6a).

An outage of either (a crash, a failover, maintenance) is not the daemon's fault, and restarting
the daemon does not end it: every role backs off and resumes by itself when the dependency is
back. This module keeps the daemon's view of each dependency:

- a watcher probes each one (Redis: PING; Kafka: a metadata request) every `probe_every_s`,
  so the view recovers within seconds of the dependency's return;
- `textlocal_consumer_dependency_up{dependency}` is 1 or 0, and
  `textlocal_consumer_dependency_outages_total{dependency}` counts the outages;
- one WARNING line when an outage starts (`dependency.down`) and one INFO line when it ends
  (`dependency.up`, with its duration): the roles' own retry lines during an outage are DEBUG
  after their first (see `FailureStreak`);
- `/readyz` answers 503 while a dependency is down; `/healthz` does not look at dependencies.

The daemon never gives up on an outage, however long: a replica that exited would only come back
to the same outage, later, through Kubernetes' growing restart back-off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from consumer.clock import pause
from consumer.logs import log_event
from consumer.metrics import Metrics

log = logging.getLogger("consumer.dependencies")

Probe = Callable[[], Awaitable[bool]]  # True when the dependency answers


@dataclass
class _Outage:
    started_s: float
    detail: str


class DependencyMonitor:
    """Up/down state of the daemon's dependencies, from periodic probes."""

    def __init__(
        self, probes: Mapping[str, Probe], metrics: Metrics, probe_every_s: float = 2.0
    ) -> None:
        self._probes = dict(probes)
        self._metrics = metrics
        self._probe_every_s = probe_every_s
        self._outages: dict[str, _Outage] = {}
        for name in self._probes:
            metrics.dependency_up.labels(name).set(1)

    def is_up(self, name: str) -> bool:
        return name not in self._outages

    def down(self) -> dict[str, str]:
        """The dependencies down now, each with what the last probe said."""
        return {name: outage.detail for name, outage in self._outages.items()}

    async def watch(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.probe_all()
            await pause(stopping, self._probe_every_s)

    async def probe_all(self) -> None:
        results = await asyncio.gather(*(self._probe(name) for name in self._probes))
        for name, up in zip(self._probes, results, strict=True):
            self.observe(name, up)

    def observe(self, name: str, up: bool, detail: str = "does not answer") -> None:
        """Record what a probe (or a failed call) said about a dependency."""
        outage = self._outages.get(name)
        if up and outage is not None:
            del self._outages[name]
            self._metrics.dependency_up.labels(name).set(1)
            log_event(
                log,
                "dependency.up",
                dependency=name,
                outage_s=round(time.monotonic() - outage.started_s, 1),
            )
        elif not up and outage is None:
            self._outages[name] = _Outage(time.monotonic(), detail)
            self._metrics.dependency_up.labels(name).set(0)
            self._metrics.dependency_outages.labels(name).inc()
            log_event(log, "dependency.down", logging.WARNING, dependency=name, detail=detail)

    async def _probe(self, name: str) -> bool:
        try:
            return await asyncio.wait_for(self._probes[name](), timeout=self._probe_every_s * 3)
        except TimeoutError:
            return False


class FailureStreak:
    """Logs the first failure of a streak at WARNING and the rest at DEBUG, then the recovery.

    A role retrying through an outage would otherwise write a warning per retry.
    """

    def __init__(self, logger: logging.Logger, event: str) -> None:
        self._logger = logger
        self._event = event
        self.failures = 0

    def failed(self, **context: object) -> None:
        self.failures += 1
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        log_event(self._logger, self._event, level, failures=self.failures, **context)

    def succeeded(self) -> None:
        if self.failures:
            log_event(self._logger, f"{self._event.rsplit('.', 1)[0]}.resumed", after=self.failures)
            self.failures = 0
