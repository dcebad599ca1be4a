"""The compiled Avro readers (`consumer.avro_fast`) read exactly what fastavro reads.

Every schema version that has a compiled reader is checked against fastavro on generated
records, on every truncation of one, and on mutated bytes: the registry's answer (through the
compiled reader) is fastavro's value or a `CodecError`, never anything else.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.avro_fast import UnreadableBody, compile_reader, read_body
from consumer.codec import MARKER, SchemaRegistry, SchemaVersion
from consumer.errors import CodecError

REGISTRY = SchemaRegistry.from_directory()
COMPILED = [
    schema
    for name in REGISTRY.names()
    for schema in REGISTRY.versions(name)
    if schema.fast_reader is not None
]
COMPILED_IDS = [f"{schema.name}.v{schema.version}" for schema in COMPILED]

_TEXT = st.text(max_size=80)  # any code point, long enough to need a two-byte length
_INT = st.integers(min_value=-(2**31), max_value=2**31 - 1)
_LONG = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# timestamp-millis as fastavro writes it: datetimes in UTC to the millisecond, years 1–9999.
_TIMESTAMP = st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999).map(
    lambda millis: datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis)
)


def values_of(schema: Any) -> st.SearchStrategy[Any]:
    """Values of a type in the compiled readers' subset (see `consumer.avro_fast`)."""
    if schema == "string":
        return _TEXT
    if schema == "int":
        return _INT
    if schema == "long":
        return _LONG
    if isinstance(schema, list):
        (other,) = [branch for branch in schema if branch != "null"]
        return st.none() | values_of(other)
    if schema.get("logicalType") == "timestamp-millis":
        return _TIMESTAMP
    if schema["type"] == "array":
        return st.lists(values_of(schema["items"]), max_size=70)
    return st.fixed_dictionaries({f["name"]: values_of(f["type"]) for f in schema["fields"]})


def body_of(schema: SchemaVersion, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    schemaless_writer(buffer, schema.parsed, record)
    return buffer.getvalue()


def fastavro_reads(schema: SchemaVersion, body: bytes) -> Any:
    return schemaless_reader(io.BytesIO(body), schema.parsed, schema.parsed)


def registry_reads(schema: SchemaVersion, body: bytes) -> dict[str, Any]:
    """The registry's decoding of `body` written with `schema`, read as that same version (the
    case its compiled reader is for: an older writer is resolved by fastavro)."""
    data = MARKER + schema.fingerprint + body
    return REGISTRY.decode(data, reader_version=schema.version).fields


def test_the_recipients_batch_is_read_by_a_compiled_reader() -> None:
    """The hot record of the input topic really takes the fast path."""
    assert REGISTRY.latest("CampaignRecipients").fast_reader is not None
    assert "CampaignRecipients.v1" in COMPILED_IDS


def test_types_outside_the_subset_have_no_compiled_reader() -> None:
    assert compile_reader({"type": "record", "name": "R", "fields": []}) is not None
    unsupported_types: list[Any] = [
        "boolean",
        "double",
        "bytes",
        {"type": "map", "values": "string"},
        ["null", "int", "string"],
        {"type": "array", "items": "string"},
    ]
    for unsupported in unsupported_types:
        schema = {"type": "record", "name": "R", "fields": [{"name": "f", "type": unsupported}]}
        assert compile_reader(schema) is None, unsupported


@pytest.mark.parametrize("schema", COMPILED, ids=COMPILED_IDS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_compiled_reader_reads_what_fastavro_reads(schema: SchemaVersion, data: Any) -> None:
    record = data.draw(values_of(schema.parsed))
    body = body_of(schema, record)
    assert schema.fast_reader is not None
    assert read_body(schema.fast_reader, body, 0) == (fastavro_reads(schema, body), len(body))
    assert registry_reads(schema, body) == fastavro_reads(schema, body)


@pytest.mark.parametrize("schema", COMPILED, ids=COMPILED_IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_truncation_is_refused(schema: SchemaVersion, data: Any) -> None:
    body = body_of(schema, data.draw(values_of(schema.parsed)))
    assert schema.fast_reader is not None
    for cut in range(len(body)):
        with pytest.raises(UnreadableBody):
            read_body(schema.fast_reader, body[:cut], 0)
        with pytest.raises(CodecError):
            registry_reads(schema, body[:cut])


@pytest.mark.parametrize("schema", COMPILED, ids=COMPILED_IDS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_bytes_decode_as_fastavro_decodes_them_or_not_at_all(
    schema: SchemaVersion, data: Any
) -> None:
    """Whatever the bytes, the registry answers as fastavro alone would: the same fields, or
    a CodecError."""
    body = bytearray(body_of(schema, data.draw(values_of(schema.parsed))))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        at = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
        body[at] = data.draw(st.integers(min_value=0, max_value=255))
    stream = io.BytesIO(bytes(body))
    try:
        reference = schemaless_reader(stream, schema.parsed, schema.parsed)
        complete = stream.tell() == len(body)  # else the registry reports trailing bytes
    except Exception:
        reference, complete = None, False
    if complete:
        assert registry_reads(schema, bytes(body)) == reference
    else:
        with pytest.raises(CodecError):
            registry_reads(schema, bytes(body))


def test_unusual_but_valid_encodings_are_read_as_fastavro_reads_them() -> None:
    """A length in a longer varint than needed, and a block that gives its byte size, are valid
    Avro that fastavro reads: the compiled reader reads them too, the same."""
    schema = REGISTRY.latest("CampaignRecipients")
    record = {
        "event_id": "e",
        "occurred_at": datetime(2026, 12, 2, tzinfo=UTC),
        "tenant_id": 1,
        "campaign_id": "2.38",
        "channel_id": 505,
        "batch_index": 0,
        "customers": [{"customer_id": "C1", "promo_code": None}],
    }
    # The record's fields before the array, then the array: an empty one is the byte 0x00.
    head = body_of(schema, {**record, "customers": []})[:-1]
    customer = b"\x04C1\x00"  # length 2 (zig-zag 4), "C1", union branch 0 (null)
    # The block's count -1 (0x01) followed by its size in bytes, instead of the count 1 (0x02).
    blocked = head + b"\x01" + bytes([2 * len(customer)]) + customer + b"\x00"
    overlong = head + b"\x02" + b"\x84\x00C1\x00" + b"\x00"  # length 2 in two bytes
    assert schema.fast_reader is not None
    for variant in (blocked, overlong):
        assert read_body(schema.fast_reader, variant, 0) == (record, len(variant))
        assert registry_reads(schema, variant) == fastavro_reads(schema, variant) == record
