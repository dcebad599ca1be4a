#!/usr/bin/env python3
"""The local development stack without Docker: an Apache Kafka broker (KRaft) and Redis (AOF).

    python deploy/local/stack.py up        # fetch jars once, format storage once, start, wait
    python deploy/local/stack.py down      # stop both; nothing is left running
    python deploy/local/stack.py status    # what runs where
    python deploy/local/stack.py env       # KAFKA_BOOTSTRAP_SERVERS=... REDIS_URL=... for a shell

`up` is idempotent: services that already answer are left alone. Ports and the data folder come
from the environment (STACK_KAFKA_PORT, STACK_KAFKA_CONTROLLER_PORT, STACK_REDIS_PORT, STACK_DIR),
so several stacks can live side by side. Only the standard library is used: this runs before and
outside the product's virtualenv.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KAFKA_DIR = Path(__file__).resolve().parent / "kafka"
KAFKA_VERSION = "4.1.1"  # keep in step with deploy/local/kafka/pom.xml
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class StackLayout:
    """Where the stack's pieces live and listen."""

    data_dir: Path
    jars_dir: Path
    kafka_port: int
    controller_port: int
    redis_port: int

    @classmethod
    def from_env(cls) -> StackLayout:
        data_dir = Path(os.environ.get("STACK_DIR", REPO / ".cache" / "stack")).resolve()
        jars_dir = Path(
            os.environ.get("STACK_KAFKA_JARS", REPO / ".cache" / f"kafka-{KAFKA_VERSION}" / "libs")
        ).resolve()
        return cls(
            data_dir=data_dir,
            jars_dir=jars_dir,
            kafka_port=int(os.environ.get("STACK_KAFKA_PORT", "19092")),
            controller_port=int(os.environ.get("STACK_KAFKA_CONTROLLER_PORT", "19093")),
            redis_port=int(os.environ.get("STACK_REDIS_PORT", "16379")),
        )

    @property
    def kafka_dir(self) -> Path:
        return self.data_dir / "kafka"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"


def say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def read_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def stop_pid(name: str, pid_file: Path) -> None:
    pid = read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return
    say(f"stopping {name} (pid {pid})")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if read_pid(pid_file) is None:
            break
        time.sleep(0.2)
    else:
        say(f"{name} did not stop within {STOP_TIMEOUT_S:.0f}s; killing it")
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


# --- Kafka ---------------------------------------------------------------------------------


def fetch_kafka_jars(layout: StackLayout) -> None:
    """Copy Kafka's jars (and a logging binding) from Maven Central into the cached folder."""
    done_marker = layout.jars_dir / ".complete"
    if done_marker.exists():
        return
    if shutil.which("mvn") is None:
        sys.exit("[stack] Maven (mvn) is needed once to fetch Kafka's jars; install it first")
    say(f"fetching Apache Kafka {KAFKA_VERSION} jars from Maven Central into {layout.jars_dir}")
    started = time.monotonic()
    layout.jars_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(KAFKA_DIR / "pom.xml"),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={layout.jars_dir}",
        ],
        check=True,
    )
    done_marker.touch()
    say(f"jars ready in {time.monotonic() - started:.1f}s")


def java_binary() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        sys.exit("[stack] Java 17 or newer is needed to run the Kafka broker")
    return found


def kafka_properties(layout: StackLayout) -> str:
    listeners = (
        f"PLAINTEXT://127.0.0.1:{layout.kafka_port},CONTROLLER://127.0.0.1:{layout.controller_port}"
    )
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{layout.controller_port}",
        "listeners": listeners,
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{layout.kafka_port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(layout.kafka_dir / "data"),
        "num.partitions": "3",
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "log.segment.bytes": str(64 * 1024 * 1024),
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def java_command(layout: StackLayout, main_class: str, *args: str) -> list[str]:
    return [
        java_binary(),
        "-Xms256m",
        "-Xmx768m",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dkafka.logs.dir={layout.kafka_dir}",
        f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.properties'}",
        "-cp",
        f"{layout.jars_dir}/*",
        main_class,
        *args,
    ]


def format_kafka_storage(layout: StackLayout, properties: Path) -> None:
    """Format the KRaft log folder once; the cluster id must be 16 random bytes in base64url."""
    if (layout.kafka_dir / "data" / "meta.properties").exists():
        return
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    say(f"formatting Kafka storage (cluster {cluster_id})")
    subprocess.run(
        java_command(
            layout,
            "kafka.tools.StorageTool",
            "format",
            "-c",
            str(properties),
            "-t",
            cluster_id,
            "--ignore-formatted",
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )


def kafka_answers(layout: StackLayout) -> bool:
    """True when a client can read cluster metadata (listing topics), not merely open the port."""
    if not port_open(layout.kafka_port):
        return False
    try:
        from confluent_kafka.admin import AdminClient
    except ImportError:  # outside the virtualenv: an open port is the best we can tell
        return True
    admin = AdminClient({"bootstrap.servers": layout.bootstrap_servers, "log_level": 0})
    try:
        admin.list_topics(timeout=2)
    except Exception:  # noqa: BLE001 - any failure here means "not ready yet"
        return False
    return True


def start_kafka(layout: StackLayout) -> None:
    pid_file = layout.kafka_dir / "kafka.pid"
    if read_pid(pid_file) is not None and kafka_answers(layout):
        say(f"Kafka already running on {layout.bootstrap_servers}")
        return
    if port_open(layout.kafka_port):
        sys.exit(
            f"[stack] port {layout.kafka_port} is taken by something else; set STACK_KAFKA_PORT"
        )
    fetch_kafka_jars(layout)
    layout.kafka_dir.mkdir(parents=True, exist_ok=True)
    properties = layout.kafka_dir / "server.properties"
    properties.write_text(kafka_properties(layout))
    format_kafka_storage(layout, properties)
    say(f"starting Kafka {KAFKA_VERSION} on {layout.bootstrap_servers}")
    started = time.monotonic()
    with open(layout.kafka_dir / "stdout.log", "ab") as out:
        process = subprocess.Popen(
            java_command(layout, "kafka.Kafka", str(properties)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `make`; `stack.py down` stops it
        )
    pid_file.write_text(str(process.pid))
    deadline = started + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"[stack] Kafka exited with {process.returncode}; see {layout.kafka_dir}")
        if kafka_answers(layout):
            say(f"Kafka ready in {time.monotonic() - started:.1f}s")
            return
        time.sleep(0.5)
    sys.exit(f"[stack] Kafka did not answer within {START_TIMEOUT_S:.0f}s; see {layout.kafka_dir}")


# --- Redis ---------------------------------------------------------------------------------


def redis_answers(port: int) -> bool:
    if not port_open(port):
        return False
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def start_redis(layout: StackLayout) -> None:
    pid_file = layout.redis_dir / "redis.pid"
    if read_pid(pid_file) is not None and redis_answers(layout.redis_port):
        say(f"Redis already running on {layout.redis_url}")
        return
    if port_open(layout.redis_port):
        sys.exit(
            f"[stack] port {layout.redis_port} is taken by something else; set STACK_REDIS_PORT"
        )
    server = shutil.which("redis-server")
    if server is None:
        sys.exit(
            "[stack] redis-server is missing: apt-get install -y redis-server (or `make deps`)"
        )
    layout.redis_dir.mkdir(parents=True, exist_ok=True)
    say(f"starting Redis on {layout.redis_url} (AOF on)")
    subprocess.run(
        [
            server,
            "--port",
            str(layout.redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(layout.redis_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "yes",
            "--pidfile",
            str(pid_file),
            "--logfile",
            str(layout.redis_dir / "redis.log"),
        ],
        check=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if redis_answers(layout.redis_port):
            say("Redis ready")
            return
        time.sleep(0.1)
    sys.exit(f"[stack] Redis did not answer; see {layout.redis_dir / 'redis.log'}")


# --- commands ------------------------------------------------------------------------------


def up(layout: StackLayout) -> None:
    start_redis(layout)
    start_kafka(layout)
    print_env(layout)


def down(layout: StackLayout) -> None:
    stop_pid("Kafka", layout.kafka_dir / "kafka.pid")
    stop_pid("Redis", layout.redis_dir / "redis.pid")
    say("stack stopped")


def status(layout: StackLayout) -> int:
    kafka_ok = kafka_answers(layout)
    redis_ok = redis_answers(layout.redis_port)
    say(f"Kafka {layout.bootstrap_servers}: {'up' if kafka_ok else 'down'}")
    say(f"Redis {layout.redis_url}: {'up' if redis_ok else 'down'}")
    return 0 if kafka_ok and redis_ok else 1


def print_env(layout: StackLayout) -> None:
    print(f"KAFKA_BOOTSTRAP_SERVERS={layout.bootstrap_servers}")
    print(f"REDIS_URL={layout.redis_url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Local Kafka broker (KRaft, from Maven Central jars) and Redis (AOF) for "
        "development and tests. Ports and folder: STACK_KAFKA_PORT (19092), "
        "STACK_KAFKA_CONTROLLER_PORT (19093), STACK_REDIS_PORT (16379), STACK_DIR (.cache/stack).",
    )
    parser.add_argument("command", choices=["up", "down", "status", "env", "fetch"])
    args = parser.parse_args(argv)
    layout = StackLayout.from_env()
    if args.command == "up":
        up(layout)
    elif args.command == "down":
        down(layout)
    elif args.command == "status":
        return status(layout)
    elif args.command == "env":
        print_env(layout)
    elif args.command == "fetch":
        fetch_kafka_jars(layout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
