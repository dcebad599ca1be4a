"""Several daemon processes together: each campaign sent once, each delivery poll recorded once.

Three replicas share a 6-partition input topic and one Redis. Polls run every 8 s over a 32 s
window (4 polls), so a campaign's whole life fits in the test; leases last 2 s, so a killed
replica's polls are taken over well within an interval, as a day's interval and a minute's
lease relate in production (a poll later than a whole interval would be merged into the next).
One replica is SIGKILLed in the middle; the others take over its partitions and its leases.
"""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict

import pytest

from consumer.events import InputEvent
from consumer.workflow import CampaignState
from tests.daemon import Stack, assert_one_message_per_recipient, customer_ids
from tests.helpers import REGISTRY, consume, new_ref

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INPUT_PARTITIONS = 6
CAMPAIGNS = 30
RECIPIENTS = 20
POLLS = 4
FAST_POLLS = {
    "TEXTLOCAL_CONSUMER_WORKFLOW_POLL_INTERVAL_S": "8",
    "TEXTLOCAL_CONSUMER_WORKFLOW_METRICS_WINDOW_DAYS": str(POLLS * 8 / 86400),
    "TEXTLOCAL_CONSUMER_WORKFLOW_LEASE_TTL_S": "2",
}


async def test_three_replicas_with_one_killed_send_and_poll_each_campaign_once(
    stack: Stack,
) -> None:
    """30 campaigns over 3 replicas, one SIGKILLed mid-run: one send and 4 polls per campaign."""
    replicas = [stack.daemon(f"replica-{n}", **FAST_POLLS).start() for n in range(3)]
    for replica in replicas:
        await replica.wait_ready()
    refs = [new_ref(tenant_id=number) for number in range(CAMPAIGNS)]
    events: list[InputEvent] = []
    for number, ref in enumerate(refs):
        events += stack.campaign(ref, customer_ids(number * RECIPIENTS + 1, RECIPIENTS), 1)
    stack.publish(*events)

    async def some_sent() -> bool:
        states = [await stack.state(ref) for ref in refs]
        return sum(s in (CampaignState.SENT, CampaignState.POLLING) for s in states) >= 5

    deadline = asyncio.get_running_loop().time() + 90
    while not await some_sent():
        assert asyncio.get_running_loop().time() < deadline, "no campaign was sent"
        await asyncio.sleep(0.1)
    replicas[1].send(signal.SIGKILL)
    assert await replicas[1].wait_exit() == -signal.SIGKILL

    for ref in refs:
        await stack.wait_for_state(ref, CampaignState.DONE, timeout_s=180)
    assert len(await stack.sandbox.admin.batches()) == CAMPAIGNS
    await assert_one_message_per_recipient(stack, CAMPAIGNS * RECIPIENTS)

    records = consume(stack.bootstrap, stack.topics.metrics, expected=CAMPAIGNS * POLLS)
    ids_by_poll: dict[tuple[int, int], set[str]] = defaultdict(set)
    finals = set()
    for record in records:
        fields = REGISTRY.decode(record.value()).fields
        ids_by_poll[(fields["tenant_id"], fields["poll_number"])].add(fields["event_id"])
        if fields["is_final"]:
            finals.add(fields["tenant_id"])
    assert set(ids_by_poll) == {(t, n) for t in range(CAMPAIGNS) for n in range(1, POLLS + 1)}
    assert all(len(ids) == 1 for ids in ids_by_poll.values())  # re-emissions share their id
    assert finals == set(range(CAMPAIGNS))
    for replica in (replicas[0], replicas[2]):
        assert await replica.stop() == 0
