"""Faster readers for the Avro bodies of the input topic's hot record, compiled per schema.

fastavro's C reader spends about 3 µs on each element of an array of small records (it looks
each field's schema up as it goes): 33 ms for one 10,000-customer `CampaignRecipients` batch,
most of intake's CPU for a million recipients. The readers compiled here read the same bytes
in about a third of that, the loop over an array of records of strings being written out.

They read a subset of Avro, the types of our input records: string, int, long, long with the
`timestamp-millis` logical type, a union of null and one of those, records of them, and arrays
of records of strings and optional strings. A schema with any other type has no compiled
reader (`compile_reader` returns None) and fastavro reads it. Only the writer's own schema is
compiled, so there is no schema resolution to do: the registry uses a compiled reader when the
writer's version is the reader's. A compiled reader's result equals fastavro's; on bytes it
cannot read it raises `UnreadableBody`, and the registry then lets fastavro read them, so the
errors (and any bytes this reader would refuse wrongly) are fastavro's business, as before
(`tests/test_avro_fast.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

# (bytes, position) → (value, position after it)
Reader = Callable[[bytes, int], tuple[Any, int]]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_VARINT_SHIFT = 63  # a long takes at most 10 bytes
_UINT64 = 2**64 - 1


class UnreadableBody(ValueError):
    """Bytes a compiled reader does not read (truncated, malformed, or merely unusual)."""


def compile_reader(schema: Any) -> Reader | None:
    """A reader of `schema` (a record, as fastavro's `parse_schema` gives it), or None when a
    type in it is outside this module's subset."""
    try:
        return _record(schema)
    except _Unsupported:
        return None


def read_body(reader: Reader, data: bytes, start: int) -> tuple[Any, int]:
    """The value `reader` reads from `data[start:]`, and where it ended."""
    try:
        value, end = reader(data, start)
    except (IndexError, UnicodeDecodeError, OverflowError) as exc:
        raise UnreadableBody(f"{type(exc).__name__}: {exc}") from exc
    if end > len(data):  # a string cut short by the end of the bytes
        raise UnreadableBody("truncated body")
    return value, end


class _Unsupported(Exception):
    pass


def _long(data: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint (Avro int and long)."""
    byte = data[pos]
    pos += 1
    value = byte & 0x7F
    shift = 7
    while byte & 0x80:
        if shift > _MAX_VARINT_SHIFT:
            raise UnreadableBody("varint longer than 10 bytes")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
    value &= _UINT64  # as fastavro: what a tenth byte carries past 64 bits is dropped
    return (value >> 1) ^ -(value & 1), pos


def _string(data: bytes, pos: int) -> tuple[str, int]:
    size, pos = _long(data, pos)
    if size < 0:
        raise UnreadableBody("negative string length")
    end = pos + size
    return data[pos:end].decode(), end


def _timestamp_millis(data: bytes, pos: int) -> tuple[datetime, int]:
    millis, pos = _long(data, pos)
    return _EPOCH + timedelta(milliseconds=millis), pos


_PRIMITIVES: dict[str, Reader] = {"string": _string, "int": _long, "long": _long}


def _type(schema: Any) -> Reader:
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return _PRIMITIVES[schema]
        raise _Unsupported(schema)
    if isinstance(schema, list):
        return _optional(schema)
    if not isinstance(schema, Mapping):
        raise _Unsupported(repr(schema))
    kind = schema.get("type")
    if kind == "long" and schema.get("logicalType") == "timestamp-millis":
        return _timestamp_millis
    if kind == "record":
        return _record(schema)
    if kind == "array":
        return _array_of_string_records(schema["items"])
    raise _Unsupported(repr(kind))


def _optional(branches: Sequence[Any]) -> Reader:
    """A union of null and one type."""
    if len(branches) != 2 or "null" not in branches:
        raise _Unsupported(repr(branches))
    null_index = branches.index("null")
    value_reader = _type(branches[1 - null_index])

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        index, pos = _long(data, pos)
        if index == null_index:
            return None, pos
        if index != 1 - null_index:
            raise UnreadableBody(f"union index {index} out of range")
        return value_reader(data, pos)

    return read


def _record(schema: Any) -> Reader:
    if not isinstance(schema, Mapping) or schema.get("type") != "record":
        raise _Unsupported(repr(schema))
    fields = tuple((str(field["name"]), _type(field["type"])) for field in schema["fields"])

    def read(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
        record: dict[str, Any] = {}
        for name, field_reader in fields:
            record[name], pos = field_reader(data, pos)
        return record, pos

    return read


def _array_of_string_records(items: Any) -> Reader:
    """An array of records whose fields are strings or optional strings: the loop written out
    (one is read per customer), a one-byte length or union index read in place."""
    if not isinstance(items, Mapping) or items.get("type") != "record":
        raise _Unsupported(repr(items))
    shape: list[tuple[str, int | None]] = []  # (name, the byte of the null branch, or None)
    for field in items["fields"]:
        kind = field["type"]
        if kind == "string":
            shape.append((str(field["name"]), None))
        elif isinstance(kind, list) and sorted(kind) == ["null", "string"]:
            # Union index i is the zig-zag varint 2i: one byte, 0 or 2.
            shape.append((str(field["name"]), 2 * kind.index("null")))
        else:
            raise _Unsupported(repr(kind))
    fields = tuple(shape)

    def read(data: bytes, pos: int) -> tuple[list[dict[str, Any]], int]:
        elements: list[dict[str, Any]] = []
        append = elements.append
        while True:
            count, pos = _long(data, pos)
            if count == 0:
                return elements, pos
            if count < 0:  # a block that gives its size in bytes too
                count = -count
                _, pos = _long(data, pos)
            for _ in range(count):
                element: dict[str, Any] = {}
                for name, null_byte in fields:
                    if null_byte is not None:
                        branch = data[pos]
                        pos += 1
                        if branch == null_byte:
                            element[name] = None
                            continue
                        if branch != 2 - null_byte:
                            raise UnreadableBody(f"union index byte {branch} not 0 or 2")
                    size = data[pos]
                    if size < 0x80 and not size & 1:  # a length below 64, in its one byte
                        end = pos + 1 + (size >> 1)
                        element[name] = data[pos + 1 : end].decode()
                        pos = end
                    else:
                        element[name], pos = _string(data, pos)
                append(element)

    return read
