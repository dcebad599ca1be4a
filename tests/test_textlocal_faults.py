"""Fault tests: the TextLocal client against the sandbox with injected 5xx, 429 and dropped
connections. Reads and contact loads ride through; a send whose reply is lost is reported as an
unknown outcome, never repeated, and the sandbox's log shows every recipient got one message.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest

from consumer.errors import TextLocalApiError, TextLocalOutcomeUnknown
from consumer.textlocal import TextLocalClient, TextLocalCredentials, TextLocalSettings
from consumer.textlocal_types import NewContact
from textlocal_sandbox import FaultRule, SandboxHandle

pytestmark = pytest.mark.integration

GROUP_EXISTS = 14
MAX_RECONCILE_ROUNDS = 20


@dataclass
class RecordingObserver:
    outcomes: Counter[str] = field(default_factory=Counter)
    retry_delays_s: list[float] = field(default_factory=list)

    def request_finished(self, command: str, outcome: str, duration_s: float) -> None:
        self.outcomes[outcome] += 1

    def retry_scheduled(self, command: str, reason: str, delay_s: float) -> None:
        self.retry_delays_s.append(delay_s)

    def balance_checked(self, sms: float, mms: float, at_s: float) -> None:
        pass


async def skip_waiting(seconds: float) -> None:
    """Backoff and Retry-After waits are recorded by the observer, not slept through."""


@contextlib.asynccontextmanager
async def faulty_client(
    sandbox: SandboxHandle, observer: RecordingObserver | None = None
) -> AsyncIterator[TextLocalClient]:
    settings = TextLocalSettings(
        api_url=sandbox.url,
        rate_limit_per_s=1000.0,
        max_concurrency=4,
        # 30% faults: twelve failures in a row happen about once in two million calls.
        max_attempts=12,
        max_total_s=3600.0,
    )
    credentials = TextLocalCredentials.from_api_key(sandbox.api_key)
    async with TextLocalClient(settings, credentials, observer=observer, sleep=skip_waiting) as c:
        yield c


def assert_no_secret(error: BaseException, sandbox: SandboxHandle) -> None:
    seen: BaseException | None = error
    while seen is not None:
        assert sandbox.api_key not in f"{seen!s} {seen!r}"
        seen = seen.__cause__ or seen.__context__


# --- what the daemon does after an unknown outcome: look, then decide -----------------------


async def send_reconciled(
    client: TextLocalClient, sandbox: SandboxHandle, *, message: str, group_id: int
) -> int:
    """Send to a group; after an unknown outcome, adopt the send from the history if it is there."""
    for _ in range(MAX_RECONCILE_ROUNDS):
        attempted_at = sandbox.clock.now() - timedelta(seconds=1)
        try:
            sent = await client.send(message=message, group_id=group_id)
        except TextLocalOutcomeUnknown as unknown:
            assert_no_secret(unknown, sandbox)
            found = await sends_to_group_since(client, group_id, attempted_at)
            if found:
                return found[0]
            continue
        assert sent.batch_id is not None
        return sent.batch_id
    raise AssertionError("send never went through")


async def sends_to_group_since(
    client: TextLocalClient, group_id: int, since: datetime
) -> list[int]:
    found = []
    async for page in client.iter_history_group(min_time=since):
        found += [entry.batch_id for entry in page if entry.group_id == group_id]
    return found


async def create_group_reconciled(
    client: TextLocalClient, sandbox: SandboxHandle, name: str
) -> int:
    """Create a group; after an unknown outcome or "already exists", adopt it by name."""
    for _ in range(MAX_RECONCILE_ROUNDS):
        try:
            return (await client.create_group(name)).id
        except TextLocalOutcomeUnknown as unknown:
            assert_no_secret(unknown, sandbox)
        except TextLocalApiError as error:
            if error.code != GROUP_EXISTS:
                raise
        for group in await client.get_groups():
            if group.name == name:
                return group.id
    raise AssertionError("group never created")


# --- the tests --------------------------------------------------------------------------------


def thirty_percent_faults() -> list[FaultRule]:
    """10% 5xx, 10% 429, 5% dropped before and 5% after applying: 30% of requests fail.

    Rules are rolled in order and only those not pre-empted fire, hence the rising rates.
    """
    return [
        FaultRule("http_5xx", rate=0.10),
        FaultRule("http_429", rate=0.10 / 0.90, retry_after_s=2),
        FaultRule("drop_before", rate=0.05 / 0.80),
        FaultRule("drop_after", rate=0.05 / 0.75),
    ]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_campaign_completes_through_30_percent_faults(
    sandbox: SandboxHandle, seed: int
) -> None:
    """Every step of six campaigns gets through 30% faults; each customer gets exactly one SMS."""
    master_id = await sandbox.admin.generate_contacts("master", 3000)
    await sandbox.admin.seed_templates([{"title": "OPT_Hi", "body": "Hi there"}])
    await sandbox.admin.set_faults(thirty_percent_faults(), seed=seed)
    observer = RecordingObserver()

    async with faulty_client(sandbox, observer) as client:
        assert (await client.balance()).sms == 100_000.0
        assert (await client.get_sender_names()).default == "TXTLCL"
        [template] = await client.get_templates()
        # Small pages and chunks make some two hundred requests: every fault kind shows up.
        pages = client.iter_contacts(master_id, page_size=100)
        contacts = [c async for page in pages for c in page]
        assert len(contacts) == 3000

        # Six campaigns of 500 customers each, one after the other, as the executor runs them.
        batch_by_segment: dict[int, int] = {}
        for campaign in range(6):
            audience = contacts[campaign * 500 : (campaign + 1) * 500]
            name = f"OPT_Hi-campaign-{campaign}"
            segment_id = await create_group_reconciled(client, sandbox, name)
            for first in range(0, len(audience), 250):
                chunk = [NewContact(c.number, custom1=c.custom1) for c in audience[first:][:250]]
                assert await client.create_contacts_bulk(segment_id, chunk) == 250
            pages = client.iter_contacts(segment_id, page_size=100)
            segment = [c async for page in pages for c in page]
            assert sorted(c.custom1 for c in segment) == sorted(c.custom1 for c in audience)
            batch_by_segment[segment_id] = await send_reconciled(
                client, sandbox, message=template.body, group_id=segment_id
            )
        for batch_id in batch_by_segment.values():
            assert (await client.status_batch(batch_id)).num_messages == 500
        assert await client.get_scheduled() == []

    fired = await sandbox.admin.faults_fired()
    await sandbox.admin.clear_faults()
    sent = await sandbox.admin.sent_numbers()
    assert len(sent) == 3000
    assert len(set(sent)) == 3000
    batches = await sandbox.admin.batches()
    assert {b.group_id: b.batch_id for b in batches} == batch_by_segment
    # The faults did happen, and Retry-After (2 s) was what the client waited on a 429.
    assert len(fired) == 4
    assert all(times > 0 for times in fired)
    assert observer.outcomes["rate_limited"] > 0
    assert observer.outcomes["unavailable"] > 0
    assert 2.0 in observer.retry_delays_s


async def test_a_lost_send_reply_is_reported_and_not_repeated(sandbox: SandboxHandle) -> None:
    """When the send is applied but its reply dropped, the client says so and does not resend."""
    group_id = await sandbox.admin.generate_contacts("OPT_c1", 500)
    await sandbox.admin.set_faults([FaultRule("drop_after", command="send", limit=1)])
    observer = RecordingObserver()
    async with faulty_client(sandbox, observer) as client:
        since = sandbox.clock.now() - timedelta(seconds=1)
        with pytest.raises(TextLocalOutcomeUnknown) as raised:
            await client.send(message="Hello", group_id=group_id)
        assert raised.value.command == "send"
        assert_no_secret(raised.value, sandbox)
        found = await sends_to_group_since(client, group_id, since)

    assert (await sandbox.admin.call_counts())["send"] == 1
    assert observer.outcomes["outcome_unknown"] == 1
    sent = await sandbox.admin.sent_numbers()
    assert len(sent) == 500
    assert len(set(sent)) == 500
    [batch] = await sandbox.admin.batches()
    assert found == [batch.batch_id]


async def test_a_lost_reply_to_a_scheduled_send_is_found_in_get_scheduled(
    sandbox: SandboxHandle,
) -> None:
    """A scheduled send whose reply was lost is found by get_scheduled and sent once."""
    group_id = await sandbox.admin.generate_contacts("OPT_c2", 50)
    await sandbox.admin.set_faults([FaultRule("drop_after", command="send", limit=1)])
    async with faulty_client(sandbox) as client:
        when = sandbox.clock.now() + timedelta(hours=3)
        with pytest.raises(TextLocalOutcomeUnknown):
            await client.send(message="Later", group_id=group_id, schedule_time=when)
        [scheduled] = await client.get_scheduled()
    assert scheduled.group_id == group_id
    await sandbox.admin.advance_clock(timedelta(hours=4))
    sent = await sandbox.admin.sent_numbers()
    assert len(sent) == len(set(sent)) == 50
    assert [b.batch_id for b in await sandbox.admin.batches()] == [scheduled.id]


async def test_a_lost_bulk_json_reply_is_not_repeated(sandbox: SandboxHandle) -> None:
    """bulk_json, like send, is reported as unknown when its reply is lost, and sent once."""
    await sandbox.admin.set_faults([FaultRule("drop_after", command="bulk_json", limit=1)])
    async with faulty_client(sandbox) as client:
        with pytest.raises(TextLocalOutcomeUnknown):
            await client.bulk_json([("447700900001", "Hi A"), ("447700900002", "Hi B")])
    assert (await sandbox.admin.call_counts())["bulk_json"] == 1
    assert sorted(await sandbox.admin.sent_numbers()) == [447700900001, 447700900002]


async def test_a_lost_contacts_reply_is_retried_harmlessly(sandbox: SandboxHandle) -> None:
    """create_contacts_bulk is repeated after a lost reply; the group holds each contact once."""
    await sandbox.admin.set_faults(
        [FaultRule("drop_after", command="create_contacts_bulk", limit=2)]
    )
    async with faulty_client(sandbox) as client:
        group = await client.create_group("segment")
        contacts = [NewContact(str(447_700_200_000 + n)) for n in range(1500)]
        assert await client.create_contacts_bulk(group.id, contacts) == 1500
    assert (await sandbox.admin.call_counts())["create_contacts_bulk"] == 3
    assert await sandbox.admin.group_size(group.id) == 1500


async def test_a_503_on_send_is_retried_and_sends_once(sandbox: SandboxHandle) -> None:
    """A 503 means TextLocal did nothing, so send is retried and the group gets one SMS each."""
    group_id = await sandbox.admin.generate_contacts("OPT_c3", 20)
    await sandbox.admin.set_faults([FaultRule("http_5xx", command="send", status=503, limit=2)])
    async with faulty_client(sandbox) as client:
        sent = await client.send(message="Hi", group_id=group_id)
    assert (await sandbox.admin.call_counts())["send"] == 3
    assert await sandbox.admin.sent_numbers(sent.batch_id) == sorted(
        await sandbox.admin.sent_numbers()
    )
    assert len(await sandbox.admin.sent_numbers()) == 20


async def test_a_500_on_send_is_reconciled_before_sending_again(sandbox: SandboxHandle) -> None:
    """A 500 may follow a send TextLocal applied: the client reports it unknown, the caller looks,
    finds nothing (the sandbox's 500 applies nothing) and sends again, once."""
    group_id = await sandbox.admin.generate_contacts("OPT_c4", 20)
    await sandbox.admin.set_faults([FaultRule("http_5xx", command="send", status=500, limit=1)])
    observer = RecordingObserver()
    async with faulty_client(sandbox, observer) as client:
        batch_id = await send_reconciled(client, sandbox, message="Hi", group_id=group_id)
    assert observer.outcomes["outcome_unknown"] == 1
    assert (await sandbox.admin.call_counts())["send"] == 2
    assert [b.batch_id for b in await sandbox.admin.batches()] == [batch_id]
    assert len(await sandbox.admin.sent_numbers()) == 20
