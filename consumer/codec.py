"""Avro single-object encoding with a registry of every schema version in `schemas/`.

Wire format (Avro specification, "Single object encoding"):

    C3 01 | CRC-64-AVRO fingerprint of the writer schema's canonical form (8 bytes, little-endian)
          | Avro binary body

A reader finds the writer schema by its fingerprint and resolves it to the newest version of the
same record that it knows (fastavro performs the resolution), so producers may run any published
version. Every failure to decode raises `CodecError` saying exactly what was wrong. A body
written with the reader's own version is read by the version's compiled reader when it has one
(`consumer.avro_fast`: a third of fastavro's time for a recipients batch), else by fastavro.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from consumer.avro_fast import Reader, UnreadableBody, compile_reader, read_body
from consumer.errors import CodecError

MARKER = b"\xc3\x01"
FINGERPRINT_LEN = 8
HEADER_LEN = len(MARKER) + FINGERPRINT_LEN

# Files are named `<RecordName>.v<N>.avsc`; N orders the versions of one record.
_SCHEMA_FILE = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\.v(?P<version>[0-9]+)\.avsc$")


@dataclass(frozen=True)
class SchemaVersion:
    """One published version of one record schema."""

    name: str  # the record's simple name, e.g. "CampaignScheduled"
    version: int
    fingerprint: bytes  # 8 bytes, little-endian, as on the wire
    parsed: Any  # fastavro's parsed schema
    # A faster reader of this version's own bodies (`consumer.avro_fast`), when it has one.
    fast_reader: Reader | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_json(cls, schema: Mapping[str, Any], version: int) -> SchemaVersion:
        # A fresh named-types table per file: two versions of one record define the same names.
        parsed = parse_schema(dict(schema), named_schemas={})
        canonical = to_parsing_canonical_form(parsed)
        return cls(
            name=str(schema["name"]),
            version=version,
            fingerprint=bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")),
            parsed=parsed,
            fast_reader=compile_reader(parsed),
        )


@dataclass(frozen=True)
class DecodedRecord:
    """A decoded record: its name, the writer's version, and fields in the reader's shape."""

    name: str
    writer_version: int
    fields: dict[str, Any]


def default_schema_dir() -> Path:
    """`consumer/schemas` in an installed wheel, else the repository's top-level `schemas/`."""
    packaged = Path(__file__).parent / "schemas"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "schemas"


class SchemaRegistry:
    """Every known schema version, by fingerprint (to decode) and by name (to encode)."""

    def __init__(self, versions: Iterable[SchemaVersion]) -> None:
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        self._by_name: dict[str, dict[int, SchemaVersion]] = {}
        for schema in versions:
            if schema.fingerprint in self._by_fingerprint:
                other = self._by_fingerprint[schema.fingerprint]
                raise CodecError(
                    f"{schema.name} v{schema.version} has the same fingerprint as "
                    f"{other.name} v{other.version}"
                )
            self._by_fingerprint[schema.fingerprint] = schema
            self._by_name.setdefault(schema.name, {})[schema.version] = schema

    @classmethod
    def from_directory(cls, directory: Path | None = None) -> SchemaRegistry:
        folder = directory or default_schema_dir()
        versions = []
        for path in sorted(folder.glob("*.avsc")):
            match = _SCHEMA_FILE.match(path.name)
            if match is None:
                raise CodecError(f"{path}: schema files must be named <Record>.v<N>.avsc")
            schema = json.loads(path.read_text(encoding="utf-8"))
            if schema.get("name") != match["name"]:
                raise CodecError(f"{path}: declares record {schema.get('name')!r}")
            versions.append(SchemaVersion.from_json(schema, int(match["version"])))
        if not versions:
            raise CodecError(f"no schemas found in {folder}")
        return cls(versions)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> list[SchemaVersion]:
        return [self._by_name[name][v] for v in sorted(self._by_name.get(name, {}))]

    def latest(self, name: str) -> SchemaVersion:
        versions = self._by_name.get(name)
        if not versions:
            raise CodecError(f"no schema named {name!r}")
        return versions[max(versions)]

    def encode(self, name: str, record: Mapping[str, Any], *, version: int | None = None) -> bytes:
        """Single-object-encode `record` with `name`'s given version (default: the newest)."""
        schema = self.latest(name) if version is None else self._version(name, version)
        buffer = io.BytesIO()
        buffer.write(MARKER)
        buffer.write(schema.fingerprint)
        try:
            schemaless_writer(buffer, schema.parsed, dict(record))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CodecError(f"cannot encode {name} v{schema.version}: {exc}") from exc
        return buffer.getvalue()

    def decode(
        self,
        data: bytes,
        *,
        expected: Collection[str] | None = None,
        reader_version: int | None = None,
    ) -> DecodedRecord:
        """Decode single-object-encoded bytes, resolving the writer schema to a reader version.

        `expected` limits the record names accepted (e.g. the input topic's three events);
        `reader_version` pins the reader schema (default: the newest version of the record).
        """
        if len(data) < HEADER_LEN:
            raise CodecError(f"truncated header: {len(data)} bytes, need at least {HEADER_LEN}")
        if data[: len(MARKER)] != MARKER:
            raise CodecError(
                f"bad marker {data[: len(MARKER)].hex()}: not Avro single-object encoding (c301)"
            )
        fp = data[len(MARKER) : HEADER_LEN]
        writer = self._by_fingerprint.get(fp)
        if writer is None:
            raise CodecError(f"unknown schema fingerprint {fp.hex()}")
        if expected is not None and writer.name not in expected:
            raise CodecError(f"unexpected record {writer.name}; expected one of {sorted(expected)}")
        reader = (
            self.latest(writer.name)
            if reader_version is None
            else self._version(writer.name, reader_version)
        )
        if reader is writer and writer.fast_reader is not None:
            try:
                fields, end = read_body(writer.fast_reader, data, HEADER_LEN)
            except UnreadableBody:
                pass  # fastavro reads it, or says what is wrong with it
            else:
                if end == len(data):
                    return DecodedRecord(writer.name, writer.version, fields)
        body = io.BytesIO(data)
        body.seek(HEADER_LEN)
        try:
            fields = schemaless_reader(body, writer.parsed, reader.parsed)
        except EOFError as exc:
            raise CodecError(f"truncated {writer.name} body") from exc
        except Exception as exc:  # fastavro's C decoder raises many types on garbage
            raise CodecError(f"malformed {writer.name} body: {type(exc).__name__}: {exc}") from exc
        trailing = len(data) - body.tell()
        if trailing:
            raise CodecError(f"{trailing} trailing bytes after the {writer.name} body")
        if not isinstance(fields, dict):
            raise CodecError(f"{writer.name} body did not decode to a record")
        return DecodedRecord(name=writer.name, writer_version=writer.version, fields=fields)

    def _version(self, name: str, version: int) -> SchemaVersion:
        try:
            return self._by_name[name][version]
        except KeyError:
            raise CodecError(f"no schema {name} v{version}") from None
