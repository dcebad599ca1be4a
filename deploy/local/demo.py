#!/usr/bin/env python3
"""`make run`: the daemon's main job on the local default, with a sample campaign flowing through.

1. starts the TextLocal sandbox (seeded: group "Optimove customers", 1,000 contacts, OPT_ templates)
2. starts the daemon (`textlocal-consumer run`, every role) against the local Kafka and Redis
3. publishes a sample campaign (header + recipients) to the input topic
4. prints the campaign's status events and delivery metrics as they arrive on Kafka

Ctrl-C (or SIGTERM, SIGHUP: a closed terminal, `timeout make run`) stops everything gracefully
(SIGTERM to the daemon, which drains and commits, then to the sandbox). With
`--exit-when-final` it stops by itself after the campaign's last delivery poll (a few minutes:
the demo polls every 20 s over a 2-minute window instead of daily for a week).
The local stack (Kafka, Redis) must be up: `make run` starts it first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

from consumer.codec import SchemaRegistry

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / ".cache" / "demo"
SANDBOX_PORT = int(os.environ.get("DEMO_SANDBOX_PORT", "18080"))
DAEMON_HTTP_PORT = int(os.environ.get("DEMO_HTTP_PORT", "19108"))
API_KEY = "local-demo-key"  # the sandbox's, not a real TextLocal key
BIN = Path(sys.executable).parent


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def wait_for_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"[demo] {url} did not answer within {timeout_s:.0f}s")


def sandbox_json(path: str, form: dict[str, str] | None = None) -> Any:
    url = f"http://127.0.0.1:{SANDBOX_PORT}{path}"
    data = None if form is None else urllib.parse.urlencode(form).encode()
    with urllib.request.urlopen(url, data=data, timeout=10) as response:
        return json.load(response)


def start(command: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_file = open(WORK / log_name, "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)


def stop(process: subprocess.Popen[bytes], name: str, timeout_s: float = 40.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout_s)
        say(f"{name} stopped (exit {code})")
    except subprocess.TimeoutExpired:
        process.kill()
        say(f"{name} did not stop in {timeout_s:.0f}s; killed")


def daemon_environment(group_id: int) -> dict[str, str]:
    stack = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in subprocess.run(
            [sys.executable, str(REPO / "deploy" / "local" / "stack.py"), "env"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    }
    groups = [
        {
            "id": group_id,
            "name": "Optimove customers",
            "template_prefix": "OPT_",
            "customer_id_field": "custom1",
            "sender": "ShopCo",
        }
    ]
    return {
        **os.environ,
        "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": stack["KAFKA_BOOTSTRAP_SERVERS"],
        "TEXTLOCAL_CONSUMER_KAFKA_CREATE_TOPICS": "true",
        "TEXTLOCAL_CONSUMER_REDIS_URL": stack["REDIS_URL"],
        "TEXTLOCAL_CONSUMER_REDIS_KEY_PREFIX": "demo:",
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_URL": f"http://127.0.0.1:{SANDBOX_PORT}/",
        "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": API_KEY,
        "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": json.dumps(groups),
        "TEXTLOCAL_CONSUMER_WORKFLOW_POLL_INTERVAL_S": "20",
        "TEXTLOCAL_CONSUMER_WORKFLOW_METRICS_WINDOW_DAYS": str(120 / 86400),
        "TEXTLOCAL_CONSUMER_HTTP_PORT": str(DAEMON_HTTP_PORT),
        "TEXTLOCAL_CONSUMER_LOG_FORMAT": "json",
        "TEXTLOCAL_CONSUMER_INSTANCE_ID": "demo",
    }


def describe(name: str, fields: dict[str, Any]) -> str:
    if name == "CampaignStatus":
        counts = fields["counts"]
        line = (
            f"status {fields['status']:<15} requested={counts['requested']} "
            f"matched={counts['matched']} unmatched={counts['unmatched']} "
            f"invalid_numbers={counts['invalid_numbers']} duplicates={counts['duplicates']}"
        )
        if fields["batch_id"] is not None:
            line += f" batch={fields['batch_id']} cost={fields['cost_credits']}"
        if fields["error"]:
            line += f" error={fields['error']['code']}"
        return line
    return (
        f"metrics poll {fields['poll_number']}{' (final)' if fields['is_final'] else ''}: "
        f"delivered={fields['delivered']} pending={fields['pending']} "
        f"undelivered={fields['undelivered']} invalid={fields['invalid']} "
        f"expired={fields['expired']} unknown={fields['unknown']} "
        f"rate={fields['delivery_rate']:.0%}"
    )


def follow(env: dict[str, str], campaign_key: str, exit_when_final: bool) -> None:
    registry = SchemaRegistry.from_directory()
    consumer = Consumer(
        {
            "bootstrap.servers": env["TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS"],
            "group.id": f"demo-follower-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(["textlocal.sms.campaign-status.v1", "textlocal.sms.delivery-metrics.v1"])
    say("waiting for the campaign's events (Ctrl-C to stop) ...")
    try:
        while True:
            for message in consumer.consume(100, 1.0):
                if message.error() is not None or message.key() != campaign_key.encode():
                    continue
                decoded = registry.decode(message.value() or b"")
                say(describe(decoded.name, decoded.fields))
                if exit_when_final and decoded.fields.get("is_final"):
                    return
    finally:
        consumer.close()


def stop_as_on_ctrl_c(signum: int, _frame: object) -> None:
    """SIGTERM and SIGHUP stop the demo as Ctrl-C does: their default would end this process
    at once and leave the sandbox and the daemon running."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop_as_on_ctrl_c)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--exit-when-final",
        action="store_true",
        help="stop after the campaign's final delivery poll",
    )
    parser.add_argument("--customers", type=int, default=1000)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    say(f"logs: {WORK}/sandbox.log and {WORK}/daemon.log")
    # The demo's 1,000 numbers fall in the first tenth of the sandbox's settle-delay spread:
    # 10 s + up to 100 × 10 s × 0.09 makes their results arrive over the first ~100 s.
    sandbox = start(
        [
            str(BIN / "python"),
            "-m",
            "textlocal_sandbox",
            "--port",
            str(SANDBOX_PORT),
            "--api-key",
            API_KEY,
            "--seed-demo",
            "--settle-delay-s",
            "10",
            "--settle-spread",
            "100",
        ],
        "sandbox.log",
        dict(os.environ),
    )
    daemon: subprocess.Popen[bytes] | None = None
    try:
        wait_for_http(f"http://127.0.0.1:{SANDBOX_PORT}/_sandbox/clock")
        groups = sandbox_json("/_sandbox/groups")["groups"]
        group_id = next(g["id"] for g in groups if g["name"] == "Optimove customers")
        templates = sandbox_json("/get_templates/", {"apikey": API_KEY})["templates"]
        promo = next(t for t in templates if t["title"] == "OPT_Promo")
        say(f"sandbox up on :{SANDBOX_PORT} (group {group_id}, template OPT_Promo = {promo['id']})")
        env = daemon_environment(int(group_id))
        daemon = start([str(BIN / "textlocal-consumer"), "run"], "daemon.log", env)
        wait_for_http(f"http://127.0.0.1:{DAEMON_HTTP_PORT}/readyz", timeout_s=60)
        say(f"daemon ready (metrics: http://127.0.0.1:{DAEMON_HTTP_PORT}/metrics)")
        key = subprocess.run(
            [
                str(BIN / "textlocal-consumer"),
                "publish-sample",
                "--template-id",
                str(promo["id"]),
                "--template-name",
                "OPT_Promo",
                "--customers",
                str(args.customers),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        say(f"published sample campaign {key} ({args.customers} customers)")
        follow(env, key, args.exit_when_final)
    except KeyboardInterrupt:
        say("stopping ...")
    finally:
        if daemon is not None:
            stop(daemon, "daemon")
        stop(sandbox, "sandbox")
    return 0


if __name__ == "__main__":
    sys.exit(main())
