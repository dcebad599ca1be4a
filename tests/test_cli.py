"""The command line as an operator uses it: real processes against Kafka, Redis and the sandbox."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.daemon import CONSOLE_SCRIPT, DaemonTopics, daemon_environment, free_port
from tests.helpers import REGISTRY, consume, new_ref
from tests.rigs import customer_ids, workflow_rig
from textlocal_sandbox import SandboxHandle


async def cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [CONSOLE_SCRIPT, *args],
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
    )


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

    checked = await cli(env, "check")
    assert checked.returncode == 0, checked.stderr
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
                topics=DaemonTopics("i", "s", "m", "t", "d"),
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
