"""Kafka adapters (kafka-python): topic set-up and the event producer.

Kafka exceptions are translated to :class:`~core.errors.BrokerError` here, at the boundary. The
bootstrap address always comes from the settings, so the same code talks to the embedded broker or
to a real Kafka cluster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from core.errors import BrokerError, ConfigError
from core.settings_groups import KafkaSettings
from streaming.doorbell import doorbell_dir, register_ringer, ring
from streaming.schema import Event

__all__ = ["EventProducer", "ensure_topics", "event_key"]

log = logging.getLogger(__name__)


def ensure_topics(kafka: KafkaSettings) -> list[str]:
    """Create the pipeline's topics if they are missing; return the names created."""
    # The dead-letter topic follows the events topic (its records keep their user keys).
    wanted = {
        kafka.events_topic: kafka.events_topic_partitions,
        kafka.dead_letter_topic: kafka.events_topic_partitions,
        kafka.training_topic: kafka.training_topic_partitions,
    }
    config = {"max.message.bytes": str(kafka.max_message_bytes)}
    try:
        admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap, request_timeout_ms=10_000)
    except KafkaError as exc:
        raise BrokerError(f"cannot reach Kafka at {kafka.bootstrap}: {exc}") from exc
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        created = []
        for name in missing:
            try:
                admin.create_topics([NewTopic(name, wanted[name], 1, topic_configs=config)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    except KafkaError as exc:
        raise BrokerError(f"cannot create topics on {kafka.bootstrap}: {exc}") from exc
    finally:
        admin.close()


def event_key(user_id: int) -> bytes:
    """Events are keyed by user, so one user's events stay in order on one partition."""
    return str(user_id).encode()


class EventProducer:
    """Validated events to the ``events`` topic, keyed by user, acknowledged by all replicas.

    Bounded buffering. A record waits in the producer until the broker acknowledges it (``acks``
    ``all``). At most ``buffer_bytes`` of unacknowledged records are held: a send into a full
    buffer blocks up to ``max_block_ms`` for room, then raises :class:`BrokerError` (kafka-python 3
    has no ``buffer_memory`` bound of its own, so the bound is kept here). While the broker is
    away the buffered records are retried, reconnecting at least every second, until
    ``delivery_timeout_ms``; a record not acknowledged by then fails and :meth:`flush` raises
    ``BrokerError`` with the count, so nothing counts as sent that the broker did not take.
    ``stall_log_s`` without an acknowledgement is logged once as a warning, the first
    acknowledgement after it as the broker being back. ``on_delivery(value, error)`` is called
    (from the client's I/O thread) once per record: ``error`` is None when the broker acknowledged
    it. ``overrides`` go to ``KafkaProducer``.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        buffer_bytes: int = 32 * 1024 * 1024,
        stall_log_s: float = 2.0,
        on_delivery: Callable[[bytes, BaseException | None], None] | None = None,
        **overrides: Any,
    ) -> None:
        self.topic = kafka.events_topic
        self.bootstrap = kafka.bootstrap
        options: dict[str, Any] = {
            "bootstrap_servers": kafka.bootstrap,
            "acks": "all",
            "linger_ms": 5,
            "batch_size": 256 * 1024,
            "max_request_size": kafka.max_message_bytes,
            # Retries are bounded by time, not count: every record either gets its acknowledgement
            # or fails within delivery_timeout_ms of its send.
            "retry_backoff_ms": 100,
            "reconnect_backoff_ms": 50,
            "reconnect_backoff_max_ms": 1000,  # kafka-python's 30 s would delay the recovery
            "request_timeout_ms": 10_000,
            "delivery_timeout_ms": 30_000,
            "max_block_ms": 10_000,
        }
        options.update(overrides)
        if buffer_bytes < 1:
            raise ConfigError(f"buffer_bytes must be a positive byte count, got {buffer_bytes}")
        self.buffer_bytes = buffer_bytes
        self.max_block_s = float(options["max_block_ms"]) / 1000
        self.delivery_timeout_s = float(options["delivery_timeout_ms"]) / 1000
        self.stall_log_s = stall_log_s
        self._on_delivery = on_delivery
        try:
            self._producer = KafkaProducer(**options)
        except KafkaError as exc:
            raise BrokerError(f"cannot reach Kafka at {self.bootstrap}: {exc}") from exc
        self._state = threading.Condition()
        self.pending_records = 0  # sent, neither acknowledged nor failed yet
        self.pending_bytes = 0
        self.acknowledged = 0
        self.failed = 0
        self._failed = 0  # since the last flush
        self._first_failure: BaseException | None = None
        self._last_progress = time.monotonic()
        self._stalled_since: float | None = None
        self._blocking = False  # sends are waiting for room (logged once per episode)
        # Idle consumers of this host wait on the broker's doorbell (streaming.doorbell): ring it
        # at each acknowledgement (rate-limited), where the consumers pause between fetches.
        self._ring = kafka.empty_fetch_backoff_ms > 0
        if self._ring:
            register_ringer(doorbell_dir(kafka.bootstrap))

    def send(self, event: Event) -> None:
        self.send_raw(event_key(event.user_id), event.to_json_bytes())

    def send_raw(self, key: bytes | None, value: bytes) -> None:
        """Send bytes as they are (replays, and tests of bad input)."""
        size = len(value) + len(key or b"")
        self._reserve(size)
        try:
            future = self._producer.send(self.topic, key=key, value=value)
        except BaseException as exc:
            self._release(size)
            if isinstance(exc, KafkaError):
                raise BrokerError(f"send to {self.topic} failed: {exc}") from exc
            raise
        future.add_callback(self._settle, size, value)
        future.add_errback(self._settle_failed, size, value)

    def _reserve(self, size: int) -> None:
        """Count ``size`` bytes as buffered; block up to ``max_block_ms`` for room."""
        if size > self.buffer_bytes:
            raise BrokerError(
                f"a {size}-byte record does not fit the producer buffer ({self.buffer_bytes} "
                "bytes): raise buffer_bytes or send smaller records"
            )
        with self._state:
            if self.pending_bytes + size > self.buffer_bytes:
                deadline = time.monotonic() + self.max_block_s
                if not self._blocking:
                    self._blocking = True
                    log.warning(
                        "producer buffer full: %d records (%d bytes) to %s not yet acknowledged "
                        "by Kafka at %s; sends block up to %.1f s each for room",
                        *(self.pending_records, self.pending_bytes, self.topic, self.bootstrap),
                        self.max_block_s,
                    )
                while self.pending_bytes + size > self.buffer_bytes:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BrokerError(
                            f"producer buffer full: {self.pending_records} records "
                            f"({self.pending_bytes} bytes, buffer_bytes={self.buffer_bytes}) to "
                            f"{self.topic} still unacknowledged by Kafka at {self.bootstrap} "
                            f"after blocking {self.max_block_s:.1f} s (max_block_ms); this "
                            "record was not sent"
                        )
                    self._state.wait(min(left, self.stall_log_s))
                    self._note_stall()
            elif self._blocking:
                self._blocking = False
                log.info("producer buffer has room again: sends no longer block")
            if self.pending_records == 0:
                self._last_progress = time.monotonic()
            self.pending_records += 1
            self.pending_bytes += size
            self._note_stall()

    def _release(self, size: int) -> None:
        """A send that never left: free its room."""
        with self._state:
            self.pending_records -= 1
            self.pending_bytes -= size
            self._state.notify_all()

    def _settle(self, size: int, value: bytes, _metadata: object) -> None:
        """An acknowledgement: free the record's room; log the broker's return after a stall."""
        with self._state:
            self.pending_records -= 1
            self.pending_bytes -= size
            self.acknowledged += 1
            now, stalled = time.monotonic(), self._stalled_since
            self._last_progress, self._stalled_since = now, None
            self._state.notify_all()
        if self._ring:
            ring()
        if stalled is not None:
            log.info(
                "Kafka at %s acknowledges again after %.1f s without; %d records still buffered",
                *(self.bootstrap, now - stalled, self.pending_records),
            )
        if self._on_delivery is not None:
            self._on_delivery(value, None)

    def _settle_failed(self, size: int, value: bytes, exc: BaseException) -> None:
        with self._state:
            self.pending_records -= 1
            self.pending_bytes -= size
            self.failed += 1
            self._failed += 1
            first = self._first_failure is None
            if first:
                self._first_failure = exc
            self._state.notify_all()
        if first:  # one line per flush period, not one per record
            log.error(
                "records to %s are not being stored (Kafka at %s): %s; flush() reports how many",
                *(self.topic, self.bootstrap, exc),
            )
        if self._on_delivery is not None:
            self._on_delivery(value, exc)

    def _note_stall(self) -> None:
        """Log once when buffered records have waited ``stall_log_s`` without any progress.

        Called with ``self._state`` held.
        """
        if self._stalled_since is not None or not self.pending_records:
            return
        now = time.monotonic()
        if now - self._last_progress < self.stall_log_s:
            return
        self._stalled_since = self._last_progress
        log.warning(
            "no acknowledgement from Kafka at %s for %.1f s: %d records (%d bytes) to %s are "
            "buffered and retried until each is %.0f s old (delivery_timeout_ms); sends block "
            "once %d bytes are buffered",
            *(self.bootstrap, now - self._last_progress, self.pending_records, self.pending_bytes),
            *(self.topic, self.delivery_timeout_s, self.buffer_bytes),
        )

    def send_many(self, events: Iterable[Event]) -> int:
        count = 0
        for event in events:
            self.send(event)
            count += 1
        return count

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait for every record sent so far; raise if any was not acknowledged.

        Returns (or raises) within ``timeout_s``; records still buffered then stay buffered.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                # kafka-python's timeout is per batch: keep each wait short, the total is ours.
                left = max(0.0, deadline - time.monotonic())
                self._producer.flush(timeout=min(self.stall_log_s, left))
                break
            except KafkaTimeoutError:
                with self._state:
                    self._note_stall()
                    pending = self.pending_records
                if time.monotonic() >= deadline:
                    raise BrokerError(
                        f"flush to {self.topic} timed out after {timeout_s:.1f} s: {pending} "
                        f"records still unacknowledged by Kafka at {self.bootstrap}"
                    ) from None
            except KafkaError as exc:
                raise BrokerError(f"flush to {self.topic} failed: {exc}") from exc
        with self._state:
            failed, first = self._failed, self._first_failure
            self._failed, self._first_failure = 0, None
        if failed:
            raise BrokerError(f"{failed} record(s) to {self.topic} were not stored; first: {first}")

    def close(self) -> None:
        """Flush what is buffered (bounded by ``delivery_timeout_ms``) and close."""
        try:
            self._producer.close()
        except KafkaError as exc:
            raise BrokerError(f"closing the producer to {self.topic} failed: {exc}") from exc

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
