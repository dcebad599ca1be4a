"""The real Kafka broker: produce, consume in a group, commit by hand, resume after a restart."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

pytestmark = pytest.mark.integration


def consumer_for(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )


def read_values(consumer: Consumer, count: int, timeout_s: float = 30.0) -> list[bytes]:
    values: list[bytes] = []
    for message in consumer.consume(num_messages=count, timeout=timeout_s):
        assert message.error() is None, message.error()
        value = message.value()
        assert value is not None
        values.append(value)
    return values


def test_restarted_consumer_resumes_after_committed_offset(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    """A consumer that commits offset 4 by hand and closes is followed by one reading from 4."""
    topic = new_topic("roundtrip")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for number in range(10):
        producer.produce(topic, key=b"k", value=f"v{number}".encode())
    assert producer.flush(30) == 0

    group = f"{topic}-group"
    first = consumer_for(kafka_bootstrap, group)
    first.subscribe([topic])
    seen: list[bytes] = []
    while len(seen) < 4:
        seen += read_values(first, 4 - len(seen))
    assert seen == [b"v0", b"v1", b"v2", b"v3"]
    first.commit(offsets=[TopicPartition(topic, 0, 4)], asynchronous=False)
    first.close()

    second = consumer_for(kafka_bootstrap, group)
    second.subscribe([topic])
    rest: list[bytes] = []
    while len(rest) < 6:
        rest += read_values(second, 6 - len(rest))
    second.close()
    assert rest == [f"v{number}".encode() for number in range(4, 10)]
