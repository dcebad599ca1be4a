"""The command line as an operator uses it: real processes against Kafka, Redis and the sandbox."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import version
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from consumer.cli import build_parser
from tests.daemon import CHECKOUT, CONSOLE_SCRIPT, DaemonTopics, daemon_environment, free_port
from tests.helpers import REGISTRY, consume, new_ref
from tests.rigs import customer_ids, workflow_rig
from textlocal_sandbox import SandboxHandle
from textlocal_sandbox.__main__ import build_parser as build_sandbox_parser


async def cli(
    env: Mapping[str, str], *args: str, command: tuple[str, ...] = (CONSOLE_SCRIPT,)
) -> subprocess.CompletedProcess[str]:
    """Run the command line with `env` (and this checkout's `consumer` first on the path)."""
    return await asyncio.to_thread(
        subprocess.run,
        [*command, *args],
        env={"PYTHONPATH": str(CHECKOUT), **env},
        capture_output=True,
        text=True,
        check=False,
    )


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


@pytest.mark.parametrize("parser", [build_parser(), build_sandbox_parser()], ids=["cli", "sandbox"])
def test_every_option_and_command_has_help_text(parser: argparse.ArgumentParser) -> None:
    """Every option, argument and subcommand of `textlocal-consumer` (and of the sandbox) says
    what it is in --help."""
    missing = []
    for each in parsers(parser):
        for action in each._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{each.prog}: {action.option_strings or action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions if choice.help}
                missing += [f"{each.prog} {name}" for name in action.choices if name not in helped]
    assert missing == []


async def test_version_comes_from_the_package_metadata() -> None:
    """`textlocal-consumer --version` and `python -m consumer --version` print the installed
    distribution's version."""
    expected = f"textlocal-consumer {version('textlocal-consumer')}"
    for command in ((CONSOLE_SCRIPT,), (sys.executable, "-m", "consumer")):
        shown = await cli({}, "--version", command=command)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.strip() == expected


async def test_python_dash_m_consumer_is_the_command_line() -> None:
    """`python -m consumer` runs the same command line: --help lists the commands, and a bad
    setting exits 2 naming it."""
    helped = await cli({}, "--help", command=(sys.executable, "-m", "consumer"))
    assert helped.returncode == 0
    assert "campaign-status" in helped.stdout
    refused = await cli(
        {"TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": "abcd"},
        "run",
        command=(sys.executable, "-m", "consumer"),
    )
    assert refused.returncode == 2
    assert "TEXTLOCAL_CONSUMER_CONTACT_GROUPS" in refused.stderr


async def test_help_and_settings_need_no_services() -> None:
    """--help lists the commands; `settings` prints the table without any configuration."""
    helped = await cli({}, "--help")
    assert helped.returncode == 0
    for command in ("run", "check", "sync-contacts", "import-templates", "publish-sample"):
        assert command in helped.stdout
    table = await cli({}, "settings")
    assert table.returncode == 0
    assert "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS" in table.stdout


async def test_unknown_role_is_refused() -> None:
    """`run --roles` accepts only the daemon's roles, and says which ones exist."""
    env = {
        "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": "abcd",
        "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": '[{"id": 5}]',
    }
    result = await cli(env, "run", "--roles", "intake,mailer")
    assert result.returncode == 2
    assert "ROLES (roles): must be a comma-separated subset of intake, executor" in result.stderr


async def test_bad_settings_exit_2_naming_the_setting() -> None:
    """A missing required setting stops the command with status 2 and the variable's name."""
    result = await cli({"TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": "abcd"}, "run")
    assert result.returncode == 2
    assert "TEXTLOCAL_CONSUMER_CONTACT_GROUPS" in result.stderr
    assert "abcd" not in result.stderr


@pytest.mark.integration
async def test_operator_commands_against_the_local_stack(
    kafka_bootstrap: str,
    redis_url: str,
    key_prefix: str,
    new_topic: Callable[..., str],
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    """check, sync-contacts, import-templates, publish-sample and campaign-status all work."""
    group_id = await sandbox.admin.generate_contacts(
        "Optimove customers", 2500, first_number=447_700_000_000, id_width=5
    )
    (template_id,) = await sandbox.admin.seed_templates(
        [{"title": "OPT_Promo", "body": "Use [%PROMO_CODE%]"}]
    )
    topics = DaemonTopics(
        input=new_topic("input"),
        status=new_topic("status"),
        metrics=new_topic("metrics"),
        templates=new_topic("templates", config={"cleanup.policy": "compact"}),
        dlq=new_topic("dlq"),
        outcomes=new_topic("outcomes"),
    )
    env = daemon_environment(
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        key_prefix=key_prefix,
        topics=topics,
        sandbox=sandbox,
        group_id=group_id,
        http_port=free_port(),
    )

    typo = {
        "TEXTLOCAL_CONSUMER_WORKFLOW_POLL_INTERVAL": "3600",
        # What Kubernetes adds for a Service named textlocal-consumer: not reported.
        "TEXTLOCAL_CONSUMER_SERVICE_HOST": "10.0.0.11",
        "TEXTLOCAL_CONSUMER_PORT_9108_TCP_ADDR": "10.0.0.11",
    }
    checked = await cli({**env, **typo}, "check")
    assert checked.returncode == 0, checked.stderr
    assert "Settings   ok, 1 unknown variable:" in checked.stdout
    assert (
        "warning: TEXTLOCAL_CONSUMER_WORKFLOW_POLL_INTERVAL is not a setting and is ignored "
        "(did you mean TEXTLOCAL_CONSUMER_WORKFLOW_POLL_INTERVAL_S?)"
    ) in checked.stdout
    [warning] = [
        json.loads(line)
        for line in checked.stderr.splitlines()
        if '"config.unknown_variable"' in line
    ]
    assert warning["variable"] == "TEXTLOCAL_CONSUMER_WORKFLOW_POLL_INTERVAL"
    assert warning["did_you_mean"] == "TEXTLOCAL_CONSUMER_WORKFLOW_POLL_INTERVAL_S"
    assert warning["level"] == "warning"
    assert "Redis      ok (AOF on)" in checked.stdout
    assert f"group {group_id} (OPT_): 0 indexed" in checked.stdout

    synced = await cli(env, "sync-contacts")
    assert synced.returncode == 0, synced.stderr
    assert f"group {group_id}: 2,500 / 2,500 (100%)" in synced.stderr
    assert f"group_{group_id}_contacts 2500" in synced.stdout

    imported = await cli(env, "import-templates")
    assert imported.returncode == 0, imported.stderr
    assert "templates: done" in imported.stdout
    assert await asyncio.to_thread(consume, kafka_bootstrap, topics.templates, expected=1)

    campaign = f"cli-{uuid.uuid4().hex[:6]}"
    published = await cli(
        env,
        "publish-sample",
        "--template-id",
        str(template_id),
        "--campaign",
        campaign,
        "--customers",
        "25",
        "--batch-size",
        "10",
    )
    assert published.returncode == 0, published.stderr
    key = published.stdout.strip()
    assert key == f"1:{campaign}:505"
    records = await asyncio.to_thread(consume, kafka_bootstrap, topics.input, expected=4)
    assert [REGISTRY.decode(r.value()).name for r in records] == [
        "CampaignScheduled",
        "CampaignRecipients",
        "CampaignRecipients",
        "CampaignRecipients",
    ]

    missing = await cli(env, "campaign-status", key)
    assert missing.returncode == 1
    assert f"no campaign {key}" in missing.stderr
    listing = await cli(env, "campaigns")
    assert listing.returncode == 0


@pytest.mark.integration
async def test_campaign_status_shows_a_campaign_without_its_text(
    kafka_bootstrap: str,
    redis_url: str,
    key_prefix: str,
    new_topic: Callable[..., str],
    sandbox: SandboxHandle,
) -> None:
    """campaign-status prints state and counts as JSON, and never the SMS text."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with workflow_rig(sandbox, client, key_prefix, contacts=50) as rig:
            ref = new_ref()
            await rig.submit(ref, customer_ids(1, 20))
            await rig.executor.run_until_idle()
            env = daemon_environment(
                kafka_bootstrap=kafka_bootstrap,
                redis_url=redis_url,
                key_prefix=key_prefix,
                topics=DaemonTopics("i", "s", "m", "t", "d", "o"),
                sandbox=sandbox,
                group_id=rig.group.group_id,
                http_port=free_port(),
            )
            shown = await cli(env, "campaign-status", ref.key, "--json")
    finally:
        await client.aclose()
    assert shown.returncode == 0, shown.stderr
    fields = json.loads(shown.stdout)
    assert fields["state"] == "SENT"
    assert fields["matched"] == "20"
    assert "message" not in fields
    assert "SAVE10" not in shown.stdout
