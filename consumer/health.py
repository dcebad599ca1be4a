"""The daemon's small HTTP server: /metrics, /healthz and /readyz on one port (DESIGN §7).

- `/healthz` (liveness): every role's loop has completed an iteration recently, and no unit of
  work (a campaign step, a poll, a daily job) has been running for longer than its bound. A
  failing liveness probe makes Kubernetes restart the pod, which is the cure for a stuck loop.
  A dependency outage (Redis, Kafka) does not fail liveness: restarting cannot end it.
- `/readyz` (readiness): Redis and Kafka answer (as `consumer.dependencies` last saw them), and
  the intake role (if run here) has joined its consumer group. Each answers 200 or 503 with a JSON
  body saying which check failed.
- `/metrics`: the registry passed in, served by prometheus_client's own aiohttp handler: the
  Prometheus text format, or OpenMetrics when the scraper's Accept header asks for it; gzip when
  accepted; `?name[]=` selects metrics.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from consumer.clock import Clock

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"

ReadinessCheck = Callable[[], Awaitable[str | None]]  # None when ready, else why not


LOOP_METRIC = "textlocal_consumer_loop_last_iteration_timestamp_seconds"


@dataclass
class HealthState:
    """Judges liveness from the roles' loop heartbeats (a gauge each role sets per iteration)
    and from probes that tell when the oldest unit of work in flight started."""

    clock: Clock
    registry: CollectorRegistry
    roles: tuple[str, ...]
    # A loop that has not come round for this long is considered dead.
    loop_stall_after: timedelta = timedelta(minutes=2)
    # A unit of work running this long is considered stuck (a million-recipient campaign's
    # contact load takes minutes; an hour means something hangs).
    work_stuck_after: timedelta = timedelta(hours=1)
    work_probes: dict[str, Callable[[], datetime | None]] = field(default_factory=dict)
    started_at: datetime | None = None
    # A role restarted in-process this often within the window has a fault of its own.
    max_role_crashes: int = 5
    role_crash_window: timedelta = timedelta(minutes=10)
    crashes: dict[str, list[datetime]] = field(default_factory=dict)

    def note_crash(self, role: str) -> None:
        self.crashes.setdefault(role, []).append(self.clock.now())

    def problems(self) -> list[str]:
        now = self.clock.now()
        started = self.started_at or now
        found = []
        for role in self.roles:
            beat = self.registry.get_sample_value(LOOP_METRIC, {"role": role})
            silent_s = now.timestamp() - (beat if beat is not None else started.timestamp())
            if silent_s > self.loop_stall_after.total_seconds():
                found.append(f"{role} loop silent for {silent_s:.0f}s")
        for name, oldest_started in self.work_probes.items():
            since = oldest_started()
            if since is not None and now - since > self.work_stuck_after:
                found.append(f"{name} running for {(now - since).total_seconds():.0f}s")
        for role, moments in self.crashes.items():
            recent = [m for m in moments if now - m <= self.role_crash_window]
            self.crashes[role] = recent
            if len(recent) >= self.max_role_crashes:
                found.append(f"{role} restarted {len(recent)} times in {self.role_crash_window}")
        return found


def health_app(
    health: HealthState,
    readiness: Mapping[str, ReadinessCheck],
    registry: CollectorRegistry,
) -> web.Application:
    """The aiohttp application serving the three paths."""

    async def healthz(_request: web.Request) -> web.Response:
        problems = health.problems()
        return _answer(not problems, {"problems": problems})

    async def readyz(_request: web.Request) -> web.Response:
        failing = {}
        for name, check in readiness.items():
            why = await check()
            if why is not None:
                failing[name] = why
        return _answer(not failing, {"failing": failing})

    app = web.Application()
    app.router.add_get(HEALTH_PATH, healthz)
    app.router.add_get(READY_PATH, readyz)
    app.router.add_get(METRICS_PATH, make_aiohttp_handler(registry))
    return app


def _answer(ok: bool, details: Mapping[str, object]) -> web.Response:
    body = {"status": "ok" if ok else "failing", **details}
    return web.Response(
        status=200 if ok else 503, text=json.dumps(body), content_type="application/json"
    )
