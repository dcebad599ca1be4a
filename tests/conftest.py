"""Shared test fixtures: a real Kafka broker and a real Redis server, isolated per test.

Where the services come from, in order:
1. `KAFKA_BOOTSTRAP_SERVERS` and `REDIS_URL` from the environment (an existing stack);
2. testcontainers, when the `containers` extra is installed and a Docker engine answers;
3. the local stack (`deploy/local/stack.py up`: Kafka from Maven Central jars, Debian's Redis).

When none works, integration tests skip on a laptop but fail when `CI=true`.
Each test gets unique topic names and its own Redis key prefix, so tests never see each other's
data and the stack can stay up between runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis.asyncio as aioredis
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from consumer.store import connect_redis
from tests.daemon import stack  # noqa: F401  - the daemon-process world fixture
from tests.fixtures_sandbox import sandbox  # noqa: F401
from tests.private_stack import private_stack  # noqa: F401 - fault tests' own services

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Services:
    """Addresses of the real services the integration tests use."""

    kafka_bootstrap: str
    redis_url: str


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def service_unavailable(reason: str) -> NoReturn:
    """In CI a missing service fails the run; elsewhere the integration test is skipped."""
    if running_in_ci():
        pytest.fail(f"CI=true and a required service is unavailable: {reason}", pytrace=False)
    pytest.skip(f"service unavailable: {reason}")


def docker_engine_reachable() -> bool:
    try:
        import docker  # only with the `containers` extra
    except ImportError:
        return False
    try:
        docker.from_env().ping()
    except Exception:  # any failure means "no engine here"
        return False
    return True


def services_from_containers() -> Iterator[Services]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    with (
        KafkaContainer().with_kraft() as kafka,
        RedisContainer().with_command("redis-server --appendonly yes") as redis_container,
    ):
        host = redis_container.get_container_host_ip()
        port = redis_container.get_exposed_port(6379)
        yield Services(kafka.get_bootstrap_server(), f"redis://{host}:{port}/0")


def services_from_local_stack() -> Services:
    result = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "local" / "stack.py"), "up"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        service_unavailable(f"local stack did not start:\n{result.stdout}\n{result.stderr}")
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if line.count("=") == 1)
    return Services(values["KAFKA_BOOTSTRAP_SERVERS"], values["REDIS_URL"])


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """The Kafka broker and Redis server for this test session."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    redis_url = os.environ.get("REDIS_URL")
    if bootstrap and redis_url:
        yield Services(bootstrap, redis_url)
    elif docker_engine_reachable():
        yield from services_from_containers()
    else:
        yield services_from_local_stack()


@pytest.fixture(scope="session")
def kafka_bootstrap(services: Services) -> str:
    admin = AdminClient({"bootstrap.servers": services.kafka_bootstrap})
    try:
        admin.list_topics(timeout=15)
    except Exception as exc:  # reported as "unavailable" with its reason
        service_unavailable(f"Kafka at {services.kafka_bootstrap}: {exc}")
    return services.kafka_bootstrap


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


def unique_name(label: str) -> str:
    return f"test-{label}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def new_topic(kafka_admin: AdminClient) -> Callable[..., str]:
    """Create a topic with a unique name (and given partitions/config); returns its name."""

    def create(
        label: str = "topic", partitions: int = 1, config: dict[str, str] | None = None
    ) -> str:
        name = unique_name(label)
        futures = kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})]
        )
        futures[name].result(timeout=30)
        return name

    return create


@pytest.fixture(scope="session")
def redis_url(services: Services) -> str:
    return services.redis_url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A Redis client (bytes in, bytes out) on the session's real server, made as the daemon
    makes its one (so the store's tests use its command packing too)."""
    client = connect_redis(redis_url)
    try:
        await client.ping()
    except Exception as exc:  # reported as "unavailable" with its reason
        await client.aclose()
        service_unavailable(f"Redis at {redis_url}: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
async def key_prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    """A Redis key namespace of this test alone, removed afterwards."""
    prefix = f"{unique_name('keys')}:"
    yield prefix
    keys: list[Any] = [key async for key in redis_client.scan_iter(match=f"{prefix}*", count=1000)]
    for start in range(0, len(keys), 1000):
        await redis_client.delete(*keys[start : start + 1000])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that ran daemon processes shows the end of each one's log in its report:
    on a CI machine the temporary directory holding the logs is gone afterwards. The daemons'
    logs carry no phone numbers, bodies or secrets (tests/test_logs.py), so this is safe to show.
    """
    outcome: Any = yield
    report: pytest.TestReport = outcome.get_result()
    world = getattr(item, "funcargs", {}).get("stack")
    if report.when != "call" or not report.failed or world is None:
        return
    for daemon in getattr(world, "daemons", []):
        report.sections.append(
            (f"daemon log ({daemon.log_path.name}, last 60 lines)", daemon.tail(60))
        )
