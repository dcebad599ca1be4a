"""The opt-out import: TextLocal's opt-outs become CustomerOptOut records, once each, never
carrying the number."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from consumer.contact_index import ContactIndex
from consumer.contact_store import ContactStore
from consumer.errors import ContactIndexMissing, StoreUnavailable
from consumer.events import CustomerOptOutEvent
from consumer.keys import RedisKeys
from consumer.metrics import Metrics
from consumer.optouts import (
    MARKERS_KEPT,
    OVERLAP,
    OptOutImporter,
    ask_since,
    optout_events,
    optout_marker,
)
from consumer.store import CampaignStore
from consumer.textlocal import TextLocalClient, TextLocalCredentials, TextLocalSettings
from consumer.textlocal_types import OptOut
from consumer.workflow import ContactGroup
from tests.helpers import REGISTRY
from textlocal_sandbox import ManualClock, SandboxHandle

AT = datetime(2025, 3, 5, 9, 10, 11, tzinfo=UTC)
READ_AT = datetime(2025, 3, 6, 3, 0, tzinfo=UTC)
NUMBER = "447700900101"


# --- pure ---------------------------------------------------------------------------------------


def test_a_marker_is_textlocals_id_else_a_digest_without_the_number() -> None:
    """With an id the marker is it; without, a digest of number and time, not the number."""
    assert optout_marker(OptOut(NUMBER, AT, 42)) == "id:42"
    digest = optout_marker(OptOut(NUMBER, AT))
    assert digest.startswith("h:")
    assert NUMBER not in digest
    assert digest == optout_marker(OptOut(NUMBER, AT))
    assert digest != optout_marker(OptOut(NUMBER, AT + timedelta(seconds=1)))


def test_one_record_per_group_and_customer_holding_the_number() -> None:
    """A number two groups know gives a record per group; one in a group shared by two customer
    ids gives both; its spelling (+, spaces) does not matter."""
    customers = {1001: {NUMBER: ["C1", "C2"]}, 1002: {NUMBER: ["V9"]}, 1003: {}}
    events = optout_events(OptOut("+44 7700 900101", AT, 5), customers, READ_AT)
    assert [(e.contact_group_id, e.customer_id) for e in events] == [
        (1001, "C1"),
        (1001, "C2"),
        (1002, "V9"),
    ]
    assert all(e.opted_out_at == AT and e.occurred_at == READ_AT for e in events)


def test_an_unknown_or_invalid_number_gives_no_record() -> None:
    """A number no group holds, or one TextLocal could not send to, publishes nothing."""
    customers = {1001: {NUMBER: ["C1"]}}
    assert optout_events(OptOut("447700900999", AT), customers, READ_AT) == []
    assert optout_events(OptOut("07700900101", AT), customers, READ_AT) == []


def test_event_ids_are_deterministic_and_never_carry_the_number() -> None:
    """The same opt-out read again has the same id; another customer or time another; the
    encoded record holds neither the number nor its digits."""
    event = CustomerOptOutEvent("C1", 1001, AT, READ_AT)
    again = CustomerOptOutEvent("C1", 1001, AT, READ_AT + timedelta(days=1))
    assert event.event_id == again.event_id
    assert event.event_id != CustomerOptOutEvent("C2", 1001, AT, READ_AT).event_id
    assert event.event_id != CustomerOptOutEvent("C1", 1001, AT + timedelta(1), READ_AT).event_id
    assert event.key == "1001:C1"
    encoded = REGISTRY.encode("CustomerOptOut", event.to_fields())
    assert REGISTRY.decode(encoded).fields == {
        "event_id": event.event_id,
        "occurred_at": READ_AT,
        "customer_id": "C1",
        "contact_group_id": 1001,
        "opted_out_at": AT,
    }


def test_the_first_import_asks_for_everything_later_ones_overlap() -> None:
    """No watermark: every opt-out (a backfill); then from a day before the latest recorded."""
    assert ask_since(None) is None
    assert ask_since(AT) == AT - OVERLAP


# --- against Redis and the sandbox -------------------------------------------------------------

UK_FIRST = 447_700_000_000  # C0000001 ↔ 447700000000, C0000002 ↔ 447700000001, ...
VIP_FIRST = 447_700_000_000 + 2_000  # the VIP group's V00001 is UK's C0002001


@dataclass
class OptOutRig:
    sandbox: SandboxHandle
    store: CampaignStore
    client: TextLocalClient
    index: ContactIndex
    groups: tuple[ContactGroup, ...]
    clock: ManualClock

    def importer(self) -> tuple[OptOutImporter, Metrics]:
        metrics = Metrics(CollectorRegistry())
        importer = OptOutImporter(
            self.store, self.index, self.client, REGISTRY, self.groups, self.clock, metrics
        )
        return importer, metrics

    async def index_all(self) -> None:
        for group in self.groups:
            await self.index.rebuild(self.client, group, self.clock.now())

    async def records(self) -> list[dict[str, object]]:
        """The CustomerOptOut records in the outbox, decoded, in order."""
        entries = await self.store.outbox_read(100_000)
        return [REGISTRY.decode(e.value or b"").fields for e in entries if e.topic == "optouts"]


@pytest.fixture
async def rig(
    sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str
) -> AsyncIterator[OptOutRig]:
    uk_id = await sandbox.admin.generate_contacts("UK customers", 2_500, first_number=UK_FIRST)
    vip_id = await sandbox.admin.generate_contacts(
        "VIP customers", 100, first_number=VIP_FIRST, id_field="custom2", id_prefix="V", id_width=5
    )
    groups = (
        ContactGroup(uk_id, "UK customers", "OPT_", "custom1"),
        ContactGroup(vip_id, "VIP customers", "VIP_", "custom2"),
    )
    store = CampaignStore(redis_client, RedisKeys(prefix=key_prefix), REGISTRY)
    settings = TextLocalSettings(
        api_url=sandbox.url, rate_limit_per_s=1000, backoff_base_s=0.01, backoff_cap_s=0.02
    )
    sandbox.clock.set(datetime(2025, 3, 5, 8, 0, tzinfo=UTC))
    async with TextLocalClient(settings, TextLocalCredentials.from_api_key(sandbox.api_key)) as c:
        yield OptOutRig(
            sandbox,
            store,
            c,
            ContactIndex(ContactStore(redis_client, store.keys)),
            groups,
            sandbox.clock,
        )


def counter(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"textlocal_consumer_{name}_total") or 0.0


@pytest.mark.integration
async def test_each_optout_is_published_once_with_its_customers(rig: OptOutRig) -> None:
    """Three opt-outs: one UK customer, one number both groups hold, one nobody holds. The
    import records a record per group and customer (3), counts the stranger; a second import
    (the overlap reads all three again) records nothing more."""
    await rig.index_all()
    await rig.sandbox.admin.add_optouts([UK_FIRST + 4, VIP_FIRST + 2, 449_999_000_000])
    importer, metrics = rig.importer()

    first = await importer.import_optouts()

    assert (first.optouts_listed, first.optouts_new) == (3, 3)
    assert (first.optouts_published, first.optouts_unmatched) == (3, 1)
    records = await rig.records()
    assert sorted((r["contact_group_id"], r["customer_id"]) for r in records) == sorted(
        [
            (rig.groups[0].group_id, "C0000005"),
            (rig.groups[0].group_id, "C0002003"),
            (rig.groups[1].group_id, "V00003"),
        ]
    )
    assert all(r["opted_out_at"] == datetime(2025, 3, 5, 8, 0, tzinfo=UTC) for r in records)
    assert len({r["event_id"] for r in records}) == 3
    assert (counter(metrics, "optouts_read"), counter(metrics, "optouts_published")) == (3, 3)
    assert counter(metrics, "optouts_unmatched") == 1

    rig.clock.advance(timedelta(days=1))
    again = await importer.import_optouts()
    assert (again.optouts_listed, again.optouts_new, again.optouts_published) == (3, 0, 0)
    assert len(await rig.records()) == 3
    assert counter(metrics, "optouts_unmatched") == 1


@pytest.mark.integration
async def test_later_imports_ask_since_the_watermark_and_publish_only_the_new(
    rig: OptOutRig,
) -> None:
    """The watermark is TextLocal's time of the latest opt-out; the next import asks from a day
    before it (so reads the last one again) and publishes only the one added since."""
    await rig.index_all()
    await rig.sandbox.admin.add_optouts([UK_FIRST + 1])
    importer, _ = rig.importer()
    await importer.import_optouts()
    assert await rig.store.optouts_watermark() == datetime(2025, 3, 5, 8, 0, tzinfo=UTC)

    rig.clock.advance(timedelta(days=3))
    await rig.sandbox.admin.add_optouts([UK_FIRST + 2])
    rig.clock.advance(timedelta(hours=1))
    later = await importer.import_optouts()

    assert (later.optouts_listed, later.optouts_new, later.optouts_published) == (2, 1, 1)
    assert [r["customer_id"] for r in await rig.records()] == ["C0000002", "C0000003"]
    assert await rig.store.optouts_watermark() == datetime(2025, 3, 8, 8, 0, tzinfo=UTC)
    # The first opt-out's marker is trimmed, being more than MARKERS_KEPT behind the watermark;
    # the next import asks from after it.
    assert timedelta(days=3) > MARKERS_KEPT
    assert await rig.store.redis.zcard(rig.store.keys.optouts_seen) == 1
    last = await importer.import_optouts()
    assert (last.optouts_listed, last.optouts_new) == (1, 0)


@pytest.mark.integration
async def test_two_imports_at_once_still_publish_each_optout_once(rig: OptOutRig) -> None:
    """Two importers racing over the same opt-outs: the atomic record skips what the other
    recorded, so each record exists once."""
    await rig.index_all()
    await rig.sandbox.admin.add_optouts([UK_FIRST + n for n in range(1, 41)])
    (one, _), (two, _) = rig.importer(), rig.importer()
    results = await asyncio.gather(one.import_optouts(), two.import_optouts())
    assert sum(r.optouts_new for r in results) == 40
    records = await rig.records()
    assert len(records) == 40
    assert len({r["customer_id"] for r in records}) == 40


@pytest.mark.integration
async def test_a_group_without_an_index_fails_the_import_and_records_nothing(
    rig: OptOutRig,
) -> None:
    """Before the contact refresh built every group's index, the import fails (to be tried
    again) rather than counting the opt-outs unmatched for good."""
    await rig.index.rebuild(rig.client, rig.groups[0], rig.clock.now())  # VIP not indexed
    await rig.sandbox.admin.add_optouts([UK_FIRST + 1])
    importer, _ = rig.importer()
    with pytest.raises(ContactIndexMissing, match=f"group {rig.groups[1].group_id}"):
        await importer.import_optouts()
    assert await rig.records() == []
    assert await rig.store.optouts_watermark() is None

    await rig.index.rebuild(rig.client, rig.groups[1], rig.clock.now())
    assert (await importer.import_optouts()).optouts_published == 1


class CrashingStore(CampaignStore):
    """The real store whose `record_optouts` fails from its `fail_from`-th call on (a crash)."""

    fail_from = 2
    calls = 0

    async def record_optouts(self, *args: Any, **kwargs: Any) -> list[bool]:
        self.calls += 1
        if self.calls >= self.fail_from:
            raise StoreUnavailable("Redis record opt-outs: crash")
        return await super().record_optouts(*args, **kwargs)


@pytest.mark.integration
async def test_an_import_stopped_between_chunks_loses_and_repeats_nothing(rig: OptOutRig) -> None:
    """500 opt-outs, then 100 four days later; the first import (a backfill) fails after its first
    chunk of 500: the watermark is the chunk's, its markers are kept behind that, and the next
    import publishes the other 100 and none of the 500 again."""
    await rig.index_all()
    await rig.sandbox.admin.add_optouts([UK_FIRST + n for n in range(500)])
    rig.clock.advance(timedelta(days=4))
    await rig.sandbox.admin.add_optouts([UK_FIRST + n for n in range(500, 600)])
    crashing = CrashingStore(rig.store.redis, rig.store.keys, REGISTRY)
    metrics = Metrics(CollectorRegistry())
    failing = OptOutImporter(
        crashing, rig.index, rig.client, REGISTRY, rig.groups, rig.clock, metrics
    )
    with pytest.raises(StoreUnavailable):
        await failing.import_optouts()
    assert len(await rig.records()) == 500
    assert counter(metrics, "optouts_published") == 500
    assert await rig.store.optouts_watermark() == datetime(2025, 3, 5, 8, 0, tzinfo=UTC)

    importer, _ = rig.importer()
    resumed = await importer.import_optouts()

    assert (resumed.optouts_listed, resumed.optouts_new, resumed.optouts_published) == (
        600,
        100,
        100,
    )
    records = await rig.records()
    assert len(records) == 600
    assert len({r["customer_id"] for r in records}) == 600
