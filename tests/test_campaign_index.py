"""The campaign index over time: state sets kept by the scripts, retention trim, the gauge."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from consumer.app import FINISHED_CAMPAIGN_RETENTION, refresh_campaign_gauge
from consumer.events import CampaignRef
from consumer.keys import RedisKeys
from consumer.metrics import Metrics
from consumer.store import CampaignStore, OutboxEntry, Transition, as_text
from consumer.workflow import CampaignState
from tests.conftest import REPO
from tests.helpers import REGISTRY, new_ref, recipients, scheduled

pytestmark = pytest.mark.integration

RETENTION = timedelta(days=30)
S = CampaignState


@pytest.fixture
def store(redis_client: aioredis.Redis, key_prefix: str) -> CampaignStore:
    return CampaignStore(redis_client, RedisKeys(prefix=key_prefix), REGISTRY)


async def record_header(
    store: CampaignStore, ref: CampaignRef, batch_count: int, now: datetime
) -> str:
    event = scheduled(ref, recipient_count=batch_count, batch_count=batch_count)
    accepted = OutboxEntry("status", ref.key, b"accepted", f"accepted-{event.event_id}")
    outcome = await store.record_header(
        event, accepted, now, now + timedelta(hours=6), fingerprint=f"h|{event.event_id}"
    )
    return outcome.state


async def record_batch(store: CampaignStore, ref: CampaignRef, index: int, now: datetime) -> str:
    event = recipients(ref, index, [f"C{index}"])
    recorded = await store.record_batch(
        event, now, now + timedelta(hours=6), fingerprint=f"b|{event.event_id}"
    )
    return recorded.state


def step(store: CampaignStore, key: str, before: S, after: S) -> Transition:
    transition = store.transition(key).expect(before).set_state(after)
    if after.is_final:
        transition.expire(store.keys.campaign(key), int(RETENTION.total_seconds()))
    return transition


async def finished(store: CampaignStore, key: str, at: datetime, state: S = S.DONE) -> None:
    """A campaign that ended at `at`, as the workflow leaves it (final state, hash expiring)."""
    transition = (
        store.transition(key)
        .expect(absent=True)
        .set_state(state)
        .set(ended_at=at)
        .expire(store.keys.campaign(key), int(RETENTION.total_seconds()))
    )
    assert (await store.apply(transition, at)).ok


async def index_members(store: CampaignStore) -> set[str]:
    members = await store.redis.zrange(store.keys.campaigns_index, 0, -1)
    return {as_text(member) for member in members}


async def state_set(store: CampaignStore, state: S) -> set[str]:
    members = await store.redis.zrange(store.keys.campaigns_in_state(state.value), 0, -1)
    return {as_text(member) for member in members}


async def counted_from_hashes(store: CampaignStore) -> dict[S, int]:
    """The slow way, as the gauge used to count: every index member's hash."""
    counts = dict.fromkeys(S, 0)
    for key in await index_members(store):
        state = await store.redis.hget(store.keys.campaign(key), "state")
        if state is not None:
            counts[S(as_text(state))] += 1
    return counts


async def test_state_sets_follow_every_transition(store: CampaignStore) -> None:
    """Header, batches and transitions keep each campaign in exactly the set of its state."""
    now = datetime.now(UTC)
    two_batches, batch_first, sent, rejected = (new_ref() for _ in range(4))
    assert await record_header(store, two_batches, 2, now) == "COLLECTING"
    assert await record_batch(store, two_batches, 0, now) == "COLLECTING"
    assert await record_batch(store, two_batches, 1, now) == "READY"
    assert await record_batch(store, batch_first, 0, now) == "COLLECTING"
    assert await record_header(store, batch_first, 1, now) == "READY"
    await record_header(store, sent, 1, now)
    await record_batch(store, sent, 0, now)
    path = [S.READY, S.SEGMENT_CREATED, S.CONTACTS_LOADED, S.SEND_PENDING, S.SENT, S.POLLING]
    for before, after in itertools.pairwise(path):
        assert (await store.apply(step(store, sent.key, before, after), now)).ok
    polled = store.transition(sent.key).expect(S.POLLING).set(polls_done=1)
    assert (await store.apply(polled, now)).ok  # a write that leaves the state as it is
    refused = step(store, sent.key, S.READY, S.FAILED)  # expects a state it is not in
    assert not (await store.apply(refused, now)).ok
    rejection = store.transition(rejected.key).expect(absent=True).set_state(S.REJECTED)
    assert (await store.apply(rejection, now)).ok
    assert await record_batch(store, rejected, 0, now) == "REJECTED"  # ignored: changes nothing

    counts = await store.campaign_counts()
    expected = {**dict.fromkeys(S, 0), S.READY: 2, S.POLLING: 1, S.REJECTED: 1}
    assert counts == expected
    assert counts == await counted_from_hashes(store)
    assert await state_set(store, S.READY) == {two_batches.key, batch_first.key}
    assert await state_set(store, S.POLLING) == {sent.key}
    for state in (S.COLLECTING, S.SEGMENT_CREATED, S.SENT):
        assert await state_set(store, state) == set()


async def test_trim_removes_only_campaigns_whose_retention_ended(store: CampaignStore) -> None:
    """Only a campaign past its retention whose hash is gone leaves the index; others stay."""
    now = datetime.now(UTC)
    long_ago = now - RETENTION - timedelta(minutes=1)
    keys = store.keys
    await finished(store, "expired", long_ago)
    await store.redis.delete(keys.campaign("expired"))  # what its TTL running out does
    await finished(store, "still-held", long_ago)  # its hash expires in 30 days (real time)
    live = store.transition("waiting").expect(absent=True).set_state(S.SENT)
    assert (await store.apply(live, long_ago)).ok  # not final: no TTL, never trimmed
    await finished(store, "recent", now - timedelta(minutes=1))
    await store.redis.delete(keys.campaign("recent"))  # gone, but within retention: not looked at
    await finished(store, "misfiled", long_ago, S.FAILED)
    await store.redis.zrem(keys.campaigns_in_state("FAILED"), "misfiled")
    await store.redis.zadd(keys.campaigns_in_state("SENT"), {"misfiled": 1})

    assert await store.trim_campaign_index(now, RETENTION) == 1

    assert await index_members(store) == {"still-held", "waiting", "recent", "misfiled"}
    assert await state_set(store, S.DONE) == {"still-held", "recent"}
    assert await state_set(store, S.SENT) == {"waiting"}
    assert await state_set(store, S.FAILED) == {"misfiled"}
    # The ones still held are looked at again only when their hash can have expired.
    cutoff_ms = (now - RETENTION).timestamp() * 1000
    held = await store.redis.zscore(keys.campaigns_in_state("DONE"), "still-held")
    ttl_ms = await store.redis.pttl(keys.campaign("still-held"))
    assert held is not None
    assert abs(held - (cutoff_ms + ttl_ms)) < 5_000
    assert await store.trim_campaign_index(now, RETENTION) == 0


async def test_trim_is_bounded_per_round(store: CampaignStore) -> None:
    """One round looks at no more than `limit` members of a set; further rounds take the rest."""
    long_ago = datetime.now(UTC) - RETENTION - timedelta(hours=1)
    keys = [f"old-{i}" for i in range(7)]
    for key in keys:
        await finished(store, key, long_ago)
    await store.redis.delete(*(store.keys.campaign(key) for key in keys))
    now = datetime.now(UTC)

    assert await store.trim_campaign_index(now, RETENTION, limit=3, max_rounds=1) == 3
    assert len(await index_members(store)) == 4
    assert await store.trim_campaign_index(now, RETENTION, limit=3) == 4
    assert await index_members(store) == set()
    assert (await store.campaign_counts())[S.DONE] == 0


async def test_gauge_counts_by_state_after_the_trim(store: CampaignStore) -> None:
    """One gauge cycle trims expired campaigns, then sets `campaigns{state}` from the sets."""
    now = datetime.now(UTC)
    await finished(store, "done-1", now)
    await finished(store, "done-2", now)
    await finished(store, "cancelled", now, S.CANCELLED)
    await finished(store, "expired", now - RETENTION - timedelta(minutes=1))
    await store.redis.delete(store.keys.campaign("expired"))
    await record_header(store, new_ref(), 3, now)
    metrics = Metrics(CollectorRegistry())

    counts = await refresh_campaign_gauge(store, metrics, now, owner="test")

    assert FINISHED_CAMPAIGN_RETENTION == RETENTION
    assert counts == {**dict.fromkeys(S, 0), S.DONE: 2, S.CANCELLED: 1, S.COLLECTING: 1}
    for state, value in counts.items():
        sample = metrics.registry.get_sample_value(
            "textlocal_consumer_campaigns", {"state": state.value}
        )
        assert sample == value
    assert "expired" not in await index_members(store)


async def test_index_of_an_earlier_version_is_filed_by_state_once(store: CampaignStore) -> None:
    """Campaigns indexed without state sets are filed once; expired members leave the index."""
    keys = store.keys
    now = datetime.now(UTC)
    updated_ms = int(now.timestamp() * 1000) - 60_000
    for key, state in (("old-sent", "SENT"), ("old-done", "DONE"), ("old-ready", "READY")):
        await store.redis.hset(keys.campaign(key), mapping={"state": state})
        await store.redis.zadd(keys.campaigns_index, {key: updated_ms})
    await store.redis.zadd(keys.campaigns_index, {"old-expired": 1000})  # hash long gone
    metrics = Metrics(CollectorRegistry())
    assert not await store.campaign_states_indexed()

    counts = await refresh_campaign_gauge(store, metrics, now, owner="test")

    assert counts == {**dict.fromkeys(S, 0), S.SENT: 1, S.DONE: 1, S.READY: 1}
    assert await store.campaign_states_indexed()
    assert await index_members(store) == {"old-sent", "old-done", "old-ready"}
    assert await store.redis.zscore(keys.campaigns_in_state("SENT"), "old-sent") == updated_ms
    moved = store.transition("old-ready").expect(S.READY).set_state(S.SEGMENT_CREATED)
    assert (await store.apply(moved, now)).ok
    assert await store.index_campaign_states() == 0  # again: idempotent
    assert await store.campaign_counts() == await counted_from_hashes(store)
    assert await state_set(store, S.SEGMENT_CREATED) == {"old-ready"}


async def test_apply_all_applies_each_transition_on_its_own(store: CampaignStore) -> None:
    """A pipelined batch of transitions: each applied atomically, a refused one refused alone."""
    now = datetime.now(UTC)
    results = await store.apply_all(
        [
            store.transition("a").expect(absent=True).set_state(S.DONE),
            store.transition("b").expect(S.SENT).set_state(S.DONE),  # there is no "b"
            store.transition("c").expect(absent=True).set_state(S.FAILED),
        ],
        now,
    )
    assert [result.ok for result in results] == [True, False, True]
    assert results[1].reason == "conflict:-"
    assert await index_members(store) == {"a", "c"}
    assert (await store.campaign_counts())[S.DONE] == 1


async def test_campaigns_command_lists_recent_ones_and_counts_by_state(
    store: CampaignStore, redis_url: str, kafka_bootstrap: str
) -> None:
    """`campaigns --limit 2` shows the two latest campaigns and the counts from the sets."""
    start = datetime.now(UTC)
    for minute, key in enumerate(("1:first:505", "1:second:505", "1:third:505")):
        await finished(store, key, start + timedelta(minutes=minute))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO),  # this checkout's code, whatever the venv was installed from
        "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "TEXTLOCAL_CONSUMER_REDIS_URL": redis_url,
        "TEXTLOCAL_CONSUMER_REDIS_KEY_PREFIX": store.keys.prefix,
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": "unused",
        "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": '[{"id": 1, "customer_id_field": "custom1"}]',
    }
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "consumer.cli", "campaigns", "--limit", "2"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [
        ["1:third:505", "DONE"],
        ["1:second:505", "DONE"],
    ]
    assert lines[2] == "by state: DONE 3"
