"""The template catalog: TextLocal's templates offered to Optimove on a compacted Kafka topic.

One import makes one `get_templates` call and
1. refreshes the executor's Redis copy of every template (`TemplateCopy.replace`);
2. keeps the templates whose title starts with a configured contact group's prefix (the longest
   prefix wins; a single group without a prefix keeps them all) and turns each into a `Template`
   record: id, title, body, preview, the group's prefix and id, and the sender (the group's, else
   the template's own);
3. publishes, through the outbox, only what changed since the last import: a record whose
   fingerprint (everything but `imported_at`) differs from the one remembered in
   `keys.templates_published`, and a tombstone (null value) for a template that disappeared or
   no longer matches any prefix.

The preview is the body as a recipient reads it, with the sample code `PROMO123` in the
`[%PROMO_CODE%]` placeholder (`workflow.template_preview`); other text is shown as TextLocal
sends it.

Delivery is at least once: the entries are added to the outbox first and the fingerprints
recorded after, so a crash in between republishes the same records (harmless on a compacted
topic keyed by template id), never loses a change.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from consumer.clock import Clock
from consumer.codec import SchemaRegistry
from consumer.events import TemplateRecord
from consumer.kafka_io import TopicSpec
from consumer.logs import log_event
from consumer.outbox import template_entry, template_tombstone
from consumer.send_plan import template_families
from consumer.store import CampaignStore
from consumer.templates import TemplateCopy
from consumer.textlocal_types import Template
from consumer.workflow import ContactGroup, contact_group_for, template_preview

log = logging.getLogger("consumer.catalog")


class TemplateSource(Protocol):
    """What the catalog needs of the TextLocal client."""

    async def get_templates(self) -> list[Template]: ...


def templates_topic_spec(name: str, partitions: int) -> TopicSpec:
    """The templates topic: compacted, so the latest record per template id is kept forever."""
    return TopicSpec(name=name, partitions=partitions, config={"cleanup.policy": "compact"})


# --- pure: which records, and which of them changed ----------------------------------------------


def catalog_records(
    templates: Sequence[Template], groups: Sequence[ContactGroup], imported_at: datetime
) -> list[TemplateRecord]:
    """A record for each template family whose title starts with a group's prefix, by id.

    A family (`send_plan.template_families`: `OPT_Welcome`, `OPT_Welcome [fr]`, ...) is one
    record: its default's id, title and body, and its languages. Variants are not offered
    apart, so Optimove's picker shows each family once.
    """
    records = []
    kept = [t for t in templates if contact_group_for(t.title, groups) is not None]
    for family in template_families(kept).values():
        template = family.default
        group = contact_group_for(template.title, groups)
        assert group is not None
        records.append(
            TemplateRecord(
                id=template.id,
                title=template.title,
                body=template.body,
                preview=template_preview(template.body),
                prefix=group.template_prefix,
                contact_group_id=group.group_id,
                sender=group.sender or template.sender_name,
                imported_at=imported_at,
                languages=tuple(family.languages),
            )
        )
    return sorted(records, key=lambda record: record.id)


def fingerprint(record: TemplateRecord) -> str:
    """What a consumer of the topic sees of a template, hashed (`imported_at` left out)."""
    content = {name: value for name, value in vars(record).items() if name != "imported_at"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CatalogChanges:
    changed: tuple[TemplateRecord, ...]  # new or different: republished
    gone: tuple[int, ...]  # published before, absent now: tombstoned
    unchanged: int


def catalog_changes(
    records: Sequence[TemplateRecord], published: Mapping[int, str]
) -> CatalogChanges:
    """Compare this import's records with the fingerprints published last time."""
    current = {record.id for record in records}
    changed = tuple(r for r in records if published.get(r.id) != fingerprint(r))
    gone = tuple(sorted(template_id for template_id in published if template_id not in current))
    return CatalogChanges(changed, gone, unchanged=len(records) - len(changed))


# --- the import ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogImport:
    """What one import found and published."""

    templates: int  # TextLocal's templates, all of them
    kept: int  # matching a contact group's prefix
    published: int  # new or changed, republished
    unchanged: int
    tombstoned: int


class TemplateCatalog:
    """Imports TextLocal's templates and publishes the changes; see the module docstring."""

    def __init__(
        self,
        store: CampaignStore,
        copy: TemplateCopy,
        client: TemplateSource,
        registry: SchemaRegistry,
        groups: Sequence[ContactGroup],
        clock: Clock,
    ) -> None:
        self._store = store
        self._copy = copy
        self._client = client
        self._registry = registry
        self._groups = tuple(groups)
        self._clock = clock

    async def import_templates(self) -> CatalogImport:
        templates = await self._client.get_templates()
        await self._copy.replace(templates)
        records = catalog_records(templates, self._groups, self._clock.now())
        changes = catalog_changes(records, await self.published())
        await self._store.add_to_outbox(
            [template_entry(self._registry, record) for record in changes.changed]
            + [template_tombstone(template_id) for template_id in changes.gone]
        )
        await self._remember(changes)
        outcome = CatalogImport(
            templates=len(templates),
            kept=len(records),
            published=len(changes.changed),
            unchanged=changes.unchanged,
            tombstoned=len(changes.gone),
        )
        log_event(log, "catalog.imported", **vars(outcome))
        return outcome

    async def published(self) -> dict[int, str]:
        """Template id → fingerprint of what the topic holds (as far as this catalog knows)."""
        return await self._store.published_templates()

    async def _remember(self, changes: CatalogChanges) -> None:
        await self._store.record_published_templates(
            {record.id: fingerprint(record) for record in changes.changed}, changes.gone
        )
