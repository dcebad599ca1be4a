"""Opt-outs end to end: added at the sandbox, published once as CustomerOptOut by the daemon's
daily job (a real process, real Kafka and Redis), and no phone number in any output or log."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumer.daily_jobs import OPTOUTS_JOB
from tests.daemon import FIRST_NUMBER, Stack
from tests.helpers import REGISTRY, consume, eventually, read_all
from tests.test_cli import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# In the master group: C0000005 ↔ FIRST_NUMBER + 4 (the sandbox numbers ids from 1).
OPTED_OUT = {FIRST_NUMBER + 4: "C0000005", FIRST_NUMBER + 1233: "C0001234"}
LATER = {FIRST_NUMBER + 29_999: "C0030000"}
STRANGER = 449_900_000_123  # in no group


def optout_records(stack: Stack, expected: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    records = consume(stack.bootstrap, stack.topics.optouts, expected=expected, timeout_s=timeout_s)
    return [REGISTRY.decode(r.value()).fields | {"key": r.key().decode()} for r in records]


def every_output_byte(stack: Stack) -> list[bytes]:
    """Keys and values of every record on every topic the daemon writes."""
    topics = stack.topics
    found: list[bytes] = []
    for topic in (topics.status, topics.metrics, topics.templates, topics.dlq, topics.optouts):
        for record in read_all(stack.bootstrap, topic):
            found += [record.key() or b"", record.value() or b""]
    return found


async def test_optouts_are_published_once_and_numbers_never_leave(stack: Stack) -> None:
    """Two customers' opt-outs and a stranger's at the sandbox: the fresh daemon's daily job
    publishes one CustomerOptOut per customer (the stranger counted, not published); a second
    run publishes only the opt-out added since; an on-demand import adds nothing; no number is
    in any output record or log line."""
    group_id = int(json.loads(stack.env["TEXTLOCAL_CONSUMER_CONTACT_GROUPS"])[0]["id"])
    await stack.sandbox.admin.add_optouts([*OPTED_OUT, STRANGER])
    keys = stack.store.keys
    daemon = stack.daemon().start()
    await daemon.wait_ready()

    async def optouts_ran() -> bool:
        return await stack.store.daily_job_last_success(OPTOUTS_JOB) is not None

    await eventually(optouts_ran, timeout_s=90, interval_s=0.2)
    first = optout_records(stack, expected=2)
    assert sorted(r["customer_id"] for r in first) == sorted(OPTED_OUT.values())
    assert {r["contact_group_id"] for r in first} == {group_id}
    assert {r["key"] for r in first} == {f"{group_id}:{c}" for c in OPTED_OUT.values()}

    # The next day's run: one more opt-out; the job is due again once its success is forgotten.
    await stack.sandbox.admin.add_optouts(list(LATER))
    await stack.store.redis.delete(keys.daily_job_last_success(OPTOUTS_JOB))
    await eventually(optouts_ran, timeout_s=30, interval_s=0.2)

    async def outbox_drained() -> bool:
        return await stack.store.outbox_length() == 0

    await eventually(outbox_drained, timeout_s=30)
    both = optout_records(stack, expected=4, timeout_s=5)  # 3 exist: waits, then gives them
    assert sorted(r["customer_id"] for r in both) == sorted([*OPTED_OUT.values(), *LATER.values()])
    assert len({r["event_id"] for r in both}) == 3
    assert await daemon.stop() == 0

    done = [e for e in daemon.events() if e.get("event") == "daily.job_done"]
    runs = [e for e in done if e.get("job") == OPTOUTS_JOB]
    assert [(e["optouts_new"], e["optouts_published"], e["optouts_unmatched"]) for e in runs] == [
        (3, 2, 1),
        (1, 1, 0),
    ]

    imported = await cli(stack.env, "import-optouts")
    assert imported.returncode == 0, imported.stderr
    assert "optouts: done" in imported.stdout
    assert "events: 0 published" in imported.stdout

    numbers = [str(n) for n in [*OPTED_OUT, *LATER, STRANGER]]
    national = [n[2:] for n in numbers]  # "7700000004": the number without its country code
    for blob in every_output_byte(stack):
        for digits in numbers + national:
            assert digits.encode() not in blob
    logs = daemon.output() + imported.stdout + imported.stderr
    for digits in numbers + national:
        assert digits not in logs
