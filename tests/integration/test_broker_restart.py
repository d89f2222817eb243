"""The broker goes away and comes back: what the producer does, and what the broker kept.

Each test runs its own noida-db broker (the session one is shared) and restarts it on the same
port and data folder. noida-db 0.2.3 holds the log in memory and saves its whole state (topics,
records, group offsets, idempotent-producer sequences) to ``<data>/kafka.json`` about once a
second while something changed, and when it gets SIGTERM. A save is written to a temporary file
and renamed, so a new ``kafka.json`` marks a finished save: the tests wait on that file, never on
time. README, "Broker restarts and durability", states what follows from these tests.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from core.errors import BrokerError
from core.settings import Settings
from streaming.broker import LocalBroker
from streaming.kafka_io import EventProducer, ensure_topics, event_key
from streaming.schema import Event
from tests.conftest import free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

T0_MS = 1_700_000_000_000


def make_events(start: int, count: int) -> list[Event]:
    """``count`` play events over 97 users (so every partition gets some)."""
    return [
        Event(
            event_id=uuid.uuid4(),
            user_id=k % 97,
            item_id=1 + k % 1000,
            event_type="play",
            ts_ms=T0_MS + k,
        )
        for k in range(start, start + count)
    ]


def ids(events: list[Event]) -> set[uuid.UUID]:
    return {e.event_id for e in events}


class Deliveries:
    """``EventProducer(on_delivery=...)``: which events the broker acknowledged, which failed."""

    def __init__(self) -> None:
        self.acked: set[uuid.UUID] = set()
        self.failed: set[uuid.UUID] = set()
        self._lock = threading.Lock()

    def __call__(self, value: bytes, error: BaseException | None) -> None:
        event_id = uuid.UUID(json.loads(value)["event_id"])
        with self._lock:
            (self.failed if error is not None else self.acked).add(event_id)


@contextmanager
def running_broker(folder: Path) -> Iterator[tuple[LocalBroker, Settings]]:
    broker = LocalBroker(folder / "broker", port=free_port())
    broker.start()
    try:
        values: dict[str, Any] = {
            "data_dir": folder / "data",
            "broker_host": broker.host,
            "broker_port": broker.port,
            "kafka_events_topic_partitions": 4,
        }
        settings = Settings(**values)
        ensure_topics(settings.kafka)
        yield broker, settings
    finally:
        broker.stop()


def port_closed(broker: LocalBroker) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((broker.host, broker.port)) != 0


def take_down(broker: LocalBroker, signal_name: str) -> None:
    """SIGTERM (``stop``) or SIGKILL (``kill``), then wait until the port is free again."""
    if signal_name == "SIGTERM":
        broker.stop()
    else:
        broker.kill()
    # The pid can look gone while the dying process still holds its socket.
    wait_until(lambda: port_closed(broker), 30, "the broker's port to close", every_s=0.02)


def saved_state(broker: LocalBroker) -> tuple[int, int] | None:
    """Identity of the broker's saved state file; every save replaces it."""
    try:
        stat = (broker.broker_dir / "data" / "kafka.json").stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def wait_for_save(broker: LocalBroker, settings: Settings) -> None:
    """Return once the broker has saved everything it acknowledged before this call.

    A save seen to finish after the call may have started before it, so wait for two: the
    second started after the first had finished. Each wait first writes a marker record (to the
    training topic, which nobody reads here) so that there is a change to save.
    """
    marker = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    try:
        for _ in range(2):
            before = saved_state(broker)
            marker.send(settings.kafka.training_topic, b"marker").get(timeout=30)

            def saved(before: tuple[int, int] | None = before) -> bool:
                return saved_state(broker) != before

            wait_until(saved, 30, "the broker to save", every_s=0.02)
    finally:
        marker.close()


def read_log(settings: Settings) -> Counter[uuid.UUID]:
    """How often each event id is in the events topic, read to its end offsets."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    parts = [
        TopicPartition(settings.kafka.events_topic, p)
        for p in range(settings.kafka.events_topic_partitions)
    ]
    consumer.assign(parts)
    ends = consumer.end_offsets(parts)
    seen: Counter[uuid.UUID] = Counter()

    def done() -> bool:
        for records in consumer.poll(timeout_ms=200).values():
            seen.update(uuid.UUID(json.loads(r.value)["event_id"]) for r in records)
        return all(consumer.position(tp) >= ends[tp] for tp in parts)

    try:
        wait_until(done, 60, "the events topic to be read to its end", every_s=0)
    finally:
        consumer.close()
    return seen


def kafka_io_messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "streaming.kafka_io")


def test_after_sigterm_every_acknowledged_event_is_kept_and_buffered_ones_arrive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streaming.kafka_io")
    delivered = Deliveries()
    with running_broker(tmp_path) as (broker, settings):
        producer = EventProducer(settings.kafka, on_delivery=delivered, stall_log_s=0.5)
        try:
            before = make_events(0, 2000)
            producer.send_many(before)
            producer.flush()
            take_down(broker, "SIGTERM")

            during = make_events(2000, 1000)
            producer.send_many(during)  # the broker is away: buffered, not acknowledged
            assert producer.pending_records == len(during)
            with pytest.raises(BrokerError, match="1000 records still unacknowledged"):
                producer.flush(timeout_s=1.0)  # flush is bounded; the records stay buffered
            assert producer.pending_records == len(during)

            broker.start()  # same port, same data folder
            producer.flush()
        finally:
            producer.close()
        log = read_log(settings)
    assert delivered.acked == ids(before) | ids(during) and not delivered.failed
    assert set(log) == ids(before) | ids(during)
    assert max(log.values()) == 1  # the idempotent producer's retries stored nothing twice
    messages = kafka_io_messages(caplog)
    assert "no acknowledgement from Kafka" in messages
    assert "acknowledges again" in messages


def test_after_sigkill_the_broker_has_lost_what_it_acknowledged_since_its_last_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streaming.kafka_io")
    # A save can land between the last acknowledgement and the kill (a few ms of ~1 s): then the
    # loss cannot be shown on that broker, and the scenario runs again on a fresh one.
    for attempt in range(3):
        delivered = Deliveries()
        with running_broker(tmp_path / f"attempt-{attempt}") as (broker, settings):
            wait_for_save(broker, settings)  # the topics themselves must be in the saved state
            producer = EventProducer(settings.kafka, on_delivery=delivered, stall_log_s=0.5)
            try:
                saved = make_events(0, 2000)
                producer.send_many(saved)
                producer.flush()
                wait_for_save(broker, settings)

                state = saved_state(broker)
                recent = make_events(10_000, 200)
                producer.send_many(recent)
                producer.flush()  # acknowledged ...
                take_down(broker, "SIGKILL")  # ... and only in the broker's memory
                if saved_state(broker) != state:
                    continue

                during = make_events(20_000, 500)
                producer.send_many(during)
                broker.start()
                # The restarted broker knows the producer's sequence only up to its save, so the
                # batches buffered meanwhile are refused (out of order), and flush says so.
                with pytest.raises(BrokerError, match="were not stored"):
                    producer.flush()
                after = make_events(30_000, 300)
                producer.send_many(after)
                producer.flush()
            finally:
                producer.close()
            log = read_log(settings)
        break
    else:
        pytest.fail("a save landed between acknowledgement and kill three times running")

    assert delivered.acked >= ids(saved) | ids(recent) | ids(after)
    assert ids(saved) | ids(after) <= set(log)
    assert not ids(recent) & set(log), "acknowledged records unexpectedly survived the SIGKILL"
    # Each record buffered during the outage ended in exactly one way, and the log agrees.
    assert delivered.acked & ids(during) | delivered.failed & ids(during) == ids(during)
    assert not delivered.acked & delivered.failed
    assert delivered.failed & ids(during), "flush raised, so some record must have failed"
    assert set(log) == ids(saved) | ids(after) | (delivered.acked & ids(during))
    assert max(log.values()) == 1
    assert "are not being stored" in kafka_io_messages(caplog)


def test_while_the_broker_stays_away_sends_fail_within_the_delivery_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streaming.kafka_io")
    delivered = Deliveries()
    with running_broker(tmp_path) as (broker, settings):
        producer = EventProducer(
            settings.kafka,
            on_delivery=delivered,
            stall_log_s=0.5,
            delivery_timeout_ms=3000,
            request_timeout_ms=1000,
        )
        try:
            warm = make_events(0, 50)
            producer.send_many(warm)
            producer.flush()
            take_down(broker, "SIGTERM")

            lost = make_events(100, 300)
            producer.send_many(lost)
            # Returns once every record's delivery timeout has passed: no hang, no silent drop.
            with pytest.raises(BrokerError, match=r"300 record\(s\) to events were not stored"):
                producer.flush()
            assert delivered.failed == ids(lost) and producer.pending_records == 0

            broker.start()
            after = make_events(1000, 50)
            producer.send_many(after)
            producer.flush()
        finally:
            producer.close()
        log = read_log(settings)
    assert delivered.acked == ids(warm) | ids(after)
    assert Counter(log) == Counter(ids(warm) | ids(after))
    messages = kafka_io_messages(caplog)
    assert "no acknowledgement from Kafka" in messages
    assert "are not being stored" in messages
    assert "acknowledges again" in messages


def test_a_full_buffer_blocks_for_max_block_ms_then_refuses_the_send(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streaming.kafka_io")
    buffer_bytes = 50_000
    delivered = Deliveries()
    with running_broker(tmp_path) as (broker, settings):
        producer = EventProducer(
            settings.kafka, buffer_bytes=buffer_bytes, max_block_ms=300, on_delivery=delivered
        )
        try:
            with pytest.raises(BrokerError, match="does not fit the producer buffer"):
                producer.send_raw(None, b"x" * (buffer_bytes + 1))
            warm = make_events(0, 20)
            producer.send_many(warm)
            producer.flush()
            take_down(broker, "SIGTERM")

            candidates = make_events(100, 1000)
            sizes = [len(event_key(e.user_id)) + len(e.to_json_bytes()) for e in candidates]
            fit = next(
                n for n in range(len(sizes) + 1) if sum(sizes[: n + 1]) > buffer_bytes
            )  # the first record that would overflow the buffer is refused
            accepted: list[Event] = []
            peak = 0
            with pytest.raises(BrokerError, match="producer buffer full") as refused:
                for event in candidates:
                    producer.send(event)
                    accepted.append(event)
                    peak = max(peak, producer.pending_bytes)
            assert "after blocking 0.3 s (max_block_ms)" in str(refused.value)
            assert len(accepted) == fit
            assert peak == producer.pending_bytes == sum(sizes[:fit]) <= buffer_bytes

            broker.start()
            producer.flush()
            assert producer.pending_bytes == 0
        finally:
            producer.close()
        log = read_log(settings)
    assert delivered.acked == ids(warm) | ids(accepted) and not delivered.failed
    assert Counter(log) == Counter(ids(warm) | ids(accepted))
    assert "producer buffer full" in kafka_io_messages(caplog)
