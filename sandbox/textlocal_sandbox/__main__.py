"""`textlocal-sandbox --port 8080 --api-key KEY` (or `python -m textlocal_sandbox ...`): serve the
TextLocal sandbox.

Logs one line with its URL (never the key) and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from textlocal_sandbox.config import SandboxConfig
from textlocal_sandbox.delivery import DeliveryMix, DeliveryModel
from textlocal_sandbox.server import running_sandbox

_log = logging.getLogger("textlocal_sandbox")
API_KEY_ENV = "TEXTLOCAL_SANDBOX_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textlocal-sandbox",
        description="A local imitation of TextLocal's SMS API (assumptions: ASSUMPTIONS.md in"
        " the textlocal_sandbox package). Admin API for tests and demos under /_sandbox/.",
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port (0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"the API key clients must send (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--username", default=SandboxConfig.username, help="account username")
    parser.add_argument("--password", default=None, help="accept username + this password")
    parser.add_argument("--hash", dest="login_hash", default=None, help="accept username + hash")
    parser.add_argument(
        "--seed-demo",
        action="store_true",
        help='add the demo data: group "Optimove customers" (1,000 contacts) and OPT_ templates',
    )
    parser.add_argument(
        "--balance", type=int, default=SandboxConfig.balance_sms, help="SMS credits at start"
    )
    parser.add_argument(
        "--mms-balance", type=int, default=SandboxConfig.balance_mms, help="MMS credits at start"
    )
    parser.add_argument(
        "--default-sender", default=SandboxConfig.default_sender, help="account's sender name"
    )
    parser.add_argument(
        "--settle-delay-s",
        type=float,
        default=DeliveryModel.settle_delay_s,
        help="seconds (sandbox clock) before a message's status settles (default 60)",
    )
    parser.add_argument(
        "--settle-spread",
        type=float,
        default=DeliveryModel.settle_spread,
        help="extra delay, as a fraction of --settle-delay-s, spread over numbers (default 1)",
    )
    parser.add_argument(
        "--delivery-mix",
        default="90,4,2,2,2",
        help="percent delivered,undelivered,invalid,expired,unknown by the numbers' last two"
        " digits (default 90,4,2,2,2)",
    )
    parser.add_argument(
        "--money-as-float",
        action="store_true",
        help="answer balance/cost as floats, as after the Webex Interact migration",
    )
    parser.add_argument(
        "--no-group-messages",
        action="store_true",
        help="leave `messages` empty in group-send replies (default: one entry per recipient)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    shares = [int(part) for part in str(args.delivery_mix).split(",")]
    if len(shares) != 5:
        raise ValueError("--delivery-mix needs five percentages")
    delivery = DeliveryModel(
        mix=DeliveryMix(*shares),
        settle_delay_s=args.settle_delay_s,
        settle_spread=args.settle_spread,
    )
    return SandboxConfig(
        balance_sms=args.balance,
        balance_mms=args.mms_balance,
        username=args.username,
        password=args.password,
        login_hash=args.login_hash,
        default_sender=args.default_sender,
        sender_names=(args.default_sender,),
        delivery=delivery,
        list_group_messages=not args.no_group_messages,
        money_as_float=args.money_as_float,
        seed_demo=args.seed_demo,
    )


async def serve(api_key: str, host: str, port: int, config: SandboxConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running_sandbox(api_key, host=host, port=port, config=config) as handle:
        _log.info("sandbox.started url=%s admin=%s_sandbox/", handle.url, handle.url)
        await stop.wait()
    _log.info("sandbox.stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error(f"--api-key (or ${API_KEY_ENV}) is required")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s")
    asyncio.run(serve(args.api_key, args.host, args.port, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
