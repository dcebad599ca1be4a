"""Settings from the environment and a YAML file, validated with errors naming the setting."""

from __future__ import annotations

import json
from datetime import time, timedelta
from pathlib import Path

import pytest

from consumer.config import UnknownVariable, describe_settings, load_settings, unknown_variables
from consumer.errors import ConfigError

GROUPS = json.dumps([{"id": 5, "name": "UK", "template_prefix": "OPT_", "sender": "ShopCo"}])
BASE = {
    "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
    "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": "k3y-VALUE-123",
    "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": GROUPS,
}


def test_defaults_are_sane() -> None:
    """With only the required settings, the defaults of DESIGN §6 apply."""
    settings = load_settings(BASE)
    assert settings.kafka.input_topic == "optimove.sms.campaigns.v1"
    assert settings.kafka.dlq_topic == "optimove.sms.campaigns.v1.dlq"
    assert settings.workflow.poll_interval == timedelta(days=1)
    assert settings.workflow.metrics_window_days == 7
    assert settings.workflow.daily_jobs_at == time(3, 0)
    assert settings.roles == {"intake", "executor", "poller", "daily"}
    assert settings.http_port == 9108
    assert settings.contact_groups[0].sender == "ShopCo"


def test_yaml_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    """A YAML file supplies settings; an environment variable overrides the same setting."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "kafka:\n  bootstrap_servers: from-file:9092\n  group_id: file-group\n"
        "  properties:\n    security.protocol: SASL_SSL\n"
        "workflow:\n  poll_interval_s: 3600\n"
        "contact_groups:\n  - {id: 9, template_prefix: VIP_, customer_id_field: custom2}\n"
    )
    env = {
        "TEXTLOCAL_CONSUMER_CONFIG_FILE": str(config),
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": "abcd",
        "TEXTLOCAL_CONSUMER_KAFKA_GROUP_ID": "env-group",
        "TEXTLOCAL_CONSUMER_KAFKA_PROPERTY_SASL_MECHANISMS": "PLAIN",
    }
    settings = load_settings(env)
    assert settings.kafka.bootstrap_servers == "from-file:9092"
    assert settings.kafka.group_id == "env-group"
    assert settings.kafka.properties == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": "PLAIN",
    }
    assert settings.workflow.poll_interval == timedelta(hours=1)
    assert settings.contact_groups[0].customer_id_field == "custom2"


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": None}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"TEXTLOCAL_CONSUMER_HTTP_PORT": "70000"}, "HTTP_PORT (http.port): must be a port"),
        ({"TEXTLOCAL_CONSUMER_WORKFLOW_POLL_INTERVAL_S": "daily"}, "POLL_INTERVAL_S"),
        ({"TEXTLOCAL_CONSUMER_ROLES": "intake,sender"}, "ROLES (roles): must be a comma"),
        ({"TEXTLOCAL_CONSUMER_CONTACT_GROUPS": '[{"name": "x"}]'}, "group #1 needs an id"),
        ({"TEXTLOCAL_CONSUMER_CONTACT_GROUPS": "not json"}, "must be a JSON list"),
        (
            {"TEXTLOCAL_CONSUMER_CONTACT_GROUPS": json.dumps([{"id": 1}, {"id": 2}])},
            "template prefix '' is used by more than one group",
        ),
        (
            {"TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": "abc&def"},
            "API_KEY (textlocal.api_key): must not contain",
        ),
        ({"TEXTLOCAL_CONSUMER_TEXTLOCAL_API_URL": "ftp://x"}, "API_URL (textlocal.api_url)"),
        (
            {"TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": None},
            "API_KEY (textlocal.api_key): is required",
        ),
        ({"TEXTLOCAL_CONSUMER_WORKFLOW_SEND_RECONCILE_GRACE_S": "30"}, "must be longer than"),
        ({"TEXTLOCAL_CONSUMER_LOG_FORMAT": "xml"}, "LOG_FORMAT (log.format): must be one of"),
    ],
)
def test_bad_settings_name_themselves(changes: dict[str, str | None], names: str) -> None:
    """Each invalid setting raises ConfigError naming its variable and the problem."""
    env = {**BASE, **{k: v for k, v in changes.items() if v is not None}}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
    with pytest.raises(ConfigError, match=names.replace("(", r"\(").replace(")", r"\)")):
        load_settings(env)


def test_secrets_never_show() -> None:
    """Secret values stay out of reprs and error messages."""
    env = {
        **BASE,
        "TEXTLOCAL_CONSUMER_REDIS_URL": "redis://:r3dis-pass@redis:6379/0",
        "TEXTLOCAL_CONSUMER_KAFKA_PROPERTY_SASL_PASSWORD": "kafka-s3cret",
    }
    settings = load_settings(env)
    shown = repr(settings)
    for secret in ("k3y-VALUE-123", "r3dis-pass", "kafka-s3cret"):
        assert secret not in shown
    assert set(settings.secrets()) == {"k3y-VALUE-123", "r3dis-pass", "kafka-s3cret"}
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": "se$cret"})
    assert "se$cret" not in str(error.value)


def test_unknown_yaml_setting_is_refused(tmp_path: Path) -> None:
    """A misspelt setting in the YAML file is an error, not silently ignored."""
    config = tmp_path / "c.yaml"
    config.write_text("kafka:\n  bootstrap_server: x:1\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'kafka\.bootstrap_server'"):
        load_settings({**BASE, "TEXTLOCAL_CONSUMER_CONFIG_FILE": str(config)})


def test_settings_table_lists_every_variable() -> None:
    """The printed table names each variable with its YAML path."""
    table = describe_settings()
    assert (
        "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS\n    kafka.bootstrap_servers = (required)"
        in table
    )
    assert "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY\n    textlocal.api_key = (secret)" in table


@pytest.mark.parametrize(
    ("changes", "message", "absent"),
    [
        (
            {"customer_id_field": "custom9"},
            "group #1 customer_id_field must be custom1, custom2 or custom3, got 'custom9'",
            ["ShopCo", "OPT_"],
        ),
        ({"id": "five"}, "group #1 id must be a whole number, got 'five'", ["ShopCo"]),
        ({"name": ["UK"]}, "group #1 name must be text, got a list", ["ShopCo"]),
        ({"sender": "Shop Co!"}, "group #1 sender 'Shop Co!': use 3–11", ["OPT_"]),
        ({"colour": "red"}, "group #1 has unknown field 'colour'", ["ShopCo", "red"]),
    ],
)
def test_a_bad_contact_group_field_quotes_only_that_value(
    changes: dict[str, object], message: str, absent: list[str]
) -> None:
    """An error in one field of TEXTLOCAL_CONSUMER_CONTACT_GROUPS quotes that field's value,
    not the whole JSON setting."""
    group = {"id": 5, "name": "UK", "template_prefix": "OPT_", "sender": "ShopCo", **changes}
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": json.dumps([group])})
    shown = str(error.value)
    assert shown.startswith("TEXTLOCAL_CONSUMER_CONTACT_GROUPS (contact_groups): ")
    assert message in shown
    assert ", got '[" not in shown
    for text in absent:
        assert text not in shown


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TEXTLOCAL_CONSUMER_CONTACT_GROUPS", '[{"id": 5}, oops]', "at character 12: 'oops]'"),
        (
            "TEXTLOCAL_CONSUMER_CONTACT_GROUPS",
            '{"id": 5}',
            "non-empty list of contact groups, got a mapping",
        ),
        ("TEXTLOCAL_CONSUMER_ROLES", "intake,sender,poller", "daily; 'sender' is not a role"),
        ("TEXTLOCAL_CONSUMER_TEXTLOCAL_API_URL", "ftp://api.example", "got 'ftp://api.example'"),
        ("TEXTLOCAL_CONSUMER_HTTP_PORT", "9" * 100, f"got '{'9' * 60}'… (100 characters)"),
    ],
)
def test_errors_quote_the_bad_value_once_and_cut_short(
    variable: str, value: str, message: str
) -> None:
    """A bad value is quoted once, at most 60 characters of it, and a structured setting's
    error quotes the part at fault rather than the whole setting."""
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, variable: value})
    shown = str(error.value)
    assert message in shown
    assert shown.count("got ") <= 1


def test_an_api_url_holding_a_key_is_never_echoed() -> None:
    """A TextLocal URL with credentials or a query (which may hold the API key) is refused
    without quoting it, whatever else is wrong with it."""
    for url in ("ftp://user:pa55word@api.example/", "ftp://api.example/?apikey=k3y-in-url"):
        with pytest.raises(ConfigError) as error:
            load_settings({**BASE, "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_URL": url})
        assert "pa55word" not in str(error.value)
        assert "k3y-in-url" not in str(error.value)


def test_unknown_variables_are_named_with_the_nearest_setting() -> None:
    """A TEXTLOCAL_CONSUMER_* variable that is no setting is reported with the closest known
    name (or none); settings, librdkafka properties, the config file, the tests' kill point and
    Kubernetes' service-link variables for a Service named textlocal-consumer are not."""
    environ = {
        **BASE,
        "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVER": "typo:9092",
        "TEXTLOCAL_CONSUMER_LOGLEVEL": "debug",
        "TEXTLOCAL_CONSUMER_ZZZ": "1",
        "TEXTLOCAL_CONSUMER_KAFKA_PROPERTY_SASL_MECHANISMS": "PLAIN",
        "TEXTLOCAL_CONSUMER_CONFIG_FILE": "/etc/tlc.yaml",
        "TEXTLOCAL_CONSUMER_TEST_KILL_AT": "send.returned",
        "TEXTLOCAL_CONSUMER_SERVICE_HOST": "10.96.0.12",
        "TEXTLOCAL_CONSUMER_SERVICE_PORT": "9108",
        "TEXTLOCAL_CONSUMER_SERVICE_PORT_HTTP": "9108",
        "TEXTLOCAL_CONSUMER_PORT": "tcp://10.96.0.12:9108",
        "TEXTLOCAL_CONSUMER_PORT_9108_TCP": "tcp://10.96.0.12:9108",
        "TEXTLOCAL_CONSUMER_PORT_9108_TCP_PROTO": "tcp",
        "TEXTLOCAL_CONSUMER_PORT_9108_TCP_PORT": "9108",
        "TEXTLOCAL_CONSUMER_PORT_9108_TCP_ADDR": "10.96.0.12",
        "OTHER_SERVICE_HOST": "10.96.0.13",
    }
    assert unknown_variables(environ) == [
        UnknownVariable(
            "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVER",
            "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS",
        ),
        UnknownVariable("TEXTLOCAL_CONSUMER_LOGLEVEL", "TEXTLOCAL_CONSUMER_LOG_LEVEL"),
        UnknownVariable("TEXTLOCAL_CONSUMER_ZZZ", None),
    ]
    assert str(unknown_variables(environ)[1]) == (
        "TEXTLOCAL_CONSUMER_LOGLEVEL is not a setting and is ignored "
        "(did you mean TEXTLOCAL_CONSUMER_LOG_LEVEL?)"
    )
    assert unknown_variables(BASE) == []
