"""The doorbell: a pause between empty fetches ends when a producer of this host has a record
acknowledged, for kafka-python and aiokafka consumers alike.

The integration tests set the pauses' cap to ``LONG_CAP_MS`` (a minute) and wait at most a
quarter of it for the record, so a record can only arrive in time through the doorbell (nothing
here is a speed limit: any machine passes in milliseconds).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiokafka
import pytest
from kafka import KafkaConsumer

import streaming.doorbell as doorbell
import streaming.fetch_backoff as fetch_backoff
from core.settings import Settings
from streaming.doorbell import DoorbellListener, doorbell_dir, register_ringer, ring
from streaming.fetch_backoff import (
    EmptyFetchBackoff,
    install_aiokafka_backoff,
    install_kafka_python_backoff,
)
from streaming.kafka_io import EventProducer, ensure_topics

LONG_CAP_MS = 60_000
DEADLINE_S = LONG_CAP_MS / 4000


@pytest.fixture
def fresh_ringer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doorbell, "_ringer", doorbell._Ringer())


def test_one_broker_one_directory_however_the_client_spells_it() -> None:
    a = doorbell_dir("127.0.0.1:19092,127.0.0.1:19093")
    assert a == doorbell_dir(["kafka://127.0.0.1:19093", " 127.0.0.1:19092"])
    assert a != doorbell_dir("127.0.0.1:19094")
    assert "/" not in a.name and ":" not in a.name


def test_a_ring_wakes_a_waiting_listener_and_one_rung_earlier_is_kept(
    tmp_path: Path, fresh_ringer: None
) -> None:
    listener = DoorbellListener(tmp_path)
    assert listener.path.read_text().isdigit() and listener.path.parent == tmp_path
    assert ring() == 0  # no doorbell registered: nobody rung
    register_ringer(tmp_path)
    assert ring() == 1  # rung before the wait: queued, not lost
    assert listener.wait(LONG_CAP_MS / 1000)
    assert not listener.wait(0.01)  # nothing since

    threading.Timer(0.05, ring).start()
    started = time.monotonic()
    assert listener.wait(DEADLINE_S)
    assert time.monotonic() - started < DEADLINE_S
    assert ring() == 0  # within RING_INTERVAL_S of the last ring: left out
    listener.close()
    assert not listener.path.exists()


def test_the_async_wait_and_the_backoff_restarting_after_a_ring(
    tmp_path: Path, fresh_ringer: None
) -> None:
    listener = DoorbellListener(tmp_path)
    register_ringer(tmp_path)
    backoff = EmptyFetchBackoff(LONG_CAP_MS)
    for _ in range(40):
        backoff.after_fetch(0)
    assert backoff.pause_s == LONG_CAP_MS / 1000

    async def pause_then_ring() -> float:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, ring)
        started = loop.time()
        await backoff.pause_async(backoff.pause_s, listener)
        return loop.time() - started

    assert asyncio.run(pause_then_ring()) < DEADLINE_S
    assert backoff.after_fetch(0) == pytest.approx(0.001)  # rung: the pauses start again
    assert not asyncio.run(listener.wait_async(0.01))
    listener.close()


def test_files_of_dead_processes_are_removed_and_never_rung(
    tmp_path: Path, fresh_ringer: None
) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = tmp_path / f"{gone.stdout.strip()}-1"
    dead.write_text("1")
    (tmp_path / ".half-written.tmp").write_text("")
    listener = DoorbellListener(tmp_path)
    assert not dead.exists()
    register_ringer(tmp_path)
    assert ring() == 1
    assert listener.wait(1.0)
    listener.close()
    assert os.listdir(tmp_path) == [".half-written.tmp"]


def _send_one(settings: Settings, value: bytes) -> None:
    with EventProducer(settings.kafka) as producer:
        producer.send_raw(b"k", value)


def _one_ring(consumer: KafkaConsumer, settings: Settings, value: bytes, pause_s: float) -> float:
    """Seconds until ``value``, sent while ``consumer`` is in a pause of ``pause_s``, arrives."""
    # Skip the doubling: the next empty fetch pauses ``pause_s``.
    fetch_backoff._kp_backoffs[consumer._fetcher].pause_s = pause_s
    consumer.poll(timeout_ms=500)  # now in that pause
    threading.Timer(0.2, _send_one, (settings, value)).start()
    started, got = time.monotonic(), list[bytes]()
    while not got and time.monotonic() - started < 2 * DEADLINE_S:
        got = [r.value for rs in consumer.poll(timeout_ms=LONG_CAP_MS).values() for r in rs]
    assert got == [value]
    return time.monotonic() - started


@pytest.mark.integration
def test_an_idle_kafka_python_consumer_wakes_on_the_producers_ring(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(kafka_events_topic_partitions=1, kafka_training_topic_partitions=1)
    ensure_topics(settings.kafka)
    consumer = KafkaConsumer(
        settings.kafka.events_topic,
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=f"doorbell-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        # kafka-python ends a pause at the next heartbeat: make that later than the deadline
        session_timeout_ms=LONG_CAP_MS,
        heartbeat_interval_ms=LONG_CAP_MS // 2,
    )
    install_kafka_python_backoff(consumer, LONG_CAP_MS)
    try:
        deadline = time.monotonic() + 30
        while not consumer.assignment():  # joined; its empty fetches have reached long pauses
            assert time.monotonic() < deadline, "never assigned"
            consumer.poll(timeout_ms=100)
        # A first record in short pauses settles the consumer (kafka-python resolves a new
        # assignment's position in the background, and a record produced before that may be
        # fetched by a fetch already in flight, missing its ring: then only the heartbeat, 30 s
        # later, would end a long pause). Then the timed one, sent in a pause of the whole cap:
        # without the doorbell it waits for that heartbeat and misses the deadline.
        _one_ring(consumer, settings, b"settle", pause_s=0.05)
        wait = _one_ring(consumer, settings, b"rang", pause_s=LONG_CAP_MS / 1000)
        assert wait < DEADLINE_S, wait
    finally:
        consumer.close()


@pytest.mark.integration
def test_an_idle_faust_style_aiokafka_consumer_wakes_on_the_producers_ring(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(kafka_events_topic_partitions=1, kafka_training_topic_partitions=1)
    ensure_topics(settings.kafka)
    install_aiokafka_backoff(LONG_CAP_MS)

    async def idle_then_one() -> tuple[bytes | None, float]:
        consumer = aiokafka.AIOKafkaConsumer(
            settings.kafka.events_topic,
            bootstrap_servers=settings.kafka.bootstrap,
            group_id=f"doorbell-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            await asyncio.sleep(1.0)  # assigned, and idle
            # Skip the doubling: the next empty fetch pauses the whole cap (a minute).
            fetch_backoff._backoffs[consumer._fetcher].pause_s = LONG_CAP_MS / 1000
            await asyncio.sleep(0.5)  # now in that pause
            loop = asyncio.get_running_loop()
            started = loop.time()
            await loop.run_in_executor(None, _send_one, settings, b"rang")
            record = await asyncio.wait_for(consumer.getone(), timeout=DEADLINE_S)
            return record.value, loop.time() - started
        finally:
            await consumer.stop()

    try:
        value, waited = asyncio.run(idle_then_one())
    finally:
        install_aiokafka_backoff(0)
    assert value == b"rang" and waited < DEADLINE_S
