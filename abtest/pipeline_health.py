"""Kafka-side pipeline health for the dashboard: consumer lag, event rate, dead-letter records.

Lag of a consumer group on a topic is Σ over partitions of (end offset − committed offset), read
with plain ``KafkaConsumer.end_offsets`` and ``committed`` (a consumer that never subscribes does
not join the group, so it disturbs nobody). The admin client is avoided on purpose: kafka-python
3.0's admin calls go through ``describe_cluster``, which the embedded broker (noida-db) breaks.
The groups are the Faust worker (its app id) and the sink on the events topic, and the trainer on
the training topic. Events per second is the growth of the events topic's end offsets since the
previous snapshot; dead-letter records are end − beginning offsets of the dead-letter topic.
Kafka errors do not escape: an unreachable broker gives a snapshot with ``reachable=False``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from abtest.snapshot import SNAPSHOT_SCHEMA_VERSION, ConsumerLag, PipelineSnapshot
from core.settings import Settings

__all__ = ["consumer_groups", "pipeline_health"]


def consumer_groups(settings: Settings) -> list[tuple[str, str, str]]:
    """(group id, role, topic) of every consumer group whose lag the dashboard shows."""
    return [
        (settings.worker.app_id, "stream worker", settings.kafka.events_topic),
        (settings.sink.group_id, "ClickHouse sink", settings.kafka.events_topic),
        (settings.trainer.group_id, "trainer", settings.kafka.training_topic),
    ]


@contextmanager
def _consumer(settings: Settings, timeout_ms: int, **config: Any) -> Iterator[KafkaConsumer]:
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        client_id="hymirec-readout-publisher",
        enable_auto_commit=False,
        allow_auto_create_topics=False,
        bootstrap_timeout_ms=timeout_ms,
        **config,
    )
    try:
        yield consumer
    finally:
        consumer.close(autocommit=False)


def _partitions(consumer: KafkaConsumer, topic: str, known: set[str]) -> list[TopicPartition]:
    if topic not in known:
        return []
    ids = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(ids)]


def _lag(
    settings: Settings,
    group: str,
    role: str,
    parts: list[TopicPartition],
    topic: str,
    offsets: tuple[dict[TopicPartition, int], dict[TopicPartition, int]],
    timeout_ms: int,
) -> ConsumerLag:
    if not parts:
        return ConsumerLag(
            group=group,
            role=role,
            topic=topic,
            partitions=0,
            committed_partitions=0,
            end_offset=None,
            committed_offset=None,
            lag=None,
        )
    begin, end = offsets
    committed_sum, committed_parts, lag = 0, 0, 0
    with _consumer(settings, timeout_ms, group_id=group) as consumer:
        for tp in parts:
            committed = consumer.committed(tp, timeout_ms=timeout_ms)
            if committed is not None:
                committed_parts += 1
                committed_sum += committed
            position = committed if committed is not None else begin.get(tp, 0)
            lag += max(0, end.get(tp, 0) - position)
    return ConsumerLag(
        group=group,
        role=role,
        topic=topic,
        partitions=len(parts),
        committed_partitions=committed_parts,
        end_offset=sum(end.get(tp, 0) for tp in parts),
        committed_offset=committed_sum if committed_parts else None,
        lag=lag,
    )


def _rate(
    previous: PipelineSnapshot | None, end_offset: int | None, now_ms: int
) -> tuple[float | None, float | None]:
    if previous is None or end_offset is None or previous.events_end_offset is None:
        return None, None
    interval_s = (now_ms - previous.generated_at_ms) / 1000.0
    growth = end_offset - previous.events_end_offset
    if interval_s <= 0 or growth < 0:  # a clock step or a recreated topic: no honest rate
        return None, None
    return growth / interval_s, interval_s


def pipeline_health(
    settings: Settings,
    previous: PipelineSnapshot | None = None,
    *,
    now_ms: int | None = None,
    timeout_ms: int = 5_000,
) -> PipelineSnapshot:
    """The pipeline snapshot now; ``previous`` (the last one written) gives the event rate."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    base: dict[str, Any] = {
        "schema_version": SNAPSHOT_SCHEMA_VERSION,
        "generated_at_ms": now_ms,
        "bootstrap": settings.kafka.bootstrap,
        "events_topic": settings.kafka.events_topic,
        "dead_letter_topic": settings.kafka.dead_letter_topic,
    }
    try:
        with _consumer(settings, timeout_ms) as probe:
            known = set(probe.topics())
            topics = {
                settings.kafka.events_topic,
                settings.kafka.dead_letter_topic,
                settings.kafka.training_topic,
            }
            parts = {t: _partitions(probe, t, known) for t in topics}
            everything = [tp for tps in parts.values() for tp in tps]
            end = probe.end_offsets(everything, timeout_ms=timeout_ms) if everything else {}
            begin = probe.beginning_offsets(everything, timeout_ms=timeout_ms) if everything else {}
        lags = [
            _lag(settings, group, role, parts[topic], topic, (begin, end), timeout_ms)
            for group, role, topic in consumer_groups(settings)
        ]
    except KafkaError as exc:
        return PipelineSnapshot(
            **base,
            reachable=False,
            error=f"{type(exc).__name__}: {exc}",
            events_end_offset=None,
            events_per_s=None,
            rate_interval_s=None,
            dead_letter_records=None,
            consumer_lag=[],
        )
    events_parts = parts[settings.kafka.events_topic]
    events_end = sum(end.get(tp, 0) for tp in events_parts) if events_parts else None
    dead_parts = parts[settings.kafka.dead_letter_topic]
    dead = sum(end.get(tp, 0) - begin.get(tp, 0) for tp in dead_parts) if dead_parts else None
    rate, interval_s = _rate(previous, events_end, now_ms)
    return PipelineSnapshot(
        **base,
        reachable=True,
        error=None,
        events_end_offset=events_end,
        events_per_s=rate,
        rate_interval_s=interval_s,
        dead_letter_records=dead,
        consumer_lag=lags,
    )
