"""The event contract, docs/asyncapi.yaml: complete, in step with the daemon, and valid.

Pure checks hold the document to the repository (every schema version in `schemas/` is named,
the topics and group are the daemon's defaults, the dead-letter headers are the ones intake
writes); the official AsyncAPI CLI (npm, tools/asyncapi, installed by `make deps`) validates it,
resolving the Avro `$ref`s. Without Node.js that last test skips on a laptop and fails in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.config import OPTIONS
from consumer.intake import DLQ_HEADER_PREFIX, INPUT_HEADER_PREFIX

REPO = Path(__file__).resolve().parents[1]
DOCUMENT = REPO / "docs" / "asyncapi.yaml"
SCHEMAS = REPO / "schemas"
CLI = REPO / "tools" / "asyncapi" / "node_modules" / ".bin" / "asyncapi"
AVRO_FORMAT = "application/vnd.apache.avro;version=1.9.0"


def load_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    return document


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a parsed YAML tree, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def default(name: str) -> Any:
    return next(option.default for option in OPTIONS if option.path == name)


def test_every_schema_version_is_in_the_contract() -> None:
    """The document's `$ref`s to .avsc files name exactly the files in schemas/, every version."""
    referenced = {
        (DOCUMENT.parent / node["$ref"]).resolve()
        for node in walk(load_document())
        if str(node.get("$ref", "")).endswith(".avsc")
    }
    published = {path.resolve() for path in SCHEMAS.glob("*.avsc")}
    assert published, "no schemas found"
    assert referenced == published, (
        f"not in the contract: {sorted(p.name for p in published - referenced)}; "
        f"no such file: {sorted(str(p) for p in referenced - published)}"
    )


def test_avro_messages_are_named_after_their_record() -> None:
    """Each message with an Avro payload says so (schemaFormat) and bears its record's name,
    and its component key is the schema file's name (`<Record>.v<N>`)."""
    messages = load_document()["components"]["messages"]
    avro = {key: m for key, m in messages.items() if "schemaFormat" in m["payload"]}
    assert len(avro) == len(list(SCHEMAS.glob("*.avsc")))
    for key, message in avro.items():
        payload = message["payload"]
        assert payload["schemaFormat"] == AVRO_FORMAT, key
        path = DOCUMENT.parent / payload["schema"]["$ref"]
        record = json.loads(path.read_text(encoding="utf-8"))
        assert message["name"] == record["name"], key
        assert key == path.name.removesuffix(".avsc"), key


def test_channels_are_the_daemons_topics() -> None:
    """Channel addresses (and their Kafka bindings' topics) are the daemon's default topic
    names, the templates topic is compacted, and the consumer group is the default one."""
    document = load_document()
    channels = document["channels"]
    addresses = {channel["address"] for channel in channels.values()}
    topics = {
        default(name)
        for name in (
            "kafka.input_topic",
            "kafka.status_topic",
            "kafka.metrics_topic",
            "kafka.outcomes_topic",
            "kafka.templates_topic",
            "kafka.dlq_topic",
        )
    }
    assert addresses == topics
    for channel in channels.values():
        assert channel["bindings"]["kafka"]["topic"] == channel["address"]
    templates = next(
        c for c in channels.values() if c["address"] == default("kafka.templates_topic")
    )
    assert templates["bindings"]["kafka"]["topicConfiguration"]["cleanup.policy"] == ["compact"]
    receive = [op for op in document["operations"].values() if op["action"] == "receive"]
    assert len(receive) == 1
    assert receive[0]["bindings"]["kafka"]["groupId"]["enum"] == [default("kafka.group_id")]


def test_dead_letter_headers_are_the_ones_intake_writes() -> None:
    """The DeadLetter message lists every `dlq.*` header consumer/intake.py writes, no other,
    and the renaming of the input's own `dlq.*` headers."""
    headers = load_document()["components"]["messages"]["DeadLetter"]["headers"]
    source = (REPO / "consumer" / "intake.py").read_text(encoding="utf-8")
    written = set(re.findall(rf'"({re.escape(DLQ_HEADER_PREFIX)}[a-z.]+)"', source))
    assert written, "no dlq.* header literals found in consumer/intake.py"
    assert set(headers["properties"]) == written
    assert set(headers["required"]) <= written
    renamed = "^" + re.escape(INPUT_HEADER_PREFIX + DLQ_HEADER_PREFIX)
    assert renamed in headers["patternProperties"]


def test_asyncapi_cli_validates_the_contract(tmp_path: Path) -> None:
    """`asyncapi validate docs/asyncapi.yaml` (the official CLI, resolving the Avro schemas the
    document references) finds no error."""
    if shutil.which("node") is None and os.environ.get("CI") != "true":
        pytest.skip("Node.js is not installed (make deps installs it and the AsyncAPI CLI)")
    assert CLI.exists(), f"{CLI} is missing: run `make deps` (npm ci in tools/asyncapi)"
    # The CLI's usage metrics: off, and its settings file kept out of the home directory.
    settings = tmp_path / "asyncapi-analytics.json"
    settings.write_text('{"analyticsEnabled": "false", "infoMessageShown": "true", "userID": ""}')
    result = subprocess.run(
        [str(CLI), "validate", str(DOCUMENT.relative_to(REPO)), "--fail-severity", "warn"],
        cwd=REPO,
        env={**os.environ, "ASYNCAPI_METRICS_CONFIG_PATH": str(settings)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "is valid" in output, output
