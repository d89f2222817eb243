"""Raw broker rates on the embedded broker, the references beside the pipeline's own figures.

The same records as the pipeline sends them: produced with the project's EventProducer
(kafka-python, acks=all, linger 5 ms), consumed by kafka-python and by aiokafka in a consumer group
each, from earliest, timed from the partition assignment (the group join left out).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from kafka import KafkaConsumer

from core.errors import HymirecError
from core.settings import Settings
from streaming.kafka_io import EventProducer

__all__ = ["Record", "raw_consume_aiokafka", "raw_consume_kafka_python", "raw_produce"]

Record = tuple[bytes, bytes]


def raw_produce(settings: Settings, records: list[Record]) -> float:
    with EventProducer(settings.kafka) as producer:
        start = time.perf_counter()
        for key, value in records:
            producer.send_raw(key, value)
        producer.flush()
        return len(records) / (time.perf_counter() - start)


class RateCounter:
    """Records/s from the group's partition assignment to the last record (join left out)."""

    def __init__(self, expected: int, timeout_s: float = 300) -> None:
        self.expected, self.seen = expected, 0
        self.assigned_at = self.last = 0.0
        self.deadline = time.monotonic() + timeout_s

    def on_partitions_assigned(self, assigned: object) -> None:
        self.assigned_at = self.assigned_at or time.perf_counter()

    def more(self) -> bool:
        return self.seen < self.expected and time.monotonic() < self.deadline

    def add(self, count: int) -> None:
        if count:
            self.seen, self.last = self.seen + count, time.perf_counter()

    def rate(self) -> float:
        if self.seen < self.expected or not self.assigned_at:
            raise HymirecError(f"read {self.seen}/{self.expected} records before the deadline")
        return self.seen / (self.last - self.assigned_at)


def raw_consume_kafka_python(settings: Settings, topic: str, n: int) -> float:
    from kafka import ConsumerRebalanceListener

    counter = RateCounter(n)
    listener = type("Listener", (ConsumerRebalanceListener,), {
        "on_partitions_assigned": lambda _, a: counter.on_partitions_assigned(a),
        "on_partitions_revoked": lambda _, r: None,
    })()  # fmt: skip
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=f"bench-kafka-python-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
    )
    consumer.subscribe([topic], listener=listener)
    try:
        while counter.more():
            counter.add(sum(len(batch) for batch in consumer.poll(timeout_ms=1000).values()))
        return counter.rate()
    finally:
        consumer.close()


def raw_consume_aiokafka(settings: Settings, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

    counter = RateCounter(n)
    listener = type("Listener", (ConsumerRebalanceListener,), {
        "on_partitions_assigned": lambda _, a: counter.on_partitions_assigned(a),
        "on_partitions_revoked": lambda _, r: None,
    })()  # fmt: skip

    async def consume() -> float:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap,
            group_id=f"bench-aiokafka-{uuid.uuid4().hex[:6]}",
            auto_offset_reset="earliest",
        )
        consumer.subscribe([topic], listener=listener)
        await consumer.start()
        try:
            while counter.more():
                counter.add(sum(len(b) for b in (await consumer.getmany(timeout_ms=1000)).values()))
            return counter.rate()
        finally:
            await consumer.stop()

    return asyncio.run(consume())
