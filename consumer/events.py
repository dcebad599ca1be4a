"""The event contracts as typed values, and their translation to and from Avro records.

Input events (from Optimove) are parsed from decoded Avro fields; output events (ours) are built
as values and turned into the field mappings the codec encodes. See DESIGN §3 and `schemas/`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from operator import itemgetter
from typing import Any

INPUT_EVENT_NAMES = frozenset({"CampaignScheduled", "CampaignRecipients", "CampaignCancelled"})

# Output event ids are UUIDv5 in this namespace, from the campaign key and what happened, so an
# event re-emitted after a crash carries the same id and downstream can recognise it.
EVENT_ID_NAMESPACE = uuid.UUID("6f1c2a8e-3d4b-5e6f-8a9b-0c1d2e3f4a5b")


@dataclass(frozen=True, order=True)
class CampaignRef:
    """Which campaign: Optimove's tenant, campaign and channel."""

    tenant_id: int
    campaign_id: str
    channel_id: int

    @property
    def key(self) -> str:
        """The Kafka key and the campaign's identity everywhere: "tenant:campaign:channel"."""
        return f"{self.tenant_id}:{self.campaign_id}:{self.channel_id}"

    @classmethod
    def from_key(cls, key: str) -> CampaignRef:
        tenant, rest = key.split(":", 1)
        campaign, channel = rest.rsplit(":", 1)
        return cls(int(tenant), campaign, int(channel))

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> CampaignRef:
        return cls(int(fields["tenant_id"]), str(fields["campaign_id"]), int(fields["channel_id"]))


@dataclass(frozen=True)
class CampaignScheduled:
    event_id: str
    occurred_at: datetime
    ref: CampaignRef
    template_id: int
    template_name: str
    scheduled_at: datetime
    message_type: str
    recipient_count: int
    batch_count: int
    recipient_group_id: int = 1
    engagement_id: str | None = None
    action_id: str | None = None
    promo_codes: tuple[str, ...] = ()
    sender: str | None = None
    metrics_window_days: int | None = None
    validity_hours: int | None = None
    test_mode: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> CampaignScheduled:
        return cls(
            event_id=fields["event_id"],
            occurred_at=fields["occurred_at"],
            ref=CampaignRef.from_fields(fields),
            template_id=fields["template_id"],
            template_name=fields["template_name"],
            scheduled_at=fields["scheduled_at"],
            message_type=fields["message_type"],
            recipient_count=fields["recipient_count"],
            batch_count=fields["batch_count"],
            recipient_group_id=fields["recipient_group_id"],
            engagement_id=fields["engagement_id"],
            action_id=fields["action_id"],
            promo_codes=tuple(fields["promo_codes"]),
            sender=fields["sender"],
            metrics_window_days=fields["metrics_window_days"],
            validity_hours=fields.get("validity_hours"),
            test_mode=fields["test_mode"],
            metadata=dict(fields["metadata"]),
        )

    def to_fields(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            **_ref_fields(self.ref),
            "engagement_id": self.engagement_id,
            "action_id": self.action_id,
            "recipient_group_id": self.recipient_group_id,
            "template_id": self.template_id,
            "template_name": self.template_name,
            "scheduled_at": self.scheduled_at,
            "promo_codes": list(self.promo_codes),
            "sender": self.sender,
            "message_type": self.message_type,
            "recipient_count": self.recipient_count,
            "batch_count": self.batch_count,
            "metrics_window_days": self.metrics_window_days,
            "test_mode": self.test_mode,
            "validity_hours": self.validity_hours,
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True)
class CampaignRecipients:
    event_id: str
    occurred_at: datetime
    ref: CampaignRef
    batch_index: int
    customer_ids: tuple[str, ...]
    customers_with_promo_code: int = 0
    # Each customer's own promo code ("" for none), in customer order; empty when none has one.
    promo_codes: tuple[str, ...] = ()

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> CampaignRecipients:
        customers = fields["customers"]
        # itemgetter keeps these loops in C: batches hold up to 10,000 customers.
        codes = tuple(map(itemgetter("promo_code"), customers))
        with_code = sum(map(bool, codes))
        return cls(
            event_id=fields["event_id"],
            occurred_at=fields["occurred_at"],
            ref=CampaignRef.from_fields(fields),
            batch_index=fields["batch_index"],
            customer_ids=tuple(map(itemgetter("customer_id"), customers)),
            customers_with_promo_code=with_code,
            promo_codes=tuple(code or "" for code in codes) if with_code else (),
        )

    def to_fields(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            **_ref_fields(self.ref),
            "batch_index": self.batch_index,
            "customers": [
                {"customer_id": cid, "promo_code": code or None}
                for cid, code in zip(
                    self.customer_ids,
                    self.promo_codes or ("",) * len(self.customer_ids),
                    strict=True,
                )
            ],
        }


@dataclass(frozen=True)
class CampaignCancelled:
    event_id: str
    occurred_at: datetime
    ref: CampaignRef
    reason: str | None = None

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> CampaignCancelled:
        return cls(
            event_id=fields["event_id"],
            occurred_at=fields["occurred_at"],
            ref=CampaignRef.from_fields(fields),
            reason=fields["reason"],
        )

    def to_fields(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            **_ref_fields(self.ref),
            "reason": self.reason,
        }


InputEvent = CampaignScheduled | CampaignRecipients | CampaignCancelled


def parse_input_event(name: str, fields: Mapping[str, Any]) -> InputEvent:
    """Typed input event from a decoded record (the codec already checked the name)."""
    if name == "CampaignScheduled":
        return CampaignScheduled.from_fields(fields)
    if name == "CampaignRecipients":
        return CampaignRecipients.from_fields(fields)
    if name == "CampaignCancelled":
        return CampaignCancelled.from_fields(fields)
    raise ValueError(f"not an input event: {name}")


class StatusCode(StrEnum):
    ACCEPTED = "ACCEPTED"
    SEGMENT_CREATED = "SEGMENT_CREATED"
    SCHEDULED = "SCHEDULED"
    SENT = "SENT"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"


@dataclass(frozen=True)
class RecipientCounts:
    requested: int = 0
    matched: int = 0
    unmatched: int = 0
    invalid_numbers: int = 0
    duplicates: int = 0
    skipped: int = 0  # matched, but not sent to (no promo code for a text that needs one)


@dataclass(frozen=True)
class StatusError:
    """Why a campaign was rejected or failed: a stable code and a sentence for people."""

    code: str
    message: str


@dataclass(frozen=True)
class SubSendSummary:
    """One sub-send of a campaign's send plan (DESIGN §4a), as its status events report it."""

    kind: str  # "group" or "personal"
    language: str
    promo_code: str | None
    recipients: int
    textlocal_group_id: int | None = None
    batch_ids: tuple[int, ...] = ()
    cost_credits: float | None = None
    already_sent: bool = False

    def to_fields(self) -> dict[str, Any]:
        return {**vars(self), "batch_ids": list(self.batch_ids)}


@dataclass(frozen=True)
class CampaignStatusEvent:
    ref: CampaignRef
    status: StatusCode
    occurred_at: datetime
    # Distinguishes two events of one status (e.g. a refused cancellation after SENT).
    qualifier: str = ""
    counts: RecipientCounts = RecipientCounts()
    textlocal_group_id: int | None = None
    batch_id: int | None = None
    cost_credits: float | None = None
    message_parts: int | None = None
    send_at: datetime | None = None
    error: StatusError | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    sends: tuple[SubSendSummary, ...] = ()

    @property
    def event_id(self) -> str:
        return output_event_id(self.ref, "status", self.status.value, self.qualifier)

    def to_fields(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            **_ref_fields(self.ref),
            "status": self.status.value,
            "counts": vars(self.counts).copy(),
            "textlocal_group_id": self.textlocal_group_id,
            "batch_id": self.batch_id,
            "cost_credits": self.cost_credits,
            "message_parts": self.message_parts,
            "send_at": self.send_at,
            "error": None if self.error is None else vars(self.error).copy(),
            "metadata": dict(self.metadata),
            "sends": [send.to_fields() for send in self.sends],
        }


@dataclass(frozen=True)
class DeliveryMetricsEvent:
    ref: CampaignRef
    batch_id: int
    poll_number: int
    polled_at: datetime
    sent_at: datetime
    window_ends_at: datetime
    is_final: bool
    num_messages: int
    delivered: int
    undelivered: int
    pending: int
    invalid: int
    expired: int
    unknown: int
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def event_id(self) -> str:
        return output_event_id(self.ref, "metrics", str(self.batch_id), str(self.poll_number))

    @property
    def delivery_rate(self) -> float:
        return self.delivered / self.num_messages if self.num_messages else 0.0

    def to_fields(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "occurred_at": self.polled_at,
            **_ref_fields(self.ref),
            "batch_id": self.batch_id,
            "poll_number": self.poll_number,
            "polled_at": self.polled_at,
            "sent_at": self.sent_at,
            "window_ends_at": self.window_ends_at,
            "is_final": self.is_final,
            "num_messages": self.num_messages,
            "delivered": self.delivered,
            "undelivered": self.undelivered,
            "pending": self.pending,
            "invalid": self.invalid,
            "expired": self.expired,
            "unknown": self.unknown,
            "delivery_rate": self.delivery_rate,
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True)
class TemplateRecord:
    id: int
    title: str
    body: str
    preview: str
    prefix: str
    contact_group_id: int
    sender: str | None
    imported_at: datetime
    languages: tuple[str, ...] = ()  # the family's variants (send_plan.template_families)

    def to_fields(self) -> dict[str, Any]:
        return {**vars(self), "languages": list(self.languages)}


@dataclass(frozen=True)
class CustomerOptOutEvent:
    """A customer whose number TextLocal lists as opted out (DESIGN §4b); never the number."""

    customer_id: str
    contact_group_id: int
    opted_out_at: datetime  # TextLocal's time of the opt-out
    occurred_at: datetime  # when the daemon read it

    @property
    def key(self) -> str:
        """The Kafka key: one customer of one contact group lands in one partition, in order."""
        return f"{self.contact_group_id}:{self.customer_id}"

    @property
    def event_id(self) -> str:
        """UUIDv5 of the group, the customer and the opt-out's time: the same opt-out read
        again (a rerun, an overlapping window) has the same id, and nothing in it is the number."""
        millis = int(self.opted_out_at.timestamp() * 1000)
        parts = ("optout", str(self.contact_group_id), self.customer_id, str(millis))
        name = "/".join(_escape_part(part) for part in parts)
        return str(uuid.uuid5(EVENT_ID_NAMESPACE, name))

    def to_fields(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            "customer_id": self.customer_id,
            "contact_group_id": self.contact_group_id,
            "opted_out_at": self.opted_out_at,
        }


def output_event_id(ref: CampaignRef, *parts: str) -> str:
    """UUIDv5 of the campaign key and the parts, joined by "/".

    "%" and "/" inside a part are escaped, so no two (key, parts) share a name — a qualifier is
    an input event id, which a producer chooses. Ids of parts without them are what they were.
    """
    name = "/".join(_escape_part(part) for part in (ref.key, *parts))
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, name))


def _escape_part(part: str) -> str:
    if "%" not in part and "/" not in part:
        return part
    return part.replace("%", "%25").replace("/", "%2F")


def _ref_fields(ref: CampaignRef) -> dict[str, Any]:
    return {
        "tenant_id": ref.tenant_id,
        "campaign_id": ref.campaign_id,
        "channel_id": ref.channel_id,
    }
