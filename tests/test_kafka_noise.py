"""librdkafka's reconnection complaints are let through once a minute per kind, ours always."""

from __future__ import annotations

import logging

from consumer.kafka_io import LibrdkafkaNoise


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("consumer.kafka", logging.WARNING, "", 0, message, args, None)


def test_each_kind_of_librdkafka_complaint_passes_once_a_minute() -> None:
    """Hundreds of FAIL lines while a broker is away become one; other kinds and ours pass."""
    noise = LibrdkafkaNoise(every_s=60)
    fail = ("FAIL", "rdkafka#consumer-1", "[thrd:b]: Connect to ipv4#127.0.0.1:1 failed")
    assert noise.filter(record("%s [%s] %s", *fail))
    assert not noise.filter(record("%s [%s] %s", *fail))
    assert noise.filter(record("%s [%s] %s", "SESSTMOUT", "rdkafka#consumer-1", "timed out"))
    assert noise.filter(record("kafka.consume_error"))
    assert noise.filter(record("kafka.consume_error"))
