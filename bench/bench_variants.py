#!/usr/bin/env python3
"""Benchmark: 1,000,000-recipient campaigns of per-recipient content, through the real daemon.

Two scenarios, each with its own sandbox process and daemon (so each peak RSS is its own):

- `languages` — one campaign-level promo code, the contacts in three languages (the language in
  custom2; ~50% none → the default `OPT_Promo`, ~30% `fr`, ~20% `de`, interleaved in the
  campaign): three group texts. Calls expected: 3 create_group + Σ⌈nᵢ / 1,500⌉
  create_contacts_bulk + 1 balance + 3 send.
- `codes` — every customer with a promo code of their own, all distinct (far more than
  `workflow.max_group_texts`): personal texts sent by `bulk_json`. Calls expected:
  ⌈matched / chunk⌉ bulk_json + 1 balance, the chunk being `--chunk`, set as
  TEXTLOCAL_CONSUMER_WORKFLOW_BULK_CHUNK_SIZE (default here 5,000: 199 calls; the daemon's own
  default is 1,000; 10,000 measured the same).

Each prints the TextLocal calls the sandbox counted next to the expected ones; the daemon's peak
RSS (VmHWM) — target ≤ 300 MB; and the wall time from the first event published (by a producer
warmed up beforehand) to the campaign recorded SENT next to a floor: a plain aiohttp script
making the same calls with the same payloads at the same concurrency against the same sandbox
(payloads prepared beforehand), run before and after the daemon in the same run — target ≤ 1.5 ×
the floor. 0.5% of the targeted ids are unknown to the master group, as in bench_campaign.py.
For reading the figures (not targets): the part from READY to SENT (the floor has nothing like
intake: publishing and recording a million ids is in the daemon's time only), the CPU of the
daemon, the sandbox and Redis per state, and the Redis memory of the personal chunks the daemon
keeps between loading and sending.

Needs the local stack (`make stack-up`); `make bench` runs it. Uses its own topics (deleted at
the end), Redis key prefix (deleted) and sandbox processes. `--daemon-code DIR` runs the daemon
from another checkout (for before/after comparisons); `--profile` runs it under cProfile
(stats in .cache/bench/variants-<scenario>.prof).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from confluent_kafka import Producer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from any directory

from bench.common import delete_prefix, delete_topics_and_groups, free_port, wait_http  # noqa: E402
from consumer.codec import SchemaRegistry  # noqa: E402
from consumer.events import CampaignRecipients, CampaignRef, CampaignScheduled  # noqa: E402
from consumer.keys import RedisKeys  # noqa: E402
from consumer.store import as_text  # noqa: E402
from consumer.workflow import short_reference  # noqa: E402
from textlocal_sandbox import SandboxAdminClient  # noqa: E402

BATCH = 10_000  # customers per CampaignRecipients event
CONCURRENCY = 4  # TextLocal calls in flight: the daemon's default, and the floor's
FIRST_NUMBER = 447_000_000_000  # contact C<k> has number FIRST_NUMBER + k - 1
API_KEY = "bench-key"
MULTIPART_ABOVE_BYTES = 16 * 1024  # as consumer.textlocal's client
WORK = REPO / ".cache" / "bench"
# The three language blocks of the master group: (language, share of the contacts).
LANGUAGES = (("", 0.5), ("fr", 0.3), ("de", 0.2))
PROMO_BODIES = {
    "": "Big sale: use [%PROMO_CODE%] at Shop & Co today.",
    "fr": "Grandes soldes : [%PROMO_CODE%] chez Shop & Co aujourd'hui.",
    "de": "Großer Sale: [%PROMO_CODE%] bei Shop & Co, nur heute.",
}
CAMPAIGN_CODE = "BENCH"
CODE_BODY = "Your own code [%PROMO_CODE%] at Shop & Co, today only."


def stack_env() -> dict[str, str]:
    output = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "local" / "stack.py"), "env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def customer_id(k: int) -> str:
    return f"C{k:07d}"


def number_of(k: int) -> str:
    return str(FIRST_NUMBER + k - 1)


def own_code(k: int) -> str:
    return f"U{k:07d}X"


def proc_status_mb(pid: int, field_name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def redis_cpu_s(redis: aioredis.Redis) -> float:
    """The Redis server's user + system CPU seconds so far (its own INFO: works in a container)."""
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# --- what each scenario sends -------------------------------------------------------------


@dataclass
class Campaign:
    """A scenario's campaign: the ids in publishing order and what the floor must send."""

    name: str
    ids: list[str]  # in publishing order (unmatched ones included)
    own_codes: list[str] | None  # per id, or None
    template_title: str
    campaign_codes: tuple[str, ...]
    matched: int
    extra: int  # master-group contacts the campaign does not target
    # languages: per group text, the contacts (in campaign order) and the text sent to the group
    group_texts: list[tuple[str, list[int], str]] = field(default_factory=list)
    # codes: the (number, text) pairs in campaign order
    personal: list[tuple[str, str]] = field(default_factory=list)


def extra_contacts(recipients: int) -> int:
    """Master-group contacts no campaign targets: 1% (10,000 for a million recipients)."""
    return recipients // 100


def language_blocks(contacts: int) -> list[tuple[str, int, int]]:
    """(language, first k, last k) of each block of the master group."""
    blocks, start = [], 1
    for position, (language, share) in enumerate(LANGUAGES):
        end = contacts if position == len(LANGUAGES) - 1 else start + int(contacts * share) - 1
        blocks.append((language, start, end))
        start = end + 1
    return blocks


def languages_campaign(recipients: int) -> Campaign:
    unmatched = recipients // 200
    matched = recipients - unmatched
    blocks = language_blocks(matched + extra_contacts(recipients))
    # Each language's targeted contacts, spread evenly over the campaign (interleaved).
    keyed: list[tuple[float, int, int]] = []
    for block, (_, first, last) in enumerate(blocks):
        members = range(first, min(last, matched) + 1)
        keyed += [((i + 0.5) / len(members), block, k) for i, k in enumerate(members)]
    keyed.sort()
    ids = [customer_id(k) for _, _, k in keyed] + [f"NOBODY-{i}" for i in range(unmatched)]
    by_block: list[list[int]] = [[] for _ in blocks]
    for _, block, k in keyed:
        by_block[block].append(k)
    texts = sorted(  # the plan's order: by variant, the default ("") first
        (language, by_block[block], PROMO_BODIES[language].replace("[%PROMO_CODE%]", CAMPAIGN_CODE))
        for block, (language, _, _) in enumerate(blocks)
    )  # fmt: skip
    return Campaign(
        "languages",
        ids,
        None,
        "OPT_Promo",
        (CAMPAIGN_CODE,),
        matched,
        extra_contacts(recipients),
        group_texts=texts,
    )


def codes_campaign(recipients: int) -> Campaign:
    unmatched = recipients // 200
    matched = recipients - unmatched
    ks = range(1, matched + 1)
    ids = [customer_id(k) for k in ks] + [f"NOBODY-{i}" for i in range(unmatched)]
    codes = [own_code(k) for k in ks] + [f"N{i:07d}X" for i in range(unmatched)]
    personal = [(number_of(k), CODE_BODY.replace("[%PROMO_CODE%]", own_code(k))) for k in ks]
    return Campaign(
        "codes", ids, codes, "OPT_Code", (), matched, extra_contacts(recipients), personal=personal
    )


def expected_calls(campaign: Campaign, chunk: int) -> dict[str, int]:
    if campaign.group_texts:
        return {
            "create_group": len(campaign.group_texts),
            "create_contacts_bulk": sum(
                math.ceil(len(members) / 1500) for _, members, _ in campaign.group_texts
            ),
            "balance": 1,
            "send": len(campaign.group_texts),
        }
    return {"bulk_json": math.ceil(len(campaign.personal) / chunk), "balance": 1}


# --- the floor ----------------------------------------------------------------------------


def floor_payloads(campaign: Campaign, chunk: int, custom: str) -> list[list[str]]:
    """Per group text its contacts chunks (languages), or the bulk_json `data` texts (codes)."""
    if campaign.group_texts:
        groups = []
        for _, members, _ in campaign.group_texts:
            chunks = []
            for start in range(0, len(members), 1500):
                contacts = [
                    {
                        "number": number_of(k),
                        "first_name": "",
                        "last_name": "",
                        "custom1": customer_id(k),
                    }
                    for k in members[start : start + 1500]
                ]
                chunks.append(json.dumps(contacts, separators=(",", ":")))
            groups.append(chunks)
        return groups
    datas = []
    for start in range(0, len(campaign.personal), chunk):
        messages = [{"number": n, "text": t} for n, t in campaign.personal[start : start + chunk]]
        datas.append(json.dumps({"messages": messages, "custom": custom}, separators=(",", ":")))
    return [datas]


async def floor_run(sandbox_url: str, campaign: Campaign, payloads: list[list[str]]) -> float:
    """The same calls as the daemon, from a plain script: the time TextLocal itself needs.

    The same bodies (contacts chunks and bulk_json data prepared beforehand), encoded the same
    way, with the same number of calls in flight.
    """
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def call(command: str, **params: str) -> dict[str, object]:
            fields = [("apikey", API_KEY), *params.items()]
            # Encoded as the daemon's client does: multipart above 16 KB, else urlencoded (the
            # sandbox's cost differs between the two; urlencoding 100 KB in Python takes 10 ms).
            large = sum(len(value) for _, value in fields) > MULTIPART_ABOVE_BYTES
            form = aiohttp.FormData(fields, default_to_multipart=large)
            async with gate, session.post(f"{sandbox_url}{command}/", data=form) as response:
                reply: dict[str, object] = await response.json(content_type=None)
            assert reply["status"] == "success", str(reply)[:500]
            return reply

        async def all_of(calls: Sequence[Awaitable[dict[str, object]]]) -> list[dict[str, object]]:
            return list(await asyncio.gather(*calls))

        started = time.monotonic()
        if campaign.group_texts:
            tag = uuid.uuid4().hex[:8]
            groups = await all_of(
                [call("create_group", name=f"floor-{tag}-{i}") for i in range(len(payloads))]
            )
            group_ids = [str(g["group"]["id"]) for g in groups]  # type: ignore[index]
            await all_of(
                [
                    call("create_contacts_bulk", group_id=group_id, contacts=chunk)
                    for group_id, chunks in zip(group_ids, payloads, strict=True)
                    for chunk in chunks
                ]
            )
            await call("balance")
            await all_of(
                [
                    call("send", group_id=group_id, message=text)
                    for group_id, (_, _, text) in zip(group_ids, campaign.group_texts, strict=True)
                ]
            )
        else:
            await call("balance")
            await all_of([call("bulk_json", data=data) for data in payloads[0]])
        return time.monotonic() - started


# --- the daemon's run -----------------------------------------------------------------------


def publish_campaign(
    bootstrap: str,
    topic: str,
    warm_up_topic: str,
    campaign: Campaign,
    ref: CampaignRef,
    template_id: int,
) -> tuple[float, float]:
    """Encode every event, then publish them: (monotonic, wall-clock) time of the first.

    The producer is warmed up first with one record to a topic of its own, which the daemon
    does not read: a new idempotent producer's first record waits ~0.5 s for its producer id
    and metadata, time of this script's set-up, not of the daemon (Optimove's producers are
    long-lived)."""
    registry = SchemaRegistry.from_directory()
    ids = campaign.ids
    starts = range(0, len(ids), BATCH)
    now = datetime.now(UTC)
    header = CampaignScheduled(
        event_id=str(uuid.uuid4()),
        occurred_at=now,
        ref=ref,
        template_id=template_id,
        template_name=campaign.template_title,
        scheduled_at=now,
        message_type="SMS",
        recipient_count=len(ids),
        batch_count=len(starts),
        promo_codes=campaign.campaign_codes,
    )
    encoded = [registry.encode("CampaignScheduled", header.to_fields())]
    for index, start in enumerate(starts):
        batch = tuple(ids[start : start + BATCH])
        codes = (
            () if campaign.own_codes is None else tuple(campaign.own_codes[start : start + BATCH])
        )
        event = CampaignRecipients(
            str(uuid.uuid4()), now, ref, index, batch, sum(map(bool, codes)), codes
        )
        encoded.append(registry.encode("CampaignRecipients", event.to_fields()))
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "message.max.bytes": 10_000_000,
            "linger.ms": 5,
        }
    )
    producer.produce(warm_up_topic, value=b"warm-up")
    producer.flush(30)
    started, published_at = time.monotonic(), time.time()
    for value in encoded:
        producer.produce(topic, key=ref.key.encode(), value=value)
    producer.flush(60)
    return started, published_at


def milestones(log_path: Path, campaign_key: str, published_at: float) -> list[tuple[str, float]]:
    """The daemon's log events about the campaign: (event, seconds after the first publish)."""
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("campaign") != campaign_key:
            continue
        at = datetime.fromisoformat(record["ts"]).timestamp()
        found.append((str(record["event"]), at - published_at))
    return found


@dataclass(frozen=True)
class Figures:
    calls: dict[str, int]
    expected: dict[str, int]
    rss_mb: float
    rss_before_mb: float
    hwm_before_mb: float
    wall_s: float
    floors_s: tuple[float, float]
    phases: list[tuple[str, float]]
    # each state seen: (state, seconds after the first publish, daemon, sandbox, Redis CPU s)
    states: list[tuple[str, float, float, float, float]]
    calls_at: list[tuple[str, float]]  # the daemon's calls, by arrival after the first publish
    floor_calls_at: list[tuple[str, float]]  # the second floor run's, after its start
    daemon_cpu_s: float  # from the first publish to SENT
    sandbox_cpu_s: float  # likewise
    floor_sandbox_cpu_s: tuple[float, float]  # the sandbox's, during each floor run
    redis_cpu_s: float  # the Redis server's (shared: other clients' work included)
    personal_chunks_bytes: int | None  # Redis memory of the personal chunks, once loaded


async def run_scenario(
    args: argparse.Namespace, campaign: Campaign, stack: dict[str, str]
) -> Figures:
    name = campaign.name
    run_id = uuid.uuid4().hex[:8]
    topics = {
        kind: f"bench-variants-{run_id}-{kind}"
        for kind in ("input", "status", "metrics", "templates", "dlq", "warm-up")
    }
    prefix = f"bench-variants-{run_id}:"
    sandbox_port, http_port = free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}/"
    code = str(Path(args.daemon_code).resolve())
    sandbox = subprocess.Popen(
        [
            sys.executable, "-m", "textlocal_sandbox", "--port", str(sandbox_port),
            "--api-key", API_KEY, "--balance", str(len(campaign.ids) * 10),
            "--log-level", "WARNING",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=open(WORK / f"variants-{name}-sandbox.log", "wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    daemon: subprocess.Popen[bytes] | None = None
    admin = SandboxAdminClient(sandbox_url)
    try:
        await wait_http(f"{sandbox_url}_sandbox/clock", 30)
        contacts = campaign.matched + campaign.extra
        group = {"template_prefix": "OPT_", "customer_id_field": "custom1"}
        if campaign.group_texts:
            for language, first, last in language_blocks(contacts):
                group_id = await admin.generate_contacts(
                    "Optimove customers",
                    last - first + 1,
                    first_number=FIRST_NUMBER + first - 1,
                    first_index=first,
                    fields={"custom2": language} if language else None,
                )
            group["language_field"] = "custom2"
            titles = [
                ("OPT_Promo" if not lang else f"OPT_Promo [{lang}]", body)
                for lang, body in PROMO_BODIES.items()
            ]
        else:
            group_id = await admin.generate_contacts("Optimove customers", contacts)
            titles = [("OPT_Code", CODE_BODY)]
        template_ids = await admin.seed_templates([{"title": t, "body": b} for t, b in titles])
        template_id = template_ids[0]
        print(f"[{name}] sandbox: {contacts:,} contacts in group {group_id}", flush=True)

        ref = CampaignRef(1, f"bench-{uuid.uuid4().hex[:6]}", 505)
        payloads = floor_payloads(campaign, args.chunk, short_reference(ref))
        sandbox_cpu = cpu_s(sandbox.pid)
        floor_before = await floor_run(sandbox_url, campaign, payloads)
        floor_cpu_before = cpu_s(sandbox.pid) - sandbox_cpu
        print(f"[{name}] floor (plain aiohttp, before): {floor_before:.1f}s", flush=True)

        env = {
            **os.environ,
            "PYTHONPATH": code,
            "TEXTLOCAL_CONSUMER_KAFKA_BOOTSTRAP_SERVERS": stack["KAFKA_BOOTSTRAP_SERVERS"],
            "TEXTLOCAL_CONSUMER_KAFKA_INPUT_TOPIC": topics["input"],
            "TEXTLOCAL_CONSUMER_KAFKA_STATUS_TOPIC": topics["status"],
            "TEXTLOCAL_CONSUMER_KAFKA_METRICS_TOPIC": topics["metrics"],
            "TEXTLOCAL_CONSUMER_KAFKA_TEMPLATES_TOPIC": topics["templates"],
            "TEXTLOCAL_CONSUMER_KAFKA_DLQ_TOPIC": topics["dlq"],
            "TEXTLOCAL_CONSUMER_KAFKA_GROUP_ID": f"{topics['input']}-daemon",
            "TEXTLOCAL_CONSUMER_KAFKA_CREATE_TOPICS": "true",
            "TEXTLOCAL_CONSUMER_REDIS_URL": stack["REDIS_URL"],
            "TEXTLOCAL_CONSUMER_REDIS_KEY_PREFIX": prefix,
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_URL": sandbox_url,
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_API_KEY": API_KEY,
            # The sandbox enforces no rate limit; the daemon's default (10/s) would be the floor.
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_RATE_LIMIT_PER_S": "10000",
            "TEXTLOCAL_CONSUMER_TEXTLOCAL_MAX_CONCURRENCY": str(CONCURRENCY),
            "TEXTLOCAL_CONSUMER_WORKFLOW_CONTACT_LOAD_CONCURRENCY": str(CONCURRENCY),
            "TEXTLOCAL_CONSUMER_WORKFLOW_BULK_CHUNK_SIZE": str(args.chunk),
            "TEXTLOCAL_CONSUMER_CONTACT_GROUPS": json.dumps([{"id": group_id, **group}]),
            "TEXTLOCAL_CONSUMER_HTTP_PORT": str(http_port),
            "TEXTLOCAL_CONSUMER_LOG_FORMAT": "json",
        }
        profile = ["-m", "cProfile", "-o", str(WORK / f"variants-{name}.prof")]
        log_path = WORK / f"variants-{name}-daemon.log"
        daemon = subprocess.Popen(
            [sys.executable, *(profile if args.profile else []), "-m", "consumer.cli", "run"],
            cwd=code,
            env=env,
            stdout=open(log_path, "wb"),
            stderr=subprocess.STDOUT,
        )
        await wait_http(f"http://127.0.0.1:{http_port}/readyz", 120)
        redis = aioredis.Redis.from_url(stack["REDIS_URL"])
        keys = RedisKeys(prefix=prefix)
        print(f"[{name}] daemon ready; waiting for its contact index and templates ...", flush=True)
        deadline = time.monotonic() + 600
        while not await redis.exists(keys.daily_job_last_success("contacts")):
            if time.monotonic() > deadline:
                raise SystemExit("the contact index was not built in 10 minutes")
            await asyncio.sleep(1)
        while not await redis.exists(keys.daily_job_last_success("templates")):
            await asyncio.sleep(0.5)
        await admin.reset_call_counts()
        rss_before = proc_status_mb(daemon.pid, "VmRSS")
        hwm_before = proc_status_mb(daemon.pid, "VmHWM")
        daemon_cpu, sandbox_cpu = cpu_s(daemon.pid), cpu_s(sandbox.pid)
        redis_cpu = await redis_cpu_s(redis)
        chunks_key = keys.personal_chunks(ref.key)
        personal_chunks_bytes: int | None = None

        started, published_at = await asyncio.to_thread(
            publish_campaign, stack["KAFKA_BOOTSTRAP_SERVERS"], topics["input"],
            topics["warm-up"], campaign, ref, template_id,
        )  # fmt: skip
        print(
            f"[{name}] published {len(campaign.ids):,} recipients in "
            f"{math.ceil(len(campaign.ids) / BATCH)} batches",
            flush=True,
        )
        state = ""
        states: list[tuple[str, float, float, float, float]] = []
        while state != "SENT":
            seen = as_text(await redis.hget(keys.campaign(ref.key), "state") or b"")
            if seen in ("FAILED", "REJECTED", "DONE"):
                raise SystemExit(f"campaign ended {seen}; see {log_path}")
            if seen != state:
                state = seen
                states.append(
                    (
                        state or "(none yet)",
                        time.monotonic() - started,
                        cpu_s(daemon.pid) - daemon_cpu,
                        cpu_s(sandbox.pid) - sandbox_cpu,
                        await redis_cpu_s(redis) - redis_cpu,
                    )
                )
                if state in ("CONTACTS_LOADED", "SEND_PENDING") and not personal_chunks_bytes:
                    personal_chunks_bytes = await redis.memory_usage(chunks_key, samples=0)
            await asyncio.sleep(0.05)
        wall = time.monotonic() - started
        rss = proc_status_mb(daemon.pid, "VmHWM")
        daemon_cpu, sandbox_cpu = cpu_s(daemon.pid) - daemon_cpu, cpu_s(sandbox.pid) - sandbox_cpu
        redis_cpu = await redis_cpu_s(redis) - redis_cpu
        counts = await admin.call_counts()
        calls_at = await calls_timeline(admin, published_at)
        await redis.aclose()

        await admin.reset_call_counts()
        floor_cpu_after, floor_started = cpu_s(sandbox.pid), time.time()
        floor_after = await floor_run(sandbox_url, campaign, payloads)
        floor_calls_at = await calls_timeline(admin, floor_started)
        floor_cpu_after = cpu_s(sandbox.pid) - floor_cpu_after
        print(f"[{name}] floor (plain aiohttp, after): {floor_after:.1f}s", flush=True)
        return Figures(
            calls={k: v for k, v in counts.items() if v},
            expected=expected_calls(campaign, args.chunk),
            rss_mb=rss,
            rss_before_mb=rss_before,
            hwm_before_mb=hwm_before,
            wall_s=wall,
            floors_s=(floor_before, floor_after),
            phases=milestones(log_path, ref.key, published_at),
            states=states,
            calls_at=calls_at,
            floor_calls_at=floor_calls_at,
            daemon_cpu_s=daemon_cpu,
            sandbox_cpu_s=sandbox_cpu,
            floor_sandbox_cpu_s=(floor_cpu_before, floor_cpu_after),
            redis_cpu_s=redis_cpu,
            personal_chunks_bytes=personal_chunks_bytes,
        )
    finally:
        await admin.close()
        for process in (daemon, sandbox):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(120)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        # Only once the daemon is gone: it writes to Redis until it stops.
        await delete_prefix(stack["REDIS_URL"], prefix)
        delete_topics_and_groups(
            stack["KAFKA_BOOTSTRAP_SERVERS"],
            list(topics.values()),
            [f"{topics['input']}-daemon"],
        )


def report(campaign: Campaign, figures: Figures, chunk: int) -> None:
    floor = sum(figures.floors_s) / 2
    ids = len(campaign.ids)
    title = {
        "languages": "three languages (default/fr/de in custom2), one campaign code",
        "codes": f"every customer's own promo code (bulk_json, chunk {chunk:,})",
    }[campaign.name]
    print()
    print(f"== {campaign.name}: {title}")
    unmatched = ids - campaign.matched
    print(f"recipients           : {ids:,} (matched {campaign.matched:,}, unmatched {unmatched:,})")
    if campaign.group_texts:
        shares = ", ".join(
            f"{language or 'default'} {len(members):,}"
            for language, members, _ in campaign.group_texts
        )
        print(f"per group text       : {shares}")
    verdict = "EQUAL" if figures.calls == figures.expected else "DIFFERENT"
    if campaign.group_texts:
        terms = " + ".join(f"⌈{len(members):,}/1,500⌉" for _, members, _ in campaign.group_texts)
        formula = (
            f"{len(campaign.group_texts)} create_group + {terms} create_contacts_bulk"
            f" + 1 balance + {len(campaign.group_texts)} send"
        )
    else:
        formula = f"⌈{len(campaign.personal):,}/{chunk:,}⌉ bulk_json + 1 balance"
    print(f"TextLocal calls made : {figures.calls} (the sandbox's counts)")
    print(f"TextLocal calls expected: {figures.expected} = {formula}  -> {verdict}")
    met = {True: "met", False: "NOT met"}
    print(
        f"daemon peak RSS      : {figures.rss_mb:.0f} MB (target <= 300 MB:"
        f" {met[figures.rss_mb <= 300]}; before publishing: VmRSS"
        f" {figures.rss_before_mb:.0f} MB, VmHWM {figures.hwm_before_mb:.0f} MB)"
    )
    print(f"wall time to SENT    : {figures.wall_s:.1f}s")
    before, after = figures.floors_s
    print(f"floor (plain aiohttp): {floor:.1f}s (runs: {before:.1f}s, {after:.1f}s)")
    ratio = figures.wall_s / floor
    print(f"ratio                : {ratio:.2f}x (target <= 1.5x: {met[ratio <= 1.5]})")
    ready_at = next((at for state, at, *_ in figures.states if state == "READY"), None)
    if ready_at is not None:
        # Not the target's measure (that is from the first publish): the part after intake.
        after_ready = figures.wall_s - ready_at
        print(
            f"from READY to SENT   : {after_ready:.1f}s = {after_ready / floor:.2f}x the floor"
            f" (intake, publish to READY: {ready_at:.1f}s = {ready_at / floor:.2f}x)"
        )
    if figures.personal_chunks_bytes:
        per_million = figures.personal_chunks_bytes / campaign.matched * 1e6 / 2**20
        print(
            f"personal chunks kept : {figures.personal_chunks_bytes / 2**20:.0f} MB of Redis"
            f" ({per_million:.0f} MB per million recipients)"
        )
    cpu_before, cpu_after = figures.floor_sandbox_cpu_s
    print(
        f"CPU to SENT          : daemon {figures.daemon_cpu_s:.1f}s, sandbox"
        f" {figures.sandbox_cpu_s:.1f}s (sandbox in the floor runs: {cpu_before:.1f}s,"
        f" {cpu_after:.1f}s); Redis {figures.redis_cpu_s:.1f}s (shared with other clients)"
    )
    print(
        "states (+s, CPU s)   : "
        + ", ".join(
            f"{state} +{at:.1f} (daemon {daemon:.1f}, sandbox {sandbox:.1f}, Redis {redis:.1f})"
            for state, at, daemon, sandbox, redis in figures.states
        )
    )
    if figures.phases:
        print(f"daemon log           : {phases_text(figures.phases)} (after the first publish)")
    print(f"sandbox saw (daemon) : {phases_text(figures.calls_at)} (after the first publish)")
    print(f"sandbox saw (floor)  : {phases_text(figures.floor_calls_at)} (after its start)")


async def calls_timeline(admin: SandboxAdminClient, since: float) -> list[tuple[str, float]]:
    """The sandbox's call log: (command, arrival in seconds after `since`, a wall-clock time)."""
    return [(c.command, c.at.timestamp() - since) for c in await admin.call_log()]


def phases_text(phases: Sequence[tuple[str, float]]) -> str:
    """Each event once: its time, or the first and last of a repeated one with its count."""
    seen: dict[str, list[float]] = {}
    for event, at in phases:
        seen.setdefault(event, []).append(at)
    parts = []
    for event, times in seen.items():
        if len(times) == 1:
            parts.append(f"{event} +{times[0]:.1f}s")
        else:
            parts.append(f"{event} x{len(times)} +{times[0]:.1f}..{times[-1]:.1f}s")
    return ", ".join(parts)


SCENARIOS: dict[str, Callable[[int], Campaign]] = {
    "languages": languages_campaign,
    "codes": codes_campaign,
}


async def main_async(args: argparse.Namespace) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    stack = stack_env()
    names = list(SCENARIOS) if args.scenario == "both" else [args.scenario]
    for name in names:
        campaign = SCENARIOS[name](args.recipients)
        figures = await run_scenario(args, campaign, stack)
        report(campaign, figures, args.chunk)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scenario", choices=[*SCENARIOS, "both"], default="both")
    parser.add_argument(
        "--recipients", type=int, default=int(os.environ.get("BENCH_RECIPIENTS", "1000000"))
    )
    parser.add_argument(
        "--chunk", type=int, default=5_000, help="bulk_json chunk size (codes scenario)"
    )
    parser.add_argument(
        "--daemon-code", default=str(REPO), help="checkout the daemon runs from (default: this)"
    )
    parser.add_argument("--profile", action="store_true", help="run the daemon under cProfile")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
