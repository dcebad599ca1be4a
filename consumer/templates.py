"""TextLocal's templates as the executor sees them: a Redis copy, refreshed from TextLocal.

The daily catalog job (and a miss, at most once a minute) refreshes the copy with
`get_templates`, so sending a campaign normally costs no template call at all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

from consumer.clock import monotonic_s
from consumer.store import CampaignStore
from consumer.textlocal import TextLocalClient
from consumer.textlocal_types import Template

REFRESH_ON_MISS_INTERVAL_S = 60.0


class TemplateCopy:
    """Template id → Template, from Redis (the store's template copy), refreshed from TextLocal
    when asked or on a miss."""

    def __init__(self, store: CampaignStore, client: TextLocalClient) -> None:
        self._store = store
        self._client = client
        self._last_refresh_s = float("-inf")
        self._refreshing = asyncio.Lock()

    async def lookup(self, template_id: int) -> Template | None:
        template = await self._stored(template_id)
        if template is not None:
            return template
        # One refresh at a time: a lookup that waited here sees the copy the other one wrote.
        async with self._refreshing:
            template = await self._stored(template_id)
            if (
                template is None
                and monotonic_s() - self._last_refresh_s > REFRESH_ON_MISS_INTERVAL_S
            ):
                await self.refresh()
                template = await self._stored(template_id)
        return template

    async def refresh(self) -> list[Template]:
        """Replace the copy with TextLocal's current templates (atomically)."""
        templates = await self._client.get_templates()
        await self.replace(templates)
        self._last_refresh_s = monotonic_s()
        return templates

    async def replace(self, templates: Sequence[Template]) -> None:
        await self._store.replace_template_copy({t.id: _to_json(t) for t in templates})

    async def stored_all(self) -> list[Template]:
        raw = await self._store.template_copy_entries()
        return sorted((_from_json(value) for value in raw), key=lambda t: t.id)

    async def _stored(self, template_id: int) -> Template | None:
        raw = await self._store.template_copy_entry(template_id)
        return None if raw is None else _from_json(raw)


def _to_json(template: Template) -> str:
    return json.dumps(
        {
            "id": template.id,
            "title": template.title,
            "body": template.body,
            "sender_name": template.sender_name,
        }
    )


def _from_json(raw: bytes) -> Template:
    values = json.loads(raw)
    return Template(
        id=int(values["id"]),
        title=values["title"],
        body=values["body"],
        sender_name=values["sender_name"],
    )
