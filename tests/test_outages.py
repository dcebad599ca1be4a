"""Redis and Kafka outages are waited out: the daemon process never exits, nothing is lost.

Each test runs the daemon as a real process against a Redis (or a Kafka broker) of its own,
which it SIGKILLs (or SIGSTOPs) mid-campaign and brings back on the same data. Every campaign is
still sent exactly once to exactly its recipients; `/readyz` says 503 while the dependency is
away and 200 after; `/healthz` stays 200 throughout.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from consumer.events import CampaignRef
from consumer.keys import RedisKeys
from consumer.store import CampaignStore
from consumer.workflow import CampaignState
from tests.daemon import DaemonProcess, Stack, customer_ids
from tests.helpers import REGISTRY, consume, eventually, new_ref, produce
from tests.private_stack import PrivateStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
async def private_store(
    private_stack: PrivateStack,
    key_prefix: str,
) -> AsyncIterator[CampaignStore]:
    private_stack.start_redis()
    client: aioredis.Redis = aioredis.Redis.from_url(
        private_stack.redis_url, socket_timeout=2, socket_connect_timeout=1
    )
    try:
        yield CampaignStore(client, RedisKeys(prefix=key_prefix), REGISTRY)
    finally:
        await client.aclose()


async def state_of(store: CampaignStore, ref: CampaignRef) -> CampaignState | None:
    try:
        snapshot = await store.load(ref.key)
    except Exception:
        return None
    return None if snapshot is None else snapshot.state


async def wait_for(probe: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    probe.__name__ = what
    await eventually(probe, timeout_s=timeout_s, interval_s=0.2)


async def readiness(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    return await daemon.health("/readyz")


async def assert_each_number_once(stack: Stack, expected: int) -> None:
    per_number = Counter(m.number for m in await stack.sandbox.admin.messages())
    assert len(per_number) == expected
    assert max(per_number.values()) == 1, "a recipient got more than one SMS"


async def test_redis_sigkilled_mid_campaign_is_waited_out(
    stack: Stack,
    private_stack: PrivateStack,
    private_store: CampaignStore,
) -> None:
    """SIGKILL redis-server while 20,000 contacts load; restart it: sent once, process alive."""
    ref, later = new_ref(), new_ref()
    daemon = stack.daemon(
        TEXTLOCAL_CONSUMER_REDIS_URL=private_stack.redis_url,
        TEXTLOCAL_CONSUMER_REDIS_KEY_PREFIX=private_store.keys.prefix,
        TEXTLOCAL_CONSUMER_WORKFLOW_CONTACT_LOAD_CONCURRENCY="1",
        TEXTLOCAL_CONSUMER_TEXTLOCAL_RATE_LIMIT_PER_S="4",
    ).start()
    await daemon.wait_ready()
    stack.publish(*stack.campaign(ref, customer_ids(1, 20_000), batches=2))

    async def loading() -> bool:
        return await state_of(private_store, ref) == CampaignState.SEGMENT_CREATED

    await wait_for(loading, 60, "the campaign is loading contacts")
    private_stack.kill_redis()

    async def unready() -> bool:
        status, body = await readiness(daemon)
        return status == 503 and "redis" in body.get("failing", {})

    await wait_for(unready, 30, "/readyz reports Redis down")
    assert (await daemon.health("/healthz"))[0] == 200
    await asyncio.sleep(3)  # an outage of a few seconds, as in a restart or failover
    assert daemon.process is not None
    assert daemon.process.poll() is None
    private_stack.start_redis()

    async def sent() -> bool:
        return await state_of(private_store, ref) == CampaignState.SENT

    await wait_for(sent, 120, "the campaign is sent")
    stack.publish(*stack.campaign(later, customer_ids(20_001, 50), batches=1))

    async def later_sent() -> bool:
        return await state_of(private_store, later) == CampaignState.SENT

    await wait_for(later_sent, 60, "a campaign published after the outage is sent")
    await wait_for(lambda: _is(readiness(daemon), 200), 30, "/readyz is 200 again")
    await assert_each_number_once(stack, 20_050)
    assert (await stack.sandbox.admin.call_counts())["send"] == 2
    events = [e.get("event") for e in daemon.events()]
    assert events.count("dependency.down") == 1
    assert "daemon.role_crashed" not in events
    assert "Task exception was never retrieved" not in daemon.output()
    assert await daemon.stop() == 0


async def test_redis_hung_for_a_minute_is_waited_out(
    stack: Stack,
    private_stack: PrivateStack,
    private_store: CampaignStore,
) -> None:
    """Redis stopped (SIGSTOP) for 60 s, ten lease periods: the campaign still goes out once."""
    refs = [new_ref() for _ in range(3)]
    daemon = stack.daemon(
        TEXTLOCAL_CONSUMER_REDIS_URL=private_stack.redis_url,
        TEXTLOCAL_CONSUMER_REDIS_KEY_PREFIX=private_store.keys.prefix,
    ).start()
    await daemon.wait_ready()
    for index, ref in enumerate(refs):
        stack.publish(*stack.campaign(ref, customer_ids(1 + 3_000 * index, 3_000), batches=1))

    async def started() -> bool:
        return await state_of(private_store, refs[0]) not in (None, CampaignState.COLLECTING)

    await wait_for(started, 60, "the first campaign is under way")
    private_stack.signal_redis(signal.SIGSTOP)
    try:
        await asyncio.sleep(60)
        assert daemon.process is not None
        assert daemon.process.poll() is None
        status, body = await readiness(daemon)
        assert status == 503, body
        assert (await daemon.health("/healthz"))[0] == 200
    finally:
        private_stack.signal_redis(signal.SIGCONT)

    for ref in refs:

        async def sent(ref: CampaignRef = ref) -> bool:
            return await state_of(private_store, ref) == CampaignState.SENT

        await wait_for(sent, 180, f"{ref.key} is sent")
    await assert_each_number_once(stack, 9_000)
    assert (await stack.sandbox.admin.call_counts())["send"] == 3
    assert "Task exception was never retrieved" not in daemon.output()
    assert await daemon.stop() == 0


async def test_kafka_broker_sigkilled_mid_campaign_is_waited_out(
    stack: Stack,
    private_stack: PrivateStack,
) -> None:
    """SIGKILL the broker mid-campaign and restart it: every status arrives, sent once."""
    private_stack.start_kafka()
    bootstrap = private_stack.bootstrap
    topics = stack.topics
    ref, later = new_ref(), new_ref()
    daemon = stack.daemon(
        TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        TEXTLOCAL_CONSUMER_KAFKA_CREATE_TOPICS="true",
        TEXTLOCAL_CONSUMER_KAFKA_TOPIC_PARTITIONS="3",
        TEXTLOCAL_CONSUMER_WORKFLOW_CONTACT_LOAD_CONCURRENCY="1",
        TEXTLOCAL_CONSUMER_TEXTLOCAL_RATE_LIMIT_PER_S="4",
    ).start()
    await daemon.wait_ready()
    produce(bootstrap, topics.input, stack.campaign(ref, customer_ids(1, 20_000), batches=2))

    async def loading() -> bool:
        return await stack.state(ref) == CampaignState.SEGMENT_CREATED

    await wait_for(loading, 60, "the campaign is loading contacts")
    private_stack.kill_kafka()

    async def unready() -> bool:
        status, body = await readiness(daemon)
        return status == 503 and "kafka" in body.get("failing", {})

    await wait_for(unready, 30, "/readyz reports Kafka down")
    await stack.wait_for_state(ref, CampaignState.SENT, timeout_s=120)  # Redis is up: it goes on
    assert (await daemon.health("/healthz"))[0] == 200
    assert daemon.process is not None
    assert daemon.process.poll() is None
    private_stack.start_kafka()
    await wait_for(lambda: _is(readiness(daemon), 200), 90, "/readyz is 200 again")
    produce(bootstrap, topics.input, stack.campaign(later, customer_ids(20_001, 50), batches=1))
    await stack.wait_for_state(later, CampaignState.SENT, timeout_s=90)

    records = consume(bootstrap, topics.status, expected=6, timeout_s=60)
    statuses = Counter(
        (fields["campaign_id"], fields["status"])
        for fields in (REGISTRY.decode(r.value()).fields for r in records)
    )
    for campaign in (ref, later):
        for status in ("ACCEPTED", "SEGMENT_CREATED", "SENT"):
            assert statuses[campaign.campaign_id, status] >= 1, (campaign, status, statuses)
    await assert_each_number_once(stack, 20_050)
    assert "Task exception was never retrieved" not in daemon.output()
    assert await daemon.stop() == 0


async def _is(answer: Awaitable[tuple[int, dict[str, Any]]], status: int) -> bool:
    try:
        return (await answer)[0] == status
    except Exception:
        return False
