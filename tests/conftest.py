"""Session fixtures that start real components: the embedded broker, Feast, a Faust worker.

Every test that touches the broker gets its own topic names and Faust app id, so tests share one
broker process without seeing each other's records.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from core.settings import Settings
from streaming.broker import LocalBroker

REPO_ROOT = Path(__file__).resolve().parent.parent
# Item text embeddings are deterministic and slow to compute: keep them across test runs.
EMBEDDING_CACHE = REPO_ROOT / ".hymirec" / "cache"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.2
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


def committed_offsets(settings: Settings, group_id: str) -> dict[TopicPartition, int | None]:
    """The group's committed offset per events partition (None where it has none)."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap, group_id=group_id, enable_auto_commit=False
    )
    try:
        parts = [
            TopicPartition(settings.kafka.events_topic, p)
            for p in range(settings.kafka.events_topic_partitions)
        ]
        return {tp: consumer.committed(tp) for tp in parts}
    finally:
        consumer.close()


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """Each partition of ``topic`` -> its end offset."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        return {tp.partition: offset for tp, offset in consumer.end_offsets(partitions).items()}
    finally:
        consumer.close()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    instance = LocalBroker(tmp_path_factory.mktemp("broker"), port=free_port())
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def make_settings(tmp_path: Path, broker: LocalBroker) -> Callable[..., Settings]:
    """Settings for one test: its own data dir, topics and app id on the shared broker."""

    def build(**overrides: Any) -> Settings:
        tag = uuid.uuid4().hex[:8]
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "cache_dir": EMBEDDING_CACHE,
            "broker_host": broker.host,
            "broker_port": broker.port,
            "kafka_events_topic": f"events-{tag}",
            "kafka_dead_letter_topic": f"dead-letter-{tag}",
            "kafka_training_topic": f"training-{tag}",
            "worker_app_id": f"hymirec-test-{tag}",
            # Private consumer groups: a static member a test killed or stopped stays in its
            # group on the embedded broker (no session expiry), and must not hold up another test.
            "sink_group_id": f"sink-{tag}",
            "trainer_group_id": f"trainer-{tag}",
            "worker_web_port": free_port(),
            "kafka_events_topic_partitions": 4,
            "kafka_training_topic_partitions": 4,
        }
        values.update(overrides)
        return Settings(**values)

    return build
