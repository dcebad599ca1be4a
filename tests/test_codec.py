"""Avro single-object encoding: every schema round-trips, versions resolve, garbage is refused."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.codec import HEADER_LEN, MARKER, SchemaRegistry, SchemaVersion
from consumer.errors import CodecError

REGISTRY = SchemaRegistry.from_directory()
WHEN = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)
IDENTITY = {
    "event_id": "evt-1",
    "occurred_at": WHEN,
    "tenant_id": 42,
    "campaign_id": "2.38",
    "channel_id": 505,
}

SAMPLES: dict[str, dict[str, Any]] = {
    "CampaignScheduled": IDENTITY
    | {
        "engagement_id": "eng-9",
        "action_id": "act-3",
        "recipient_group_id": 2,
        "template_id": 1001,
        "template_name": "OPT_Welcome",
        "scheduled_at": WHEN,
        "promo_codes": ["SAVE10"],
        "sender": "Shop",
        "message_type": "SMS",
        "recipient_count": 3,
        "batch_count": 1,
        "metrics_window_days": 5,
        "test_mode": False,
        "validity_hours": 24,
        "metadata": {"plan": "a", "ünï": "çødé"},
    },
    "CampaignRecipients": IDENTITY
    | {
        "batch_index": 0,
        "customers": [
            {"customer_id": "C1", "promo_code": None},
            {"customer_id": "C2", "promo_code": "X2"},
        ],
    },
    "CampaignCancelled": IDENTITY | {"reason": "budget"},
    "CampaignStatus": IDENTITY
    | {
        "status": "SENT",
        "counts": {
            "requested": 5,
            "matched": 3,
            "unmatched": 1,
            "invalid_numbers": 1,
            "duplicates": 0,
            "skipped": 0,
        },
        "textlocal_group_id": 77,
        "batch_id": 123456,
        "cost_credits": 3.0,
        "message_parts": 1,
        "send_at": WHEN,
        "error": {"code": "X", "message": "y"},
        "metadata": {},
        "sends": [
            {
                "kind": "group",
                "language": "fr",
                "promo_code": "SAVE10",
                "recipients": 3,
                "textlocal_group_id": 77,
                "batch_ids": [123456],
                "cost_credits": 3.0,
                "already_sent": False,
            }
        ],
    },
    "DeliveryMetrics": IDENTITY
    | {
        "batch_id": 123456,
        "poll_number": 7,
        "polled_at": WHEN,
        "sent_at": WHEN,
        "window_ends_at": WHEN,
        "is_final": True,
        "num_messages": 10,
        "delivered": 6,
        "undelivered": 1,
        "pending": 0,
        "invalid": 1,
        "expired": 1,
        "unknown": 1,
        "delivery_rate": 0.6,
        "metadata": {"k": "v"},
    },
    "CustomerOutcomes": IDENTITY
    | {
        "outcome": "DELIVERED",
        "customer_ids": ["C0000001", "C0000002"],
        "observed_at": WHEN,
        "source": "POLL",
        "poll_number": 3,
        "metadata": {"k": "v"},
    },
    "Template": {
        "id": 1001,
        "title": "OPT_Welcome",
        "body": "Hi there",
        "preview": "Hi there",
        "prefix": "OPT_",
        "contact_group_id": 5,
        "sender": None,
        "imported_at": WHEN,
        "languages": ["de", "fr"],
    },
}


def test_registry_knows_every_schema_file() -> None:
    """Every record in schemas/ has a sample here, so the round trip covers them all."""
    assert sorted(SAMPLES) == REGISTRY.names()


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_schema_round_trips(name: str) -> None:
    """Encoding a record and decoding it gives back the same fields and the writer version."""
    encoded = REGISTRY.encode(name, SAMPLES[name])
    assert encoded[:2] == MARKER
    assert encoded[2:HEADER_LEN] == REGISTRY.latest(name).fingerprint
    decoded = REGISTRY.decode(encoded)
    assert decoded.name == name
    assert decoded.writer_version == REGISTRY.latest(name).version
    assert decoded.fields == SAMPLES[name]


def test_fingerprint_matches_avro_spec_vector() -> None:
    """Fingerprints are CRC-64-AVRO, little-endian: "null" gives the spec's 0x63dd24e7cc258f8a."""
    null_schema = SchemaVersion.from_json({"type": "record", "name": "N", "fields": []}, 1)
    assert len(null_schema.fingerprint) == 8
    from fastavro.schema import fingerprint

    assert fingerprint('"null"', "CRC-64-AVRO") == (0x63DD24E7CC258F8A).to_bytes(8, "little").hex()


def test_old_writer_resolves_to_new_reader() -> None:
    """A v1 CampaignScheduled decodes under v2 with the added field at its default."""
    v1_record = {k: v for k, v in SAMPLES["CampaignScheduled"].items() if k != "validity_hours"}
    encoded = REGISTRY.encode("CampaignScheduled", v1_record, version=1)
    decoded = REGISTRY.decode(encoded)
    assert decoded.writer_version == 1
    assert decoded.fields == v1_record | {"validity_hours": None}


def test_new_writer_resolves_to_old_reader() -> None:
    """A v2 CampaignScheduled read with the v1 reader drops the field v1 does not know."""
    encoded = REGISTRY.encode("CampaignScheduled", SAMPLES["CampaignScheduled"], version=2)
    decoded = REGISTRY.decode(encoded, reader_version=1)
    assert decoded.writer_version == 2
    assert "validity_hours" not in decoded.fields
    assert decoded.fields["template_name"] == "OPT_Welcome"


@pytest.mark.parametrize(
    ("name", "added"),
    [("CampaignStatus", {"sends"}), ("Template", {"languages"})],
)
def test_readers_of_the_first_version_keep_working(name: str, added: set[str]) -> None:
    """v2 CampaignStatus and Template read with the v1 reader: the same fields, less the new."""
    decoded = REGISTRY.decode(REGISTRY.encode(name, SAMPLES[name]), reader_version=1)
    expected = {k: v for k, v in SAMPLES[name].items() if k not in added}
    if name == "CampaignStatus":
        expected["counts"] = {k: v for k, v in expected["counts"].items() if k != "skipped"}
    assert decoded.fields == expected
    v1_record = dict(expected)
    again = REGISTRY.decode(REGISTRY.encode(name, v1_record, version=1))
    assert again.fields == SAMPLES[name] | {k: [] for k in added} | (
        {"counts": SAMPLES[name]["counts"] | {"skipped": 0}} if name == "CampaignStatus" else {}
    )
    assert REGISTRY.versions(name)[0].fingerprint != REGISTRY.versions(name)[1].fingerprint


def test_versions_have_distinct_fingerprints() -> None:
    """Two versions of one record carry different fingerprints on the wire."""
    v1, v2 = REGISTRY.versions("CampaignScheduled")
    assert v1.fingerprint != v2.fingerprint


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated header: 0 bytes"),
        (b"\xc3\x01\x00", "truncated header: 3 bytes"),
        (b'{"json": true}', "bad marker 7b22"),
        (
            MARKER + bytes.fromhex("0011223344556677") + b"\x00",
            "unknown schema fingerprint 0011223344556677",
        ),
    ],
)
def test_decode_names_what_is_wrong(data: bytes, reason: str) -> None:
    """Undecodable bytes raise CodecError whose message says what was wrong."""
    with pytest.raises(CodecError, match=reason):
        REGISTRY.decode(data)


def test_truncated_body_is_reported() -> None:
    """A valid header followed by a cut-off body is reported as truncated."""
    encoded = REGISTRY.encode("CampaignRecipients", SAMPLES["CampaignRecipients"])
    with pytest.raises(CodecError, match="truncated CampaignRecipients body"):
        REGISTRY.decode(encoded[:-4])


def test_trailing_bytes_are_reported() -> None:
    """Bytes left over after a complete record are refused."""
    encoded = REGISTRY.encode("CampaignCancelled", SAMPLES["CampaignCancelled"])
    with pytest.raises(CodecError, match="2 trailing bytes"):
        REGISTRY.decode(encoded + b"\x00\x00")


def test_unexpected_record_is_refused() -> None:
    """A known record the caller does not accept (an output event on the input topic) is refused."""
    encoded = REGISTRY.encode("Template", SAMPLES["Template"])
    with pytest.raises(CodecError, match="unexpected record Template"):
        REGISTRY.decode(encoded, expected={"CampaignScheduled"})


def test_encode_refuses_a_record_missing_a_field() -> None:
    """Encoding a record without a required field raises CodecError naming the record."""
    with pytest.raises(CodecError, match="cannot encode CampaignCancelled"):
        REGISTRY.encode("CampaignCancelled", {"event_id": "x"})


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_garbage_bytes_raise_only_codec_error(data: bytes) -> None:
    """Arbitrary bytes either decode or raise CodecError, never anything else."""
    with contextlib.suppress(CodecError):
        REGISTRY.decode(data)


FINGERPRINTS = [v.fingerprint for name in REGISTRY.names() for v in REGISTRY.versions(name)]


@settings(max_examples=1000)
@given(st.sampled_from(FINGERPRINTS), st.binary(max_size=300))
def test_garbage_bodies_behind_valid_headers_raise_only_codec_error(fp: bytes, body: bytes) -> None:
    """A known fingerprint followed by random bytes either decodes or raises CodecError."""
    with contextlib.suppress(CodecError):
        REGISTRY.decode(MARKER + fp + body)


@settings(max_examples=500)
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_mutated_records_raise_only_codec_error(name: str, data: st.DataObject) -> None:
    """A valid encoding with one byte changed or cut short either decodes or raises CodecError."""
    encoded = bytearray(REGISTRY.encode(name, SAMPLES[name]))
    position = data.draw(st.integers(HEADER_LEN, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(HEADER_LEN, len(encoded)))
    with contextlib.suppress(CodecError):
        REGISTRY.decode(bytes(encoded[:cut]))
