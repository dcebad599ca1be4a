"""Per-customer outcomes: the pure rules, and the recorder against a real Redis."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from consumer.events import CampaignRef
from consumer.keys import RedisKeys
from consumer.metrics import Metrics
from consumer.outcomes import (
    MAX_CUSTOMERS_PER_RECORD,
    OUTCOMES,
    CustomerOutcomesEvent,
    Outcome,
    OutcomeRecorder,
    OutcomeSource,
    OutcomeTarget,
    outcome_of_status,
    outcomes_entry,
    record_chunks,
)
from consumer.store import CampaignStore, as_text
from tests.helpers import REGISTRY, new_ref

WHEN = datetime(2025, 3, 2, 9, 30, tzinfo=UTC)
REF = CampaignRef(42, "2.38", 505)


def event(ids: tuple[str, ...], outcome: Outcome = Outcome.DELIVERED) -> CustomerOutcomesEvent:
    return CustomerOutcomesEvent(
        ref=REF,
        outcome=outcome,
        customer_ids=ids,
        observed_at=WHEN,
        source=OutcomeSource.POLL,
        occurred_at=WHEN,
        poll_number=1,
    )


# --- pure rules ----------------------------------------------------------------------------


def test_textlocal_letters_map_to_outcomes() -> None:
    """D, U, I, E and ? are the final outcomes, P is pending; other letters are not outcomes."""
    assert [outcome_of_status(letter) for letter in "DUIE?P"] == list(Outcome)
    assert outcome_of_status("d") is Outcome.DELIVERED
    assert outcome_of_status("X") is None
    assert [o.is_final for o in Outcome] == [True] * 5 + [False]


def test_records_are_cut_at_ten_thousand() -> None:
    """25,001 ids make records of 10,000, 10,000 and 5,001, in order."""
    ids = [f"C{i}" for i in range(25_001)]
    chunks = list(record_chunks(ids))
    assert [len(c) for c in chunks] == [10_000, 10_000, 5_001]
    assert [i for c in chunks for i in c] == ids


def test_a_record_holds_one_to_ten_thousand_customers() -> None:
    """An empty record or one over 10,000 ids cannot be made."""
    with pytest.raises(ValueError, match="1 to 10000"):
        event(())
    with pytest.raises(ValueError, match="1 to 10000"):
        event(tuple(f"C{i}" for i in range(MAX_CUSTOMERS_PER_RECORD + 1)))


def test_event_ids_follow_the_content() -> None:
    """The same record has the same id; other ids, order or outcome give another id."""
    assert event(("A", "B")).event_id == event(("A", "B")).event_id
    assert event(("A", "B")).event_id != event(("B", "A")).event_id
    assert event(("A", "B")).event_id != event(("A", "B"), Outcome.EXPIRED).event_id
    assert event(("AB",)).event_id != event(("A", "B")).event_id


def test_a_record_encodes_without_numbers() -> None:
    """The outbox entry decodes to the record's fields: ids, outcome, source, poll number."""
    entry = outcomes_entry(REGISTRY, event(("C1", "C2")))
    assert entry.topic == OUTCOMES
    fields = REGISTRY.decode(entry.value or b"").fields
    assert fields["customer_ids"] == ["C1", "C2"]
    assert (fields["outcome"], fields["source"], fields["poll_number"]) == ("DELIVERED", "POLL", 1)
    assert fields["event_id"] == entry.event_id


# --- the recorder against Redis -------------------------------------------------------------


def numbers_of(count: int, first: int = 0) -> list[str]:
    return [str(447_700_100_000 + i) for i in range(first, first + count)]


def customer_of(number: str) -> str:
    return f"C{int(number) - 447_700_100_000:07d}"


@pytest.fixture
async def store(redis_client: aioredis.Redis, key_prefix: str) -> CampaignStore:
    return CampaignStore(redis_client, RedisKeys(prefix=key_prefix), REGISTRY)


async def records(store: CampaignStore) -> list[dict[str, object]]:
    return [
        REGISTRY.decode(entry.value or b"").fields
        for entry in await store.outbox_read(100_000)
        if entry.topic == OUTCOMES
    ]


@pytest.mark.integration
async def test_each_customer_gets_its_final_outcome_once(store: CampaignStore) -> None:
    """Recording the same outcome twice publishes it once; numbers not of the campaign are
    ignored; a later different final outcome of the same customer is refused too."""
    ref = new_ref()
    numbers = numbers_of(5)
    await store.record_recipient_numbers(ref.key, [(n, customer_of(n)) for n in numbers], 3600)
    recorder = OutcomeRecorder(store, REGISTRY)
    target = OutcomeTarget(ref, {"k": "v"})
    first = await recorder.record(
        target, Outcome.DELIVERED, [*numbers[:3], "449999999999"], WHEN, OutcomeSource.POLL, 1
    )
    again = await recorder.record(
        target, Outcome.DELIVERED, numbers[:4], WHEN, OutcomeSource.RECEIPT
    )
    other = await recorder.record(target, Outcome.UNDELIVERED, numbers, WHEN, OutcomeSource.POLL)
    assert (first, again, other) == (3, 1, 1)
    found = await records(store)
    assert [(r["outcome"], r["customer_ids"]) for r in found] == [
        ("DELIVERED", ["C0000000", "C0000001", "C0000002"]),
        ("DELIVERED", ["C0000003"]),
        ("UNDELIVERED", ["C0000004"]),
    ]
    assert found[0]["metadata"] == {"k": "v"}
    assert found[1]["source"] == "RECEIPT"
    assert found[1]["poll_number"] is None
    assert (await store.published_outcomes(ref.key))["C0000004"] == "U"


@pytest.mark.integration
async def test_pending_is_published_once_and_a_final_outcome_after_it(
    store: CampaignStore,
) -> None:
    """PENDING goes to customers without anything published; a final outcome may follow it."""
    ref = new_ref()
    numbers = numbers_of(3)
    await store.record_recipient_numbers(ref.key, [(n, customer_of(n)) for n in numbers], 3600)
    recorder = OutcomeRecorder(store, REGISTRY)
    target = OutcomeTarget(ref)
    await recorder.record(target, Outcome.DELIVERED, numbers[:1], WHEN, OutcomeSource.POLL)
    assert await recorder.record(target, Outcome.PENDING, numbers, WHEN, OutcomeSource.POLL) == 2
    assert await recorder.record(target, Outcome.PENDING, numbers, WHEN, OutcomeSource.POLL) == 0
    late = await recorder.record(target, Outcome.EXPIRED, numbers, WHEN, OutcomeSource.RECEIPT)
    assert late == 2
    assert [r["outcome"] for r in await records(store)] == ["DELIVERED", "PENDING", "EXPIRED"]


@pytest.mark.integration
async def test_a_stream_of_statuses_makes_full_records(store: CampaignStore) -> None:
    """25,000 statuses in runs make records of at most 10,000 per outcome, every customer once,
    pending left out (not the window's end); the counter counts them."""
    ref = new_ref()
    numbers = numbers_of(25_000)
    await store.record_recipient_numbers(ref.key, [(n, customer_of(n)) for n in numbers], 3600)
    metrics = Metrics(CollectorRegistry())
    recorder = OutcomeRecorder(store, REGISTRY, metrics.customer_outcomes)
    letters = ["D" if i % 10 else ("U" if i % 20 else "P") for i in range(len(numbers))]
    batch = recorder.batch(OutcomeTarget(ref), WHEN, OutcomeSource.POLL, 2)
    for start in range(0, len(numbers), 1_600):
        await batch.add_statuses(numbers[start : start + 1_600], letters[start : start + 1_600])
    assert await batch.finish() == 25_000 - 1_250
    found = await records(store)
    sizes = [(r["outcome"], len(r["customer_ids"])) for r in found]  # type: ignore[arg-type]
    assert sizes == [
        ("DELIVERED", 10_000),
        ("DELIVERED", 10_000),
        ("DELIVERED", 2_500),
        ("UNDELIVERED", 1_250),
    ]
    published = [i for r in found for i in r["customer_ids"]]  # type: ignore[attr-defined]
    assert len(published) == len(set(published))
    delivered = metrics.registry.get_sample_value(
        "textlocal_consumer_customer_outcomes_total", {"outcome": "delivered", "source": "poll"}
    )
    assert delivered == 22_500


@pytest.mark.integration
async def test_a_record_whose_customers_were_marked_meanwhile_is_refused(
    store: CampaignStore,
) -> None:
    """The atomic write refuses a record if any customer is no longer eligible, writing nothing."""
    ref = new_ref()
    numbers = numbers_of(3)
    await store.record_recipient_numbers(ref.key, [(n, customer_of(n)) for n in numbers], 3600)
    recorder = OutcomeRecorder(store, REGISTRY)
    await recorder.record(
        OutcomeTarget(ref), Outcome.DELIVERED, numbers[1:2], WHEN, OutcomeSource.RECEIPT
    )
    entry = outcomes_entry(REGISTRY, event(("C0000000", "C0000001")))
    refused = await store.record_outcome_chunk(ref.key, "D", numbers[:2], entry)
    assert refused == [numbers[1]]
    assert (await store.published_outcomes(ref.key))["C0000000"] == "-"
    # Through the recorder, the refused customer is left out and the rest go out.
    written = await recorder.write(
        OutcomeTarget(ref),
        Outcome.DELIVERED,
        {n: customer_of(n) for n in numbers},
        WHEN,
        OutcomeSource.POLL,
        1,
    )
    assert written == 2
    assert [r["customer_ids"] for r in await records(store)] == [
        ["C0000001"],
        ["C0000000", "C0000002"],
    ]


@pytest.mark.integration
async def test_recipient_numbers_are_recorded_whole(
    store: CampaignStore, redis_client: aioredis.Redis
) -> None:
    """Every pair of a batch of thousands lands in the one HSET, customer ids with odd
    characters intact, with the TTL."""
    ref = new_ref()
    numbers = numbers_of(2_345)
    ids = [f"{customer_of(n)},é%[{i}]" for i, n in enumerate(numbers)]
    await store.record_recipient_numbers(ref.key, list(zip(numbers, ids, strict=True)), 3600)
    stored = await redis_client.hgetall(store.keys.recipient_numbers(ref.key))
    assert {as_text(k): as_text(v) for k, v in stored.items()} == {
        n: "-" + i for n, i in zip(numbers, ids, strict=True)
    }
    assert 3500 < await redis_client.ttl(store.keys.recipient_numbers(ref.key)) <= 3600


@pytest.mark.integration
async def test_numbers_recorded_again_keeping_existing_do_not_undo_outcomes(
    store: CampaignStore,
) -> None:
    """A stream resumed after some chunks went records its numbers again keeping those there:
    an outcome already published is not published twice, and numbers new to the hash are
    added. Recorded again plainly, the outcome would go out twice (what the option prevents)."""
    ref = new_ref()
    numbers = numbers_of(6)
    pairs = [(n, customer_of(n)) for n in numbers]
    await store.record_recipient_numbers(ref.key, pairs[:4], 3600)
    recorder = OutcomeRecorder(store, REGISTRY)
    target = OutcomeTarget(ref)
    assert await recorder.record(target, Outcome.DELIVERED, numbers[:2], WHEN, OutcomeSource.POLL)
    await store.record_recipient_numbers(ref.key, pairs, 3600, keep_existing=True)
    again = await recorder.record(target, Outcome.DELIVERED, numbers, WHEN, OutcomeSource.POLL)
    assert again == 4  # the two already published are not again; the two added are
    await store.record_recipient_numbers(ref.key, pairs, 3600)
    assert await recorder.record(target, Outcome.DELIVERED, numbers, WHEN, OutcomeSource.POLL) == 6
