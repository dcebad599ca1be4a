"""`textlocal-consumer`: run the daemon, and the operator's commands around it.

    textlocal-consumer run                     the daemon (roles from TEXTLOCAL_CONSUMER_ROLES)
    textlocal-consumer check                   settings, Redis persistence, Kafka, TextLocal login
    textlocal-consumer settings                every setting, its variable and default
    textlocal-consumer sync-contacts           rebuild the contact index now (with progress)
    textlocal-consumer import-templates        import and publish the template catalog now
    textlocal-consumer import-optouts          publish TextLocal's new opt-outs now
    textlocal-consumer campaigns               recent campaigns and their states
    textlocal-consumer campaign-status KEY     one campaign in detail ("tenant:campaign:channel")
    textlocal-consumer reindex-campaigns       file every listed campaign under its state again
    textlocal-consumer publish-sample          publish a sample campaign to the input topic

Settings come from TEXTLOCAL_CONSUMER_* variables and/or a YAML file (--config or
TEXTLOCAL_CONSUMER_CONFIG_FILE); an unknown TEXTLOCAL_CONSUMER_* variable is reported (a warning
at start, a line of `check`) with the nearest setting. `python -m consumer` is the same command.
Exit status: 0 success, 1 failure, 2 bad settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from consumer import __version__
from consumer.app import build_parts, daily_jobs, run_daemon
from consumer.campaign_record import CampaignSnapshot
from consumer.codec import SchemaRegistry
from consumer.config import Settings, describe_settings, load_settings, unknown_variables
from consumer.errors import ConfigError, ConsumerError
from consumer.events import CampaignRecipients, CampaignRef, CampaignScheduled
from consumer.fault_points import fault_points_from_env
from consumer.kafka_io import KafkaPublisher
from consumer.logs import configure_logging, log_event
from consumer.outbox import OutboxPublisher
from consumer.progress import ProgressLine

EXIT_OK, EXIT_FAILED, EXIT_BAD_SETTINGS = 0, 1, 2

log = logging.getLogger("consumer.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textlocal-consumer",
        description="Optimove → TextLocal SMS campaigns over Kafka. Settings: environment "
        "variables TEXTLOCAL_CONSUMER_* and/or a YAML file; `textlocal-consumer settings` lists "
        "them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config", type=Path, help="YAML settings file (default: $TEXTLOCAL_CONSUMER_CONFIG_FILE)"
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", help="what to do (default: run)"
    )
    run = commands.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    run.add_argument(
        "--roles",
        help="comma-separated roles to run here: intake, executor, poller, daily "
        "(default: $TEXTLOCAL_CONSUMER_ROLES, else all)",
    )
    commands.add_parser("check", help="validate settings and reach Redis, Kafka and TextLocal")
    commands.add_parser("settings", help="list every setting with its variable and default")
    commands.add_parser("sync-contacts", help="rebuild the contact index of every group now")
    commands.add_parser("import-templates", help="import and publish TextLocal's templates now")
    commands.add_parser(
        "import-optouts", help="publish the opt-outs added at TextLocal since the last import now"
    )
    listing = commands.add_parser("campaigns", help="recent campaigns and their states")
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    status = commands.add_parser("campaign-status", help="one campaign's state and counts")
    status.add_argument("key", help='campaign key "tenant:campaign:channel", e.g. 42:2.38:505')
    status.add_argument("--json", action="store_true", help="print JSON")
    commands.add_parser(
        "reindex-campaigns",
        help="file every campaign of the index under its state again, dropping expired ones "
        "(after a rolling upgrade from a version without per-state sets; safe while running)",
    )
    sample = commands.add_parser(
        "publish-sample", help="publish a sample campaign (header + recipient batches)"
    )
    sample.add_argument("--tenant", type=int, default=1, help="Optimove tenant id (default 1)")
    sample.add_argument("--campaign", default=None, help="campaign id (default: random)")
    sample.add_argument(
        "--channel", type=int, default=505, help="Optimove channel id (default 505)"
    )
    sample.add_argument("--template-id", type=int, required=True, help="TextLocal template id")
    sample.add_argument(
        "--template-name",
        default="OPT_Promo",
        help="its name; the prefix picks the contact group (default OPT_Promo)",
    )
    sample.add_argument(
        "--customers", type=int, default=100, help="how many customers, C00001.. (default 100)"
    )
    sample.add_argument(
        "--id-width", type=int, default=5, help="digits in customer ids (default 5)"
    )
    sample.add_argument(
        "--batch-size",
        type=int,
        default=10_000,
        help="customers per CampaignRecipients record (default 10000, the most allowed)",
    )
    sample.add_argument(
        "--in-minutes", type=float, default=0.0, help="send time, minutes from now (default 0)"
    )
    sample.add_argument(
        "--promo-code",
        default="DEMO20",
        help='campaign promo code for [%%PROMO_CODE%%] (default DEMO20; "" for none)',
    )
    sample.add_argument(
        "--window-days",
        type=int,
        default=None,
        help="days of delivery polls (default: the daemon's workflow.metrics_window_days)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    if command == "settings":
        print(describe_settings())
        return EXIT_OK
    environ = dict(os.environ)
    if getattr(args, "roles", None):
        environ["TEXTLOCAL_CONSUMER_ROLES"] = args.roles
    try:
        settings = load_settings(environ, args.config)
    except ConfigError as exc:
        print(f"textlocal-consumer: bad setting: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    configure_logging(settings.log_format, settings.log_level)
    for unknown in unknown_variables(environ):
        log_event(
            log,
            "config.unknown_variable",
            logging.WARNING,
            variable=unknown.name,
            did_you_mean=unknown.nearest,
        )
    try:
        if command == "run":
            return asyncio.run(run_daemon(settings, fault_points_from_env(os.environ)))
        return asyncio.run(_COMMANDS[command](settings, args))
    except ConfigError as exc:
        print(f"textlocal-consumer: bad setting: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    except ConsumerError as exc:
        print(f"textlocal-consumer {command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


async def _check(settings: Settings, _args: argparse.Namespace) -> int:
    unknown = unknown_variables(os.environ)
    if unknown:
        print(f"Settings   ok, {len(unknown)} unknown variable{'s' if len(unknown) > 1 else ''}:")
        for variable in unknown:
            print(f"  warning: {variable}")
    else:
        print("Settings   ok")
    parts = await build_parts(settings)  # refuses a Redis without persistence unless allowed
    try:
        balance = await parts.client.balance()
        persistent = await parts.store.check_persistence(allow_without=True)
        print(f"Redis      ok ({'AOF on' if persistent else 'NO persistence'})")
        print(f"Kafka      ok ({settings.kafka.bootstrap_servers})")
        print(f"TextLocal  ok (balance {balance.sms:g} SMS credits)")
        for group in settings.contact_groups:
            size = await parts.index.size(group.group_id)
            print(f"group {group.group_id} ({group.template_prefix or 'any'}): {size} indexed")
    finally:
        await parts.close()
    return EXIT_OK


async def _sync_contacts(settings: Settings, _args: argparse.Namespace) -> int:
    return await _run_daily_job(settings, "contacts")


async def _import_templates(settings: Settings, _args: argparse.Namespace) -> int:
    return await _run_daily_job(settings, "templates")


async def _import_optouts(settings: Settings, _args: argparse.Namespace) -> int:
    return await _run_daily_job(settings, "optouts")


async def _run_daily_job(settings: Settings, job: str) -> int:
    """Run a daily job now, through its lock (never beside a scheduled run), showing progress."""
    parts = await build_parts(settings)
    lines: dict[str, ProgressLine] = {}

    def show(stage: str, done: int, total: int) -> None:
        lines.setdefault(stage, ProgressLine(stage))(done, total)

    try:
        outcome = await daily_jobs(parts).run_job(job, force=True, progress=show)
        published = await OutboxPublisher(
            parts.store,
            parts.publisher,
            settings.kafka.output_topics(),
            parts.metrics,
            parts.clock,
            parts.owner,
        ).publish_once()
    finally:
        await parts.close()
    summary = ", ".join(f"{name} {value}" for name, value in outcome.summary.items())
    print(f"{job}: {outcome.reason} in {outcome.duration_s:.1f}s ({summary})")
    if published is None:
        print("events: the running daemon publishes them")
    else:
        print(f"events: {published} published")
    if not outcome.ok:
        print(f"{job}: {outcome.detail}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


async def _campaigns(settings: Settings, args: argparse.Namespace) -> int:
    parts = await build_parts(settings)
    try:
        for key in await parts.store.campaign_keys(args.limit):
            snapshot = await parts.store.load(key)
            if snapshot is not None:
                print(f"{key:<32} {snapshot.state.value:<16} {snapshot.error_code}")
        counts = await parts.store.campaign_counts()
        print(
            "by state: "
            + ", ".join(f"{state.value} {n}" for state, n in sorted(counts.items()) if n)
        )
    finally:
        await parts.close()
    return EXIT_OK


async def _campaign_status(settings: Settings, args: argparse.Namespace) -> int:
    parts = await build_parts(settings)
    try:
        snapshot = await parts.store.load(args.key)
    finally:
        await parts.close()
    if snapshot is None:
        print(f"no campaign {args.key}", file=sys.stderr)
        return EXIT_FAILED
    shown = {
        name: value
        for name, value in sorted(snapshot.fields.items())
        # SMS texts stay out of terminals and logs.
        if name not in {CampaignSnapshot.message.name, CampaignSnapshot.planned_message.name}
    }
    if args.json:
        print(json.dumps({"key": args.key, **shown}, indent=2))
    else:
        print(f"campaign {args.key}: {snapshot.state.value}")
        for name, value in shown.items():
            print(f"  {name:<20} {value}")
    return EXIT_OK


async def _reindex_campaigns(settings: Settings, _args: argparse.Namespace) -> int:
    parts = await build_parts(settings)
    try:
        dropped = await parts.store.index_campaign_states()
        counts = await parts.store.campaign_counts()
    finally:
        await parts.close()
    print(f"campaigns filed by state; {dropped} whose retention had ended left the index")
    print(
        "by state: " + ", ".join(f"{state.value} {n}" for state, n in sorted(counts.items()) if n)
    )
    return EXIT_OK


async def _publish_sample(settings: Settings, args: argparse.Namespace) -> int:
    registry = SchemaRegistry.from_directory()
    ref = CampaignRef(args.tenant, args.campaign or f"{uuid.uuid4().int % 10_000}.1", args.channel)
    now = datetime.now(UTC)
    ids = [f"C{i:0{args.id_width}d}" for i in range(1, args.customers + 1)]
    batches = [ids[i : i + args.batch_size] for i in range(0, len(ids), args.batch_size)]
    header = CampaignScheduled(
        event_id=str(uuid.uuid4()),
        occurred_at=now,
        ref=ref,
        template_id=args.template_id,
        template_name=args.template_name,
        scheduled_at=now + timedelta(minutes=args.in_minutes),
        message_type="SMS",
        recipient_count=len(ids),
        batch_count=len(batches),
        promo_codes=(args.promo_code,) if args.promo_code else (),
        metrics_window_days=args.window_days,
        metadata={"source": "publish-sample"},
    )
    records: list[tuple[str, bytes | str | None, bytes | None, Sequence[tuple[str, bytes]]]] = [
        (
            settings.kafka.input_topic,
            ref.key,
            registry.encode("CampaignScheduled", header.to_fields()),
            (),
        )
    ]
    for index, batch in enumerate(batches):
        event = CampaignRecipients(str(uuid.uuid4()), now, ref, index, tuple(batch))
        records.append(
            (
                settings.kafka.input_topic,
                ref.key,
                registry.encode("CampaignRecipients", event.to_fields()),
                (),
            )
        )
    publisher = KafkaPublisher(settings.kafka.client_config(), settings.kafka.max_record_bytes)
    try:
        await publisher.publish_many(records)
    finally:
        await publisher.close()
    print(ref.key)
    logging.getLogger("consumer.cli").info(
        "sample.published", extra={"campaign": ref.key, "batches": len(batches)}
    )
    return EXIT_OK


_COMMANDS = {
    "check": _check,
    "sync-contacts": _sync_contacts,
    "import-templates": _import_templates,
    "import-optouts": _import_optouts,
    "campaigns": _campaigns,
    "campaign-status": _campaign_status,
    "reindex-campaigns": _reindex_campaigns,
    "publish-sample": _publish_sample,
}


if __name__ == "__main__":
    sys.exit(main())
