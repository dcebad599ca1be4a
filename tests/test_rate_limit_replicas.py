"""Three daemon replicas against one sandbox share one TextLocal rate limit, per account.

Each replica is a real `textlocal-consumer run` process at `..._RATE_LIMIT_PER_S=5` (burst 1,
the default), on one Redis prefix. The sandbox's call log records when every request arrived; in
no one-second window may it hold more than 5 plus the burst (GCRA gives out at most
rate + burst - 1 turns a second; the one more allows for the time from turn to arrival varying).
Three limits of their own would let through up to 15.
"""

from __future__ import annotations

import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.daily_jobs import JOB_NAMES
from consumer.events import InputEvent
from consumer.textlocal import TextLocalSettings
from consumer.workflow import CampaignState
from tests.daemon import DaemonProcess, Stack, assert_one_message_per_recipient, customer_ids
from tests.helpers import eventually, new_ref
from tests.test_rate_limit import busiest_second

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATE_PER_S = 5
BURST = TextLocalSettings.rate_limit_burst
CAMPAIGNS = 12
RECIPIENTS = 20


async def scrape(replica: DaemonProcess) -> dict[str, float]:
    """The replica's metric samples, summed over labels, by sample name."""
    url = f"http://127.0.0.1:{replica.http_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def test_three_replicas_stay_within_the_account_rate_limit_together(stack: Stack) -> None:
    """Three replicas at 5 requests/s: the sandbox sees at most 5 (+ burst) calls in any second."""
    limited = {"TEXTLOCAL_CONSUMER_TEXTLOCAL_RATE_LIMIT_PER_S": str(RATE_PER_S)}
    replicas = [stack.daemon(f"replica-{n}", **limited).start() for n in range(3)]
    for replica in replicas:
        await replica.wait_ready()

    # The contact index is built first (one replica pages through 30,000 contacts at 5/s), so
    # the campaigns do not spend their tries waiting for it.
    keys = stack.store.keys

    async def daily_jobs_done() -> bool:
        found = [await stack.store.redis.get(keys.daily_job_last_success(n)) for n in JOB_NAMES]
        return all(found)

    await eventually(daily_jobs_done, timeout_s=120, interval_s=0.5)

    refs = [new_ref(tenant_id=number) for number in range(CAMPAIGNS)]
    events: list[InputEvent] = []
    for number, ref in enumerate(refs):
        events += stack.campaign(ref, customer_ids(number * RECIPIENTS + 1, RECIPIENTS), 1)
    published_at = time.time()
    stack.publish(*events)
    for ref in refs:
        await stack.wait_for_state(ref, CampaignState.SENT, timeout_s=180)
    await assert_one_message_per_recipient(stack, CAMPAIGNS * RECIPIENTS)

    arrivals = [call.at.timestamp() for call in await stack.sandbox.admin.call_log()]
    campaign_calls = sorted(t for t in arrivals if t >= published_at)
    span_s = campaign_calls[-1] - campaign_calls[0]
    busiest = busiest_second(arrivals)
    print(
        f"\nrate-limit replicas: {len(arrivals)} calls in all, busiest 1 s window {busiest}; "
        f"{len(campaign_calls)} campaign calls over {span_s:.2f} s "
        f"({(len(campaign_calls) - 1) / span_s:.2f}/s); "
        f"busiest campaign-phase window {busiest_second(campaign_calls)}"
    )
    assert busiest <= RATE_PER_S + BURST
    # The campaigns needed many more calls than one second's worth, and they came no faster than
    # the shared rate allows on average either.
    assert len(campaign_calls) >= 4 * CAMPAIGNS
    assert span_s >= (len(campaign_calls) - BURST) / RATE_PER_S - 0.5

    # Every replica called TextLocal, and the replicas waited for turns: the limit held them
    # together, rather than one replica doing all the work.
    metrics = [await scrape(replica) for replica in replicas]
    requests = [
        m.get("textlocal_consumer_textlocal_request_duration_seconds_count", 0) for m in metrics
    ]
    turns = [
        m.get("textlocal_consumer_textlocal_rate_limit_wait_seconds_count", 0) for m in metrics
    ]
    waited_s = [
        m.get("textlocal_consumer_textlocal_rate_limit_wait_seconds_sum", 0) for m in metrics
    ]
    print(f"requests per replica {requests}, turns {turns}, seconds waited {waited_s}")
    assert all(count > 0 for count in requests)
    assert turns == requests  # one turn per HTTP attempt
    assert sum(1 for seconds in waited_s if seconds > 0) >= 2
    for replica in replicas:
        assert await replica.stop() == 0
