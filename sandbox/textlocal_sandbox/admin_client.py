"""An async client of the sandbox's admin API (`/_sandbox/`), for tests, the demo and benchmarks.

async with SandboxAdminClient("http://127.0.0.1:8080/") as admin:
    await admin.advance_clock(timedelta(days=1))
    sent = await admin.messages(batch_id)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import aiohttp

from textlocal_sandbox.contacts import Contact
from textlocal_sandbox.faults import FaultRule


class SandboxAdminError(Exception):
    """The admin API refused a call (HTTP 4xx/5xx); carries its status and error text."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"sandbox admin HTTP {status}: {error}")
        self.status = status
        self.error = error


@dataclass(frozen=True)
class LoggedMessage:
    """One message the sandbox sent (a scheduled one only once its time has passed)."""

    number: int
    text: str
    batch_id: int
    sent_at: datetime
    message_id: str
    sender: str
    kind: str


@dataclass(frozen=True)
class LoggedCall:
    """One API request the sandbox received: when (real time, not the sandbox clock) and what."""

    at: datetime
    command: str


@dataclass(frozen=True)
class BatchInfo:
    """One accepted send, without its recipients."""

    batch_id: int
    kind: str
    text: str
    sender: str
    sent_at: datetime
    accepted_at: datetime
    scheduled: bool
    left: bool
    group_id: int | None
    num_messages: int
    cost: int
    custom: str


@dataclass(frozen=True)
class GroupView:
    id: int
    name: str
    size: int
    contacts: tuple[Contact, ...]


@dataclass(frozen=True)
class Balance:
    sms: int
    mms: int


class SandboxAdminClient:
    """Calls the admin API of the sandbox at `base_url` (its root URL, e.g. handle.url)."""

    def __init__(self, base_url: str) -> None:
        self._base = base_url.rstrip("/") + "/_sandbox"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SandboxAdminClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # clock

    async def now(self) -> datetime:
        return _parse_now(await self._call("GET", "/clock"))

    async def set_clock(self, moment: datetime) -> datetime:
        if moment.tzinfo is None:
            raise ValueError("set_clock needs a timezone-aware datetime")
        return _parse_now(await self._call("PUT", "/clock", {"now": moment.isoformat()}))

    async def advance_clock(self, by: timedelta) -> datetime:
        body = {"seconds": by.total_seconds()}
        return _parse_now(await self._call("POST", "/clock/advance", body))

    # contacts and groups

    async def seed_contacts(
        self,
        group_id: int | None,
        group_name: str | None,
        contacts: Sequence[Mapping[str, object]],
    ) -> int:
        """Add contacts to a group (by id, or by name: created if missing); returns its id."""
        body = {"group_id": group_id, "group_name": group_name, "contacts": list(contacts)}
        return int((await self._call("POST", "/contacts", body))["group_id"])

    async def generate_contacts(
        self,
        group_name: str,
        count: int,
        *,
        first_number: int = 447_000_000_000,
        id_field: str = "custom1",
        id_prefix: str = "C",
        id_width: int = 7,
        first_index: int = 1,
        fields: Mapping[str, str] | None = None,
    ) -> int:
        """Add `count` generated contacts (numbers from `first_number`, ids C0000001…).

        `fields`: other fields set to one constant value on every contact (e.g. a language).
        """
        body: dict[str, object] = {
            "group_name": group_name,
            "count": count,
            "first_number": first_number,
            "id_field": id_field,
            "id_prefix": id_prefix,
            "id_width": id_width,
            "first_index": first_index,
        }
        if fields:
            body["fields"] = dict(fields)
        return int((await self._call("POST", "/contacts/generate", body))["group_id"])

    async def add_optouts(self, numbers: Sequence[int]) -> list[int]:
        """Numbers opting out now (a contact texting STOP): into group 6 at the sandbox's time;
        returns their opt-out ids, in order (an already opted-out number keeps its id)."""
        data = await self._call("POST", "/optouts", {"numbers": list(numbers)})
        return [int(i) for i in data["ids"]]

    async def groups(self) -> dict[int, tuple[str, int]]:
        """Every group: id → (name, size)."""
        data = await self._call("GET", "/groups")
        return {int(g["id"]): (str(g["name"]), int(g["size"])) for g in data["groups"]}

    async def group_contacts(
        self, group_id: int, *, start: int = 0, limit: int | None = None
    ) -> GroupView:
        query = f"?start={start}" + ("" if limit is None else f"&limit={limit}")
        data = await self._call("GET", f"/groups/{group_id}{query}")
        contacts = tuple(
            Contact(
                int(c["number"]),
                c["first_name"],
                c["last_name"],
                c["custom1"],
                c["custom2"],
                c["custom3"],
            )
            for c in data["contacts"]
        )
        return GroupView(int(data["id"]), str(data["name"]), int(data["size"]), contacts)

    async def group_size(self, group_id: int) -> int:
        return (await self.group_contacts(group_id, limit=0)).size

    # templates

    async def seed_templates(self, templates: Sequence[Mapping[str, object]]) -> list[int]:
        """Add templates ({title, body, sender_name?}); returns their ids in order."""
        data = await self._call("POST", "/templates", {"templates": list(templates)})
        return [int(i) for i in data["ids"]]

    async def rename_template(self, template_id: int, title: str) -> None:
        await self._call("PATCH", f"/templates/{template_id}", {"title": title})

    async def update_template_body(self, template_id: int, body: str) -> None:
        await self._call("PATCH", f"/templates/{template_id}", {"body": body})

    async def delete_template(self, template_id: int) -> None:
        await self._call("DELETE", f"/templates/{template_id}")

    # faults

    async def set_faults(self, rules: Sequence[FaultRule], *, seed: int | None = None) -> None:
        body = {"seed": seed, "rules": [r.to_json() for r in rules]}
        await self._call("PUT", "/faults", body)

    async def clear_faults(self) -> None:
        await self._call("DELETE", "/faults")

    async def faults_fired(self) -> list[int]:
        """How many times each rule of the current plan has fired, in rule order."""
        return [int(n) for n in (await self._call("GET", "/faults"))["fired"]]

    # what happened

    async def messages(self, batch_id: int | None = None) -> list[LoggedMessage]:
        """Every message sent (or those of one batch), in send order."""
        query = "" if batch_id is None else f"?batch_id={batch_id}"
        data = await self._call("GET", f"/messages{query}")
        messages: list[LoggedMessage] = []
        for batch in data["batches"]:
            sent_at = datetime.fromtimestamp(float(batch["sent_at_s"]), UTC)
            first_id = int(batch["first_message_id"])
            texts = batch["texts"]
            for position, number in enumerate(batch["numbers"]):
                messages.append(
                    LoggedMessage(
                        number=int(number),
                        text=batch["text"] if texts is None else texts[position],
                        batch_id=int(batch["batch_id"]),
                        sent_at=sent_at,
                        message_id=str(first_id + position),
                        sender=batch["sender"],
                        kind=batch["kind"],
                    )
                )
        return messages

    async def sent_numbers(self, batch_id: int | None = None) -> list[int]:
        """Just the recipients of every message sent (cheaper than `messages` for big runs)."""
        query = "" if batch_id is None else f"?batch_id={batch_id}"
        data = await self._call("GET", f"/messages{query}")
        return [int(n) for batch in data["batches"] for n in batch["numbers"]]

    async def batches(self) -> list[BatchInfo]:
        data = await self._call("GET", "/batches")
        return [
            BatchInfo(
                batch_id=int(b["batch_id"]),
                kind=b["kind"],
                text=b["text"],
                sender=b["sender"],
                sent_at=datetime.fromtimestamp(float(b["sent_at_s"]), UTC),
                accepted_at=datetime.fromtimestamp(float(b["accepted_at_s"]), UTC),
                scheduled=bool(b["scheduled"]),
                left=bool(b["left"]),
                group_id=None if b["group_id"] is None else int(b["group_id"]),
                num_messages=int(b["num_messages"]),
                cost=int(b["cost"]),
                custom=b["custom"],
            )
            for b in data["batches"]
        ]

    async def call_counts(self) -> dict[str, int]:
        """Requests received per command (every request, whatever its outcome or fault)."""
        data = await self._call("GET", "/calls")
        return {str(k): int(v) for k, v in data["counts"].items()}

    async def reset_call_counts(self) -> None:
        """Counters to zero and the call log emptied."""
        await self._call("DELETE", "/calls")

    async def call_log(self) -> list[LoggedCall]:
        """The latest API requests (up to 100,000) in arrival order, failed and faulted ones too."""
        data = await self._call("GET", "/calls/log")
        return [
            LoggedCall(datetime.fromtimestamp(float(c["at_s"]), UTC), str(c["command"]))
            for c in data["calls"]
        ]

    async def balance(self) -> Balance:
        data = await self._call("GET", "/balance")
        return Balance(int(data["sms"]), int(data["mms"]))

    async def set_balance(self, *, sms: int | None = None, mms: int | None = None) -> Balance:
        data = await self._call("PUT", "/balance", {"sms": sms, "mms": mms})
        return Balance(int(data["sms"]), int(data["mms"]))

    async def flush_receipts(self) -> tuple[int, int]:
        """POST every receipt due now; returns (posted, failed) for this flush."""
        data = await self._call("POST", "/receipts/flush")
        return int(data["posted"]), int(data["failed"])

    async def set_receipt_mode(
        self, *, retries: int = 0, duplicate: bool = False, reverse: bool = False
    ) -> None:
        """How receipts are posted from now on: retries after a refusal (5xx, 429, no answer),
        each twice, each round in reverse order."""
        await self._call(
            "PUT",
            "/receipts/mode",
            {"retries": retries, "duplicate": duplicate, "reverse": reverse},
        )

    async def receipt_counts(self) -> dict[str, int]:
        """Receipts posted, failed and retried so far."""
        data = await self._call("GET", "/receipts")
        return {name: int(data[name]) for name in ("posted", "failed", "retried")}

    async def reset(self) -> None:
        """Fresh account, no faults, counters at zero (the clock stays where it is)."""
        await self._call("POST", "/reset")

    async def _call(
        self, method: str, path: str, body: Mapping[str, object] | None = None
    ) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.request(method, self._base + path, json=body) as response:
            data = await response.json(content_type=None)
            if response.status >= 400:
                error = data.get("error", "") if isinstance(data, dict) else str(data)
                raise SandboxAdminError(response.status, str(error))
            if not isinstance(data, dict):
                raise SandboxAdminError(response.status, "admin reply is not a JSON object")
            return data


def _parse_now(data: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(str(data["now"]))
