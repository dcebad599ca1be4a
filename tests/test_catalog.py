"""The template catalog: which templates, which changes, and their way to a compacted topic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from consumer.catalog import (
    TemplateCatalog,
    catalog_changes,
    catalog_records,
    fingerprint,
    templates_topic_spec,
)
from consumer.kafka_io import KafkaPublisher
from consumer.keys import RedisKeys
from consumer.metrics import Metrics
from consumer.outbox import OutboxPublisher
from consumer.store import CampaignStore, OutboxEntry
from consumer.templates import TemplateCopy
from consumer.textlocal import TextLocalClient, TextLocalCredentials, TextLocalSettings
from consumer.textlocal_types import Template
from consumer.workflow import ContactGroup
from tests.helpers import REGISTRY, consume, decode_value
from textlocal_sandbox import ManualClock, SandboxHandle

NOW = datetime(2025, 3, 1, 3, 0, tzinfo=UTC)
UK = ContactGroup(1001, "UK customers", "OPT_", "custom1", sender="ShopUK")
VIP = ContactGroup(1002, "VIP customers", "VIP_", "custom2")


def template(template_id: int, title: str, body: str = "Hello", sender: str = "TXTLCL") -> Template:
    return Template(id=template_id, title=title, body=body, sender_name=sender)


# --- pure ------------------------------------------------------------------------------------


def test_only_templates_with_a_group_prefix_are_kept() -> None:
    """Titles without a configured prefix are left out; the rest carry their group."""
    records = catalog_records(
        [template(1, "OPT_Welcome"), template(2, "Internal test"), template(3, "VIP_Gold")],
        [UK, VIP],
        NOW,
    )
    assert [(r.id, r.prefix, r.contact_group_id) for r in records] == [
        (1, "OPT_", 1001),
        (3, "VIP_", 1002),
    ]


def test_the_longest_matching_prefix_wins() -> None:
    """A title matching "OPT_" and "OPT_VIP_" belongs to the "OPT_VIP_" group."""
    nested = ContactGroup(1003, "UK VIPs", "OPT_VIP_", "custom1")
    (record,) = catalog_records([template(7, "OPT_VIP_Gold")], [UK, nested], NOW)
    assert (record.prefix, record.contact_group_id) == ("OPT_VIP_", 1003)


def test_a_single_group_without_prefix_keeps_every_template() -> None:
    """With one group and no prefix, every template is in the catalog."""
    everyone = ContactGroup(1001, "All", "", "custom1")
    records = catalog_records([template(1, "A"), template(2, "B")], [everyone], NOW)
    assert [(r.id, r.prefix) for r in records] == [(1, ""), (2, "")]


def test_sender_is_the_groups_else_the_templates() -> None:
    """The group's sender wins; a group without one uses the template's sender name."""
    records = catalog_records(
        [template(1, "OPT_A", sender="Acme"), template(2, "VIP_B", sender="Acme")],
        [UK, VIP],
        NOW,
    )
    assert [r.sender for r in records] == ["ShopUK", "Acme"]


def test_preview_shows_a_sample_promo_code() -> None:
    """The preview reads as the SMS would, with a sample code in the placeholder."""
    (record,) = catalog_records(
        [template(1, "OPT_A", body="Your code: [%PROMO_CODE%]. See you!")], [UK], NOW
    )
    assert record.preview == "Your code: PROMO123. See you!"
    assert record.body == "Your code: [%PROMO_CODE%]. See you!"


def test_changes_are_new_or_different_records_and_vanished_ids() -> None:
    """Unchanged fingerprints are skipped, changed ones republished, missing ids tombstoned."""
    first = catalog_records([template(1, "OPT_A"), template(2, "OPT_B")], [UK], NOW)
    published = {r.id: fingerprint(r) for r in first} | {9: "gone-template"}
    later = catalog_records(
        [template(1, "OPT_A"), template(2, "OPT_B2"), template(3, "OPT_C")],
        [UK],
        datetime(2025, 3, 2, 3, 0, tzinfo=UTC),
    )
    changes = catalog_changes(later, published)
    assert [r.id for r in changes.changed] == [2, 3]
    assert changes.gone == (9,)
    assert changes.unchanged == 1


def test_the_templates_topic_is_compacted() -> None:
    """The topic spec the daemon creates at start asks for compaction."""
    spec = templates_topic_spec("textlocal.sms.templates.v1", 6)
    assert spec.config == {"cleanup.policy": "compact"}
    assert (spec.name, spec.partitions) == ("textlocal.sms.templates.v1", 6)


# --- against Redis and the sandbox -------------------------------------------------------------


@dataclass
class CatalogRig:
    sandbox: SandboxHandle
    store: CampaignStore
    copy: TemplateCopy
    catalog: TemplateCatalog
    clock: ManualClock

    async def published_entries(self) -> list[OutboxEntry]:
        """Template entries in the outbox, then cleared (as the publisher would)."""
        entries = [e for e in await self.store.outbox_read(10_000) if e.topic == "templates"]
        await self.store.outbox_delete([e.entry_id for e in entries])
        return entries

    async def get_templates_calls(self) -> int:
        return (await self.sandbox.admin.call_counts()).get("get_templates", 0)


@pytest.fixture
async def rig(
    sandbox: SandboxHandle, redis_client: aioredis.Redis, key_prefix: str
) -> AsyncIterator[CatalogRig]:
    store = CampaignStore(redis_client, RedisKeys(prefix=key_prefix), REGISTRY)
    settings = TextLocalSettings(api_url=sandbox.url, rate_limit_per_s=1000, backoff_base_s=0.01)
    async with TextLocalClient(settings, TextLocalCredentials.from_api_key(sandbox.api_key)) as c:
        copy = TemplateCopy(store, c)
        catalog = TemplateCatalog(store, copy, c, REGISTRY, [UK, VIP], sandbox.clock)
        yield CatalogRig(sandbox, store, copy, catalog, sandbox.clock)


def decoded(entries: list[OutboxEntry]) -> dict[int, dict[str, Any] | None]:
    """Template id → decoded record (None for a tombstone)."""
    return {
        int(e.key): None if e.value is None else REGISTRY.decode(e.value).fields for e in entries
    }


async def seed(rig: CatalogRig) -> list[int]:
    return await rig.sandbox.admin.seed_templates(
        [
            {"title": "OPT_Welcome", "body": "Welcome! Code [%PROMO_CODE%]"},
            {"title": "OPT_Reminder", "body": "Don't forget us", "sender_name": "Shop"},
            {"title": "VIP_Gold", "body": "Gold offer", "sender_name": "GoldShop"},
            {"title": "Staff only", "body": "Internal"},
        ]
    )


@pytest.mark.integration
async def test_first_import_publishes_each_prefixed_template(rig: CatalogRig) -> None:
    """One get_templates call; the three prefixed templates go out with their group, all four
    land in the executor's copy."""
    welcome, reminder, gold, staff = await seed(rig)
    outcome = await rig.catalog.import_templates()
    assert (outcome.templates, outcome.kept, outcome.published, outcome.tombstoned) == (4, 3, 3, 0)
    assert await rig.get_templates_calls() == 1
    records = decoded(await rig.published_entries())
    assert set(records) == {welcome, reminder, gold}
    assert records[welcome] == {
        "id": welcome,
        "title": "OPT_Welcome",
        "body": "Welcome! Code [%PROMO_CODE%]",
        "preview": "Welcome! Code PROMO123",
        "prefix": "OPT_",
        "contact_group_id": 1001,
        "sender": "ShopUK",
        "imported_at": records[welcome]["imported_at"],  # type: ignore[index]
        "languages": [],
    }
    gold_record = records[gold]
    assert gold_record is not None
    assert (gold_record["prefix"], gold_record["contact_group_id"]) == ("VIP_", 1002)
    assert gold_record["sender"] == "GoldShop"
    assert [t.id for t in await rig.copy.stored_all()] == [welcome, reminder, gold, staff]


@pytest.mark.integration
async def test_only_changes_are_republished(rig: CatalogRig) -> None:
    """Unchanged: nothing; renamed or edited: republished; deleted or unprefixed: tombstoned."""
    welcome, reminder, gold, staff = await seed(rig)
    await rig.catalog.import_templates()
    await rig.published_entries()

    again = await rig.catalog.import_templates()
    assert (again.published, again.unchanged, again.tombstoned) == (0, 3, 0)
    assert await rig.published_entries() == []

    await rig.sandbox.admin.rename_template(welcome, "OPT_Welcome_2025")
    await rig.sandbox.admin.update_template_body(gold, "Platinum offer [%PROMO_CODE%]")
    await rig.sandbox.admin.delete_template(reminder)
    await rig.sandbox.admin.rename_template(staff, "OPT_Staff")  # now in the catalog
    changed = await rig.catalog.import_templates()
    assert (changed.published, changed.unchanged, changed.tombstoned) == (3, 0, 1)
    records = decoded(await rig.published_entries())
    assert set(records) == {welcome, gold, staff, reminder}
    assert records[reminder] is None
    assert records[welcome]["title"] == "OPT_Welcome_2025"  # type: ignore[index]
    assert records[gold]["preview"] == "Platinum offer PROMO123"  # type: ignore[index]

    await rig.sandbox.admin.rename_template(staff, "Staff only again")  # out of the catalog
    left = await rig.catalog.import_templates()
    assert (left.published, left.tombstoned) == (0, 1)
    assert decoded(await rig.published_entries()) == {staff: None}
    assert set(await rig.catalog.published()) == {welcome, gold}


@pytest.mark.integration
async def test_template_records_and_tombstones_land_on_a_compacted_topic(
    rig: CatalogRig, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    """Through the outbox publisher, records keyed by template id and a null tombstone arrive."""
    topic = new_topic("templates", config={"cleanup.policy": "compact"})
    welcome, reminder, gold, _staff = await seed(rig)
    await rig.catalog.import_templates()
    await rig.sandbox.admin.delete_template(reminder)
    await rig.catalog.import_templates()

    publisher = KafkaPublisher({"bootstrap.servers": kafka_bootstrap})
    try:
        outbox = OutboxPublisher(
            rig.store,
            publisher,
            {"templates": topic},
            Metrics(CollectorRegistry()),
            rig.clock,
            owner="test-replica",
        )
        assert await outbox.publish_pending() == 4
    finally:
        await publisher.close()

    messages = consume(kafka_bootstrap, topic, expected=4)
    keys = [m.key().decode() for m in messages]
    assert keys == [str(welcome), str(reminder), str(gold), str(reminder)]
    assert messages[-1].value() is None
    assert decode_value(messages[0].value())["title"] == "OPT_Welcome"
