"""Kafka adapters (kafka-python): topic set-up and the event producer.

Kafka exceptions are translated to :class:`~hymirec.errors.BrokerError` here, at the boundary. The
bootstrap address always comes from the settings, so the same code talks to the embedded broker or
to a real Kafka cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from hymirec.errors import BrokerError
from hymirec.settings import Settings
from streaming.schema import Event

__all__ = ["EventProducer", "ensure_topics", "event_key"]

log = logging.getLogger(__name__)


def ensure_topics(settings: Settings) -> list[str]:
    """Create the pipeline's topics if they are missing; return the names created."""
    wanted = [settings.events_topic, settings.dead_letter_topic, settings.training_topic]
    config = {"max.message.bytes": str(settings.max_message_bytes)}
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000
        )
    except KafkaError as exc:
        raise BrokerError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        created = []
        for name in missing:
            try:
                admin.create_topics(
                    [NewTopic(name, settings.topic_partitions, 1, topic_configs=config)]
                )
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    except KafkaError as exc:
        raise BrokerError(f"cannot create topics on {settings.kafka_bootstrap}: {exc}") from exc
    finally:
        admin.close()


def event_key(user_id: int) -> bytes:
    """Events are keyed by user, so one user's events stay in order on one partition."""
    return str(user_id).encode()


class EventProducer:
    """Validated events to the ``events`` topic, keyed by user, acknowledged by all replicas."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self.topic = settings.events_topic
        options: dict[str, Any] = {
            "bootstrap_servers": settings.kafka_bootstrap,
            "acks": "all",
            "linger_ms": 5,
            "batch_size": 256 * 1024,
            "max_request_size": settings.max_message_bytes,
            "retries": 10,
        }
        options.update(overrides)
        try:
            self._producer = KafkaProducer(**options)
        except KafkaError as exc:
            raise BrokerError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from exc
        self.failures: list[BaseException] = []

    def send(self, event: Event) -> None:
        self.send_raw(event_key(event.user_id), event.to_json_bytes())

    def send_raw(self, key: bytes | None, value: bytes) -> None:
        """Send bytes as they are (replays, and tests of bad input)."""
        try:
            future = self._producer.send(self.topic, key=key, value=value)
        except KafkaError as exc:
            raise BrokerError(f"send to {self.topic} failed: {exc}") from exc
        future.add_errback(self._record_failure)

    def _record_failure(self, exc: BaseException) -> None:
        log.error("a record to %s was not acknowledged: %s", self.topic, exc)
        self.failures.append(exc)

    def send_many(self, events: Iterable[Event]) -> int:
        count = 0
        for event in events:
            self.send(event)
            count += 1
        return count

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait for every record sent so far; raise if any was not acknowledged."""
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise BrokerError(f"flush to {self.topic} failed: {exc}") from exc
        if self.failures:
            first, count = self.failures[0], len(self.failures)
            self.failures = []
            raise BrokerError(f"{count} record(s) to {self.topic} were not stored; first: {first}")

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.flush()
        self.close()
