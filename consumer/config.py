"""Configuration: one table of settings, read from environment variables and/or one YAML file.

Every setting has a YAML path (`kafka.bootstrap_servers`) and an environment variable
(`TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS`); the environment wins over the file, the file over
the default. Settings are validated once at start, and an error names the variable, the YAML path
and what is wrong, quoting the bad value (for a structured setting such as the contact groups,
only the bad part; never a secret's value). librdkafka properties pass through unchanged from
`kafka.properties` or `TEXTLOCAL_CONSUMER_KAFKA_PROPERTY_<NAME>` (`SASL_MECHANISMS` →
`sasl.mechanisms`). `textlocal-consumer settings` prints the table.

An unknown setting in the YAML file is an error. An unknown `TEXTLOCAL_CONSUMER_*` variable is
reported (`unknown_variables`, with the nearest known name) but does not stop the daemon: the
environment also carries what Kubernetes adds for a Service named `textlocal-consumer`
(`TEXTLOCAL_CONSUMER_SERVICE_HOST`, `..._PORT_9108_TCP`, ...), which are recognised and ignored.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import time, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from consumer.errors import ConfigError
from consumer.fault_points import KILL_AT_ENV
from consumer.textlocal import TextLocalCredentials, TextLocalSettings
from consumer.workflow import ContactGroup, IntakeLimits, quote, sender_problem

ENV_PREFIX = "TEXTLOCAL_CONSUMER_"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG_FILE"
KAFKA_PROPERTY_ENV = f"{ENV_PREFIX}KAFKA_PROPERTY_"
ROLES = ("intake", "executor", "poller", "daily")
_SECRET_WORDS = ("password", "secret", "key", "token", "credentials")
# What Kubernetes puts in a pod's environment for a Service named textlocal-consumer (service
# links, also of the receipts Service textlocal-consumer-receipts; the Deployment turns them off, but another Service of that name may bring them back).
_SERVICE_LINK = re.compile(
    ENV_PREFIX
    + r"(RECEIPTS_)?(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)"
)


# --- value parsers: each raises ValueError with a sentence saying what is expected ---------------


class _QuotedValueError(ValueError):
    """A parser's error that already quotes the part of the value at fault, so the whole value
    (a JSON list of groups, say) is not quoted after it."""


def _text(raw: object) -> str:
    if not isinstance(raw, str | int | float):
        raise ValueError("must be text")
    return str(raw).strip()


def _optional_text(raw: object) -> str | None:
    return _text(raw) or None


def _positive_int(raw: object) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ValueError("must be a whole number") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_float(raw: object) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ValueError("must be a number") from None
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _positive_float(raw: object) -> float:
    value = _non_negative_float(raw)
    if value == 0:
        raise ValueError("must be greater than 0")
    return value


def _port(raw: object) -> int:
    value = _positive_int(raw)
    if value > 65535:
        raise ValueError("must be a port number (1–65535)")
    return value


def _boolean(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("must be true or false")


def _time_of_day(raw: object) -> time:
    text = _text(raw)
    try:
        hours, minutes = (int(part) for part in text.split(":"))
        return time(hours, minutes)
    except ValueError:
        raise ValueError("must be a UTC time of day as HH:MM, e.g. 03:00") from None


def _roles(raw: object) -> frozenset[str]:
    names = [part.strip() for part in _text(raw).split(",") if part.strip()]
    unknown = sorted(set(names) - set(ROLES))
    expected = f"must be a comma-separated subset of {', '.join(ROLES)}"
    if not names:
        raise _QuotedValueError(f"{expected}; none given")
    if unknown:
        raise _QuotedValueError(f"{expected}; {quote(unknown[0])} is not a role")
    return frozenset(names)


# A receipt token goes into a URL path as it is: URL-safe characters only, and long enough that
# it cannot be guessed (32 characters of `openssl rand -hex 16` carry 128 bits).
MIN_RECEIPT_TOKEN_CHARS = 32
_RECEIPT_TOKEN = re.compile(r"[A-Za-z0-9_~.-]*")


def _receipt_token(raw: object) -> str:
    token = _text(raw)
    if not _RECEIPT_TOKEN.fullmatch(token):
        raise ValueError("may hold only letters, digits and - _ . ~ (it goes into a URL path)")
    if token and len(token) < MIN_RECEIPT_TOKEN_CHARS:
        raise ValueError(
            f"must be at least {MIN_RECEIPT_TOKEN_CHARS} characters (e.g. openssl rand -hex 32)"
        )
    return token


def _http_base_url(raw: object) -> str:
    url = _text(raw)
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("must be an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("must be an http(s) URL without query or fragment")
    return url.rstrip("/")


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        value = _text(raw).lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return parse


def _contact_groups(raw: object) -> tuple[ContactGroup, ...]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            near = quote(exc.doc[exc.pos : exc.pos + 20])
            raise _QuotedValueError(
                f"must be a JSON list of groups ({exc.msg} at character {exc.pos}: {near})"
            ) from None
    if not isinstance(raw, list) or not raw:
        got = "an empty list" if raw == [] else f"a {_json_kind(raw)}"
        raise _QuotedValueError(f"must be a non-empty list of contact groups, got {got}")
    groups = [_contact_group(entry, position) for position, entry in enumerate(raw)]
    prefixes = [group.template_prefix for group in groups]
    duplicates = sorted({p for p in prefixes if prefixes.count(p) > 1})
    if duplicates:
        raise _QuotedValueError(
            f"template prefix {quote(duplicates[0])} is used by more than one group"
        )
    return tuple(groups)


def _contact_group(entry: object, position: int) -> ContactGroup:
    where = f"group #{position + 1}"
    if not isinstance(entry, dict):
        raise _QuotedValueError(
            f"{where} must be a mapping with id, name, template_prefix, ..., "
            f"got a {_json_kind(entry)}"
        )
    known = {
        "id",
        "name",
        "template_prefix",
        "customer_id_field",
        "sender",
        "language_field",
        "default_language",
    }
    unknown = sorted(set(entry) - known, key=str)
    if unknown:
        raise _QuotedValueError(
            f"{where} has unknown field {quote(str(unknown[0]))} (known: {sorted(known)})"
        )

    def text(name: str, default: str) -> str:
        value = entry.get(name, default)
        try:
            return _text(value)
        except ValueError as exc:
            raise _QuotedValueError(f"{where} {name} {exc}, got a {_json_kind(value)}") from None

    if "id" not in entry:
        raise _QuotedValueError(f"{where} needs an id (the TextLocal group id)")
    try:
        group_id = _positive_int(entry["id"])
    except ValueError as exc:
        raise _QuotedValueError(f"{where} id {exc}, got {quote(str(entry['id']))}") from None
    field_name = text("customer_id_field", "custom1")
    if field_name not in {"custom1", "custom2", "custom3"}:
        raise _QuotedValueError(
            f"{where} customer_id_field must be custom1, custom2 or custom3, "
            f"got {quote(field_name)}"
        )
    sender = text("sender", "") or None
    if sender is not None and (problem := sender_problem(sender)):
        raise _QuotedValueError(f"{where} {problem}")
    language_field = text("language_field", "") or None
    if language_field is not None and language_field not in {"custom1", "custom2", "custom3"}:
        raise _QuotedValueError(
            f"{where} language_field must be custom1, custom2 or custom3, got {quote(language_field)}"
        )
    if language_field == field_name:
        raise _QuotedValueError(
            f"{where} language_field {quote(language_field)} is the customer_id_field too"
        )
    return ContactGroup(
        group_id=group_id,
        name=text("name", f"group {group_id}"),
        template_prefix=text("template_prefix", ""),
        customer_id_field=field_name,
        sender=sender,
        language_field=language_field,
        default_language=text("default_language", "").lower(),
    )


def _json_kind(value: object) -> str:
    """What a JSON/YAML value is, for an error that should not quote all of it."""
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return "string" if isinstance(value, str) else type(value).__name__


@dataclass(frozen=True)
class Option:
    """One setting: where it lives, its default, how it is read, and what it does."""

    path: str  # YAML path, dotted
    default: object
    parse: Callable[[object], Any]
    help: str
    secret: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.path.upper().replace(".", "_")


OPTIONS: tuple[Option, ...] = (
    # TextLocal
    Option("textlocal.api_key", "", _optional_text, "TextLocal API key (or username + password/hash).", secret=True),
    Option("textlocal.username", "", _optional_text, "TextLocal username (with password or hash)."),
    Option("textlocal.password", "", _optional_text, "TextLocal password.", secret=True),
    Option("textlocal.hash", "", _optional_text, "TextLocal password hash.", secret=True),
    Option("textlocal.api_url", "https://api.txtlocal.com/", _text, "TextLocal API base URL (UK; India: https://api.textlocal.in/)."),
    Option("textlocal.rate_limit_per_s", 10.0, _positive_float, "Requests per second to TextLocal for the whole account: one limit shared by every replica through Redis."),
    Option("textlocal.rate_limit_burst", 1, _positive_int, "Requests that may go back to back after a quiet spell (1: every request 1/rate after the last)."),
    Option("textlocal.max_concurrency", 4, _positive_int, "TextLocal requests in flight at once, per process."),
    Option("textlocal.connect_timeout_s", 5.0, _positive_float, "Connect timeout for TextLocal."),
    Option("textlocal.request_timeout_s", 60.0, _positive_float, "Whole-request timeout for TextLocal."),
    Option("textlocal.max_attempts", 5, _positive_int, "Attempts per TextLocal call on transient errors."),
    Option("textlocal.max_retry_s", 60.0, _positive_float, "Total time one TextLocal call may spend retrying."),
    # Contact groups
    Option("contact_groups", None, _contact_groups, "Master contact groups: list of {id, name, template_prefix, customer_id_field (custom1|custom2|custom3), sender, language_field (custom1|2|3, optional), default_language}. Env: JSON."),
    # Kafka
    Option("kafka.bootstrap_servers", None, _text, "Kafka bootstrap servers (host:port,...)."),
    Option("kafka.group_id", "textlocal-consumer", _text, "Consumer group of the input topic."),
    Option("kafka.input_topic", "optimove.sms.campaigns.v1", _text, "Campaign events from Optimove."),
    Option("kafka.status_topic", "textlocal.sms.campaign-status.v1", _text, "CampaignStatus events."),
    Option("kafka.metrics_topic", "textlocal.sms.delivery-metrics.v1", _text, "DeliveryMetrics events."),
    Option("kafka.outcomes_topic", "textlocal.sms.customer-outcomes.v1", _text, "CustomerOutcomes events (customer ids per delivery outcome)."),
    Option("kafka.templates_topic", "textlocal.sms.templates.v1", _text, "Template catalog (compacted)."),
    Option("kafka.dlq_topic", "optimove.sms.campaigns.v1.dlq", _text, "Dead letters of the input topic."),
    Option("kafka.optouts_topic", "textlocal.sms.customer-optouts.v1", _text, "CustomerOptOut events (opt-outs read daily from TextLocal)."),
    Option("kafka.create_topics", False, _boolean, "Create missing topics at start (output topics and DLQ; templates compacted)."),
    Option("kafka.topic_partitions", 6, _positive_int, "Partitions of topics the daemon creates."),
    Option("kafka.session_timeout_ms", 10000, _positive_int, "Consumer-group session timeout: how soon a SIGKILLed replica's partitions go to the others (librdkafka's default is 45000)."),
    Option("kafka.group_instance_id", "", _optional_text, "Static group membership id (e.g. the pod name): a restarted container takes its partitions straight back, without a rebalance."),
    Option("kafka.max_record_bytes", 1000000, _positive_int, "Largest record the daemon produces (librdkafka message.max.bytes); a larger dead letter is cut to fit, with dlq.truncated."),
    # Redis
    Option("redis.url", "redis://localhost:6379/0", _text, "Redis URL (redis:// or rediss://).", secret=True),
    Option("redis.key_prefix", "tlc:", _text, "Prefix of every Redis key."),
    Option("redis.allow_no_persistence", False, _boolean, "Run even if Redis has no AOF persistence (state may be lost)."),
    # Workflow
    Option("workflow.poll_interval_s", 86400.0, _positive_float, "Seconds between delivery polls of a sent campaign."),
    Option("workflow.metrics_window_days", 7.0, _positive_float, "Days of delivery polling after a send (an event may override); fractions allowed."),
    Option("workflow.collect_timeout_s", 21600.0, _positive_float, "A campaign whose batches are not all in by then fails."),
    Option("workflow.max_send_delay_s", 3600.0, _non_negative_float, "A send time further in the past is rejected; closer, it is sent at once."),
    Option("workflow.daily_jobs_at", "03:00", _time_of_day, "UTC time of the daily template import and contact refresh."),
    Option("workflow.executor_concurrency", 4, _positive_int, "Campaigns one replica executes at once."),
    Option("workflow.contact_load_concurrency", 4, _positive_int, "create_contacts_bulk calls in flight per campaign."),
    Option("workflow.lease_ttl_s", 60.0, _positive_float, "Lease on a campaign or poll; a crashed replica's work is taken over after it."),
    Option("workflow.send_reconcile_grace_s", 180.0, _positive_float, "After a send whose outcome is unknown, how long TextLocal may take to show it before it is sent again."),
    Option("workflow.segment_retention_s", 0.0, _non_negative_float, "Keep a campaign's segment group this long after its last poll."),
    Option("workflow.drain_timeout_s", 25.0, _positive_float, "On SIGTERM, time to finish in-flight steps before handing them back."),
    Option("workflow.max_group_texts", 20, _positive_int, "A template variant needing more distinct promo codes than this goes out personally (bulk_json) instead of one segment per code."),
    Option("workflow.bulk_chunk_size", 1000, _positive_int, "Personal texts (names, many promo codes) per bulk_json call (at most 10,000)."),
    Option("workflow.max_handler_failures", 5, _positive_int, "Unexpected errors in a row on one campaign (executor, poller) before it ends FAILED INTERNAL_ERROR."),
    Option("workflow.max_metadata_bytes", 16384, _positive_int, "Largest campaign metadata (echoed on every output event); larger is REJECTED METADATA_TOO_LARGE."),
    # Delivery receipts (DESIGN §4b; docs/DECISIONS.md "Delivery receipts")
    Option("receipts.token", "", _receipt_token, "Secret path token of the receipt listener (at least 32 of A-Z a-z 0-9 - _ . ~); empty: no receipt listener.", secret=True),
    Option("receipts.public_url", "", _http_base_url, "Public base URL at which TextLocal reaches the receipt listener (e.g. https://sms-receipts.example.com); when set, sends carry receipt_url = it + /receipts/<token>."),
    Option("receipts.host", "0.0.0.0", _text, "Address of the receipt listener."),  # noqa: S104 - a pod's port
    Option("receipts.port", 9109, _port, "Port of the receipt listener (its own: exposing it exposes neither /metrics nor the health endpoints)."),
    Option("receipts.max_backlog", 100000, _positive_int, "Receipts recorded and not yet turned into outcomes, beyond which new ones are refused with 503 and Retry-After."),
    Option("receipts.retention_s", 864000.0, _positive_float, "How long a campaign's receipts are remembered for de-duplication, from its send (default 10 days: the 7-day window and TextLocal's 4 days for unknowns)."),
    # Per-customer outcomes
    Option("outcomes.enabled", True, _boolean, "Publish CustomerOutcomes (customer ids per delivery outcome, each final outcome once); costs about 65 MiB of Redis per million recipients during a campaign's window. Off: only DeliveryMetrics."),
    # Process
    Option("roles", ",".join(ROLES), _roles, "Roles this process runs: intake, executor, poller, daily."),
    Option("http.host", "0.0.0.0", _text, "Address of the /metrics, /healthz, /readyz server."),  # noqa: S104 - a pod's port
    Option("http.port", 9108, _port, "Port of the /metrics, /healthz, /readyz server."),
    Option("log.format", "auto", _choice("auto", "json", "text"), "Log lines as JSON, text, or auto (text on a terminal)."),
    Option("log.level", "INFO", _choice("debug", "info", "warning", "error"), "Log level."),
    Option("instance_id", "", _optional_text, "This replica's name in leases and logs (default: host name + pid)."),
)  # fmt: skip


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    group_id: str
    input_topic: str
    status_topic: str
    metrics_topic: str
    templates_topic: str
    dlq_topic: str
    create_topics: bool
    topic_partitions: int
    optouts_topic: str = "textlocal.sms.customer-optouts.v1"
    max_record_bytes: int = 1_000_000
    session_timeout_ms: int = 10_000
    group_instance_id: str | None = None
    outcomes_topic: str = "textlocal.sms.customer-outcomes.v1"
    properties: Mapping[str, str] = field(default_factory=dict, repr=False)

    def client_config(self) -> dict[str, str]:
        return {**self.properties, "bootstrap.servers": self.bootstrap_servers}

    def consumer_config(self) -> dict[str, str]:
        """The input consumer's settings: group, session timeout, static membership."""
        config = {
            "session.timeout.ms": str(self.session_timeout_ms),
            "heartbeat.interval.ms": str(max(1000, self.session_timeout_ms // 4)),
            **self.client_config(),
            "group.id": self.group_id,
        }
        if self.group_instance_id:
            config["group.instance.id"] = self.group_instance_id
        return config

    def output_topics(self) -> dict[str, str]:
        """Logical output kinds (as in the outbox) → topic names."""
        return {
            "status": self.status_topic,
            "metrics": self.metrics_topic,
            "outcomes": self.outcomes_topic,
            "templates": self.templates_topic,
            "optouts": self.optouts_topic,
        }

    def __repr__(self) -> str:
        shown = {k: ("***" if _looks_secret(k) else v) for k, v in self.properties.items()}
        return (
            f"KafkaSettings(bootstrap_servers={self.bootstrap_servers!r}, "
            f"group_id={self.group_id!r}, input_topic={self.input_topic!r}, properties={shown})"
        )


@dataclass(frozen=True)
class RedisSettings:
    url: str = field(repr=False)
    key_prefix: str
    allow_no_persistence: bool

    def __repr__(self) -> str:
        return f"RedisSettings(url={redact_url(self.url)!r}, key_prefix={self.key_prefix!r})"


@dataclass(frozen=True)
class WorkflowSettings:
    poll_interval: timedelta = timedelta(days=1)
    metrics_window_days: float = 7.0
    collect_timeout: timedelta = timedelta(hours=6)
    max_send_delay: timedelta = timedelta(hours=1)
    daily_jobs_at: time = time(3, 0)
    executor_concurrency: int = 4
    contact_load_concurrency: int = 4
    lease_ttl: timedelta = timedelta(seconds=60)
    send_reconcile_grace: timedelta = timedelta(minutes=3)
    segment_retention: timedelta = timedelta(0)
    drain_timeout_s: float = 25.0
    max_handler_failures: int = 5
    max_metadata_bytes: int = 16_384
    max_group_texts: int = 20
    bulk_chunk_size: int = 1_000
    outcomes_enabled: bool = True

    @property
    def intake_limits(self) -> IntakeLimits:
        return IntakeLimits(
            max_send_delay=self.max_send_delay,
            default_window_days=self.metrics_window_days,
            max_metadata_bytes=self.max_metadata_bytes,
        )


@dataclass(frozen=True)
class ReceiptSettings:
    """The receipt listener (on when a token is set) and the URL sends carry."""

    token: str = field(default="", repr=False)
    public_url: str = ""
    host: str = "0.0.0.0"  # noqa: S104 - a pod's port
    port: int = 9109
    max_backlog: int = 100_000
    retention: timedelta = timedelta(days=10)

    @property
    def enabled(self) -> bool:
        return bool(self.token)

    @property
    def receipt_url(self) -> str | None:
        """What sends carry as `receipt_url` (None: no public URL configured)."""
        if not (self.token and self.public_url):
            return None
        return f"{self.public_url}/receipts/{self.token}"

    def __repr__(self) -> str:
        return (
            f"ReceiptSettings(enabled={self.enabled}, public_url={self.public_url!r}, "
            f"port={self.port}, max_backlog={self.max_backlog})"
        )


@dataclass(frozen=True)
class Settings:
    textlocal: TextLocalSettings
    credentials: TextLocalCredentials
    contact_groups: tuple[ContactGroup, ...]
    kafka: KafkaSettings
    redis: RedisSettings
    workflow: WorkflowSettings
    roles: frozenset[str]
    http_host: str
    http_port: int
    log_format: str
    log_level: str
    instance_id: str
    receipts: ReceiptSettings = field(default_factory=ReceiptSettings)

    def secrets(self) -> list[str]:
        """Every secret value, for the log scrubber."""
        values = [
            self.credentials.api_key,
            self.credentials.password,
            self.credentials.password_hash,
            self.receipts.token,
            *(v for k, v in self.kafka.properties.items() if _looks_secret(k)),
        ]
        password = _url_password(self.redis.url)
        return [v for v in [*values, password] if v]


def load_settings(environ: Mapping[str, str], config_file: Path | None = None) -> Settings:
    """Build and validate the settings from the environment (and the YAML file, if any)."""
    file_path = config_file or (
        Path(environ[CONFIG_FILE_ENV]) if environ.get(CONFIG_FILE_ENV) else None
    )
    from_file = _read_yaml(file_path) if file_path else {}
    values = {option.path: _value(option, environ, from_file) for option in OPTIONS}
    properties = _kafka_properties(environ, from_file)
    credentials = _build(
        "textlocal.api_key",
        lambda: _credentials(values),
    )
    textlocal = _build(
        "textlocal.api_url",
        lambda: TextLocalSettings(
            api_url=values["textlocal.api_url"],
            connect_timeout_s=values["textlocal.connect_timeout_s"],
            request_timeout_s=values["textlocal.request_timeout_s"],
            rate_limit_per_s=values["textlocal.rate_limit_per_s"],
            rate_limit_burst=values["textlocal.rate_limit_burst"],
            max_concurrency=values["textlocal.max_concurrency"],
            max_attempts=values["textlocal.max_attempts"],
            max_total_s=values["textlocal.max_retry_s"],
        ),
    )
    grace_s = values["workflow.send_reconcile_grace_s"]
    if grace_s <= textlocal.request_timeout_s:
        raise ConfigError(
            f"{ENV_PREFIX}WORKFLOW_SEND_RECONCILE_GRACE_S (workflow.send_reconcile_grace_s)",
            f"must be longer than textlocal.request_timeout_s ({textlocal.request_timeout_s:g}): "
            "a send still in flight must have landed before it is looked for and sent again",
        )
    if values["receipts.token"] and values["receipts.port"] == values["http.port"]:
        raise ConfigError(
            f"{ENV_PREFIX}RECEIPTS_PORT (receipts.port)",
            f"must differ from http.port ({values['http.port']}): the receipt listener has "
            "its own port, so exposing it exposes neither /metrics nor the health endpoints",
        )
    if values["receipts.token"] and not values["outcomes.enabled"]:
        raise ConfigError(
            f"{ENV_PREFIX}RECEIPTS_TOKEN (receipts.token)",
            "needs outcomes.enabled: receipts are turned into CustomerOutcomes, nothing else",
        )
    if values["receipts.public_url"] and not values["receipts.token"]:
        raise ConfigError(
            f"{ENV_PREFIX}RECEIPTS_TOKEN (receipts.token)",
            "is required when receipts.public_url is set (the receipt URL carries it)",
        )
    return Settings(
        textlocal=textlocal,
        credentials=credentials,
        contact_groups=values["contact_groups"],
        kafka=KafkaSettings(
            bootstrap_servers=values["kafka.bootstrap_servers"],
            group_id=values["kafka.group_id"],
            input_topic=values["kafka.input_topic"],
            status_topic=values["kafka.status_topic"],
            metrics_topic=values["kafka.metrics_topic"],
            outcomes_topic=values["kafka.outcomes_topic"],
            templates_topic=values["kafka.templates_topic"],
            dlq_topic=values["kafka.dlq_topic"],
            create_topics=values["kafka.create_topics"],
            topic_partitions=values["kafka.topic_partitions"],
            optouts_topic=values["kafka.optouts_topic"],
            max_record_bytes=values["kafka.max_record_bytes"],
            session_timeout_ms=values["kafka.session_timeout_ms"],
            group_instance_id=values["kafka.group_instance_id"],
            properties=properties,
        ),
        redis=RedisSettings(
            url=values["redis.url"],
            key_prefix=values["redis.key_prefix"],
            allow_no_persistence=values["redis.allow_no_persistence"],
        ),
        workflow=WorkflowSettings(
            poll_interval=timedelta(seconds=values["workflow.poll_interval_s"]),
            metrics_window_days=values["workflow.metrics_window_days"],
            collect_timeout=timedelta(seconds=values["workflow.collect_timeout_s"]),
            max_send_delay=timedelta(seconds=values["workflow.max_send_delay_s"]),
            daily_jobs_at=values["workflow.daily_jobs_at"],
            executor_concurrency=values["workflow.executor_concurrency"],
            contact_load_concurrency=values["workflow.contact_load_concurrency"],
            lease_ttl=timedelta(seconds=values["workflow.lease_ttl_s"]),
            send_reconcile_grace=timedelta(seconds=values["workflow.send_reconcile_grace_s"]),
            segment_retention=timedelta(seconds=values["workflow.segment_retention_s"]),
            drain_timeout_s=values["workflow.drain_timeout_s"],
            max_handler_failures=values["workflow.max_handler_failures"],
            max_group_texts=values["workflow.max_group_texts"],
            bulk_chunk_size=min(values["workflow.bulk_chunk_size"], 10_000),
            max_metadata_bytes=values["workflow.max_metadata_bytes"],
            outcomes_enabled=values["outcomes.enabled"],
        ),
        roles=values["roles"],
        http_host=values["http.host"],
        http_port=values["http.port"],
        log_format=values["log.format"],
        log_level=values["log.level"],
        instance_id=values["instance_id"] or f"{socket.gethostname()}-{os.getpid()}",
        receipts=ReceiptSettings(
            token=values["receipts.token"],
            public_url=values["receipts.public_url"],
            host=values["receipts.host"],
            port=values["receipts.port"],
            max_backlog=values["receipts.max_backlog"],
            retention=timedelta(seconds=values["receipts.retention_s"]),
        ),
    )


@dataclass(frozen=True)
class UnknownVariable:
    """A `TEXTLOCAL_CONSUMER_*` variable that is no setting, and the setting it may mean."""

    name: str
    nearest: str | None

    def __str__(self) -> str:
        hint = f" (did you mean {self.nearest}?)" if self.nearest else ""
        return f"{self.name} is not a setting and is ignored{hint}"


def unknown_variables(environ: Mapping[str, str]) -> list[UnknownVariable]:
    """The `TEXTLOCAL_CONSUMER_*` variables that are neither a setting, a librdkafka property
    (`..._KAFKA_PROPERTY_<NAME>`), the config file, the tests' kill point, nor a Kubernetes
    service link of a Service named textlocal-consumer; each with the nearest setting."""
    known = {option.env for option in OPTIONS} | {CONFIG_FILE_ENV, KILL_AT_ENV}
    suffixes = {name[len(ENV_PREFIX) :]: name for name in known}
    found = []
    for name in sorted(environ):
        if (
            not name.startswith(ENV_PREFIX)
            or name in known
            or name.startswith(KAFKA_PROPERTY_ENV)
            or _SERVICE_LINK.fullmatch(name)
        ):
            continue
        close = difflib.get_close_matches(name[len(ENV_PREFIX) :], suffixes, n=1, cutoff=0.6)
        found.append(UnknownVariable(name, suffixes[close[0]] if close else None))
    return found


def describe_settings() -> str:
    """The settings table, for `textlocal-consumer settings` and the README."""
    lines = []
    for option in OPTIONS:
        default = "(required)" if option.default is None else repr(option.default)
        if option.secret:
            default = "(secret)" if option.default in ("", None) else "(secret, has default)"
        lines.append(f"{option.env}\n    {option.path} = {default}\n    {option.help}")
    lines.append(
        f"{KAFKA_PROPERTY_ENV}<NAME>\n    kafka.properties.<name>\n"
        "    Any librdkafka property, e.g. SECURITY_PROTOCOL → security.protocol."
    )
    lines.append(
        f"{CONFIG_FILE_ENV}\n    (none)\n    A YAML file holding any of the settings above."
    )
    return "\n".join(lines)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    password = _url_password(url)
    return url.replace(f":{password}@", ":***@") if password else url


# --- internals -------------------------------------------------------------------------------


def _value(option: Option, environ: Mapping[str, str], from_file: Mapping[str, Any]) -> Any:
    if option.env in environ:
        raw: object = environ[option.env]
    elif option.path in from_file:
        raw = from_file[option.path]
    elif option.default is None:
        raise ConfigError(f"{option.env} ({option.path})", f"is required: {option.help}")
    else:
        raw = option.default
    try:
        return option.parse(raw)
    except ValueError as exc:
        # A secret's value is never shown (no secret's parser quotes a part of it either).
        quoted = option.secret or isinstance(exc, _QuotedValueError)
        shown = "" if quoted else f", got {quote(str(raw))}"
        raise ConfigError(f"{option.env} ({option.path})", f"{exc}{shown}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(CONFIG_FILE_ENV, f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(CONFIG_FILE_ENV, f"{path} is not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(CONFIG_FILE_ENV, f"{path} must hold a mapping of settings")
    flat: dict[str, Any] = {}
    known = {option.path for option in OPTIONS} | {"kafka.properties"}
    _flatten(document, "", flat, known)
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(CONFIG_FILE_ENV, f"{path}: unknown setting {unknown[0]!r}")
    return flat


def _flatten(node: Mapping[str, Any], prefix: str, out: dict[str, Any], known: set[str]) -> None:
    for name, value in node.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict) and path not in known:
            _flatten(value, f"{path}.", out, known)
        else:
            out[path] = value


def _kafka_properties(environ: Mapping[str, str], from_file: Mapping[str, Any]) -> dict[str, str]:
    properties: dict[str, str] = {}
    file_properties = from_file.get("kafka.properties", {})
    if not isinstance(file_properties, dict):
        raise ConfigError("kafka.properties", "must be a mapping of librdkafka properties")
    properties.update({str(k): str(v) for k, v in file_properties.items()})
    for name, value in environ.items():
        if name.startswith(KAFKA_PROPERTY_ENV):
            properties[name[len(KAFKA_PROPERTY_ENV) :].lower().replace("_", ".")] = value
    if "bootstrap.servers" in properties:
        raise ConfigError("kafka.properties", "set bootstrap servers with kafka.bootstrap_servers")
    return properties


def _credentials(values: Mapping[str, Any]) -> TextLocalCredentials:
    api_key, username = values["textlocal.api_key"], values["textlocal.username"]
    if api_key:
        if username:
            raise ConfigError(
                "TEXTLOCAL_CONSUMER_TEXTLOCAL_USERNAME (textlocal.username)",
                "give either an API key or a username, not both",
            )
        return TextLocalCredentials.from_api_key(api_key)
    if not username:
        raise ConfigError(
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY (textlocal.api_key)",
            "is required (or textlocal.username with textlocal.password or textlocal.hash)",
        )
    if values["textlocal.hash"]:
        return TextLocalCredentials.from_hash(username, values["textlocal.hash"])
    return TextLocalCredentials.from_password(username, values["textlocal.password"] or "")


def _build(setting: str, make: Callable[[], Any]) -> Any:
    """Run a constructor; its ConfigError gains the environment variable's name."""
    try:
        return make()
    except ConfigError as exc:
        if exc.setting.startswith(ENV_PREFIX):
            raise  # already names its variable
        path = exc.setting if exc.setting in {o.path for o in OPTIONS} else setting
        env = ENV_PREFIX + path.upper().replace(".", "_")
        raise ConfigError(f"{env} ({path})", exc.problem) from None


def _looks_secret(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_WORDS)


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None
