"""A Faust worker killed (SIGKILL) mid-stream and restarted loses no event and counts none twice."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata

from core.movielens import load_ratings, replay_histories
from core.settings import Settings
from features.item_features import build_item_features
from features.store import FeatureStoreClient
from hymirec.demo import wait_for_histories
from hymirec.processes import ServiceProcess
from streaming.kafka_io import EventProducer, ensure_topics
from streaming.replay import movielens_events, replay_events
from streaming.worker import EXIT_BATCH_FAILED
from tests.conftest import committed_offsets, end_offsets, wait_until
from tests.integration.test_pipeline import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

EVENTS = 30_000


def test_killed_workers_resume_exactly(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(features_recent_len=20, features_long_len=300)
    ensure_topics(settings.kafka)
    built = build_item_features(settings)
    ratings = load_ratings().head(EVENTS)
    histories = replay_histories(ratings)
    with EventProducer(settings.kafka) as producer:
        replay_events(producer, movielens_events(ratings))
    store = FeatureStoreClient(settings)

    def online_events() -> int:
        rows = store.user_histories(sorted(histories))
        return sum(r.history_len for r in rows.values() if r is not None)

    # Kill the worker twice, each time after it has made progress but before it has finished.
    for kill, after in enumerate((3_000, 12_000)):
        worker = ServiceProcess(f"worker-{kill}", ["worker"], settings).start()
        reached = wait_until(
            lambda after=after: (n := online_events()) >= after and n, 180, f"{after} events online"
        )
        worker.kill()
        assert reached < EVENTS, "the worker finished before it could be killed"

    worker = ServiceProcess("worker-final", ["worker"], settings).start()
    try:
        wait_for_histories(store, {u: len(v) for u, v in histories.items()}, timeout_s=150)
        online = store.user_histories(sorted(histories))
        for user, items in histories.items():
            row = online[user]
            assert row is not None and row.history_len == len(items)
            assert row.recent_item_ids == items[-settings.features.recent_len :].tolist()
            codes = built.codebook.unpack(row.long_codes)
            np.testing.assert_array_equal(
                codes, built.table.lookup(items[-settings.features.long_len :])
            )
        # Samples are at-least-once across a crash: every event has one, repeats carry the
        # same event id and sequence number, so a consumer deduplicates them exactly.
        samples = read_topic(settings, settings.kafka.training_topic, expected=EVENTS)
        keys = {
            (s["user_id"], s["seq"], s["event_id"])
            for s in map(json.loads, (r.value for r in samples))
        }
        assert len(keys) == EVENTS
        assert len({event_id for _, _, event_id in keys}) == EVENTS
    finally:
        worker.stop()


def worker_on_first_half(
    settings: Settings, n: int, name: str
) -> tuple[pd.DataFrame, FeatureStoreClient, ServiceProcess]:
    """The first ``n`` ratings; the first half produced and applied by a worker left running."""
    ensure_topics(settings.kafka)
    build_item_features(settings)
    ratings = load_ratings().head(n)
    first = ratings.head(n // 2)
    store = FeatureStoreClient(settings)
    with EventProducer(settings.kafka) as producer:
        replay_events(producer, movielens_events(first))
    worker = ServiceProcess(name, ["worker"], settings).start()
    try:
        wait_for_histories(store, dict(Counter(first["user_id"].tolist())), timeout_s=180)
    except BaseException:
        worker.stop()
        raise
    return ratings, store, worker


def assert_exact_histories(
    store: FeatureStoreClient, histories: dict[int, np.ndarray], recent_len: int
) -> None:
    """Every user's online history length and recent ids equal the ratings produced."""
    wait_for_histories(store, {u: len(v) for u, v in histories.items()}, timeout_s=180)
    online = store.user_histories(sorted(histories))
    for user, items in histories.items():
        row = online[user]
        assert row is not None and row.history_len == len(items), f"user {user}"
        assert row.recent_item_ids == items[-recent_len:].tolist(), f"user {user}"


def test_a_batch_that_cannot_be_pushed_ends_the_worker_before_its_offsets_are_committed(
    make_settings: Callable[..., Settings],
) -> None:
    """Feast locked (an exclusive SQLite lock held here): the push fails, is retried, and the
    worker exits with code 70 without acknowledging the batch; a restart re-reads it exactly."""
    settings = make_settings(features_recent_len=20, features_long_len=300, worker_push_attempts=2)
    ratings, store, worker = worker_on_first_half(settings, 4_000, "worker-locked")
    second, histories = ratings.tail(2_000), replay_histories(ratings)
    try:
        lock = sqlite3.connect(settings.feast_dir / "online_store.db", timeout=30)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            with EventProducer(settings.kafka) as producer:
                replay_events(producer, movielens_events(second))
            code = worker.process.wait(timeout=120)  # type: ignore[union-attr]
        finally:
            lock.rollback()
            lock.close()
    finally:
        worker.stop()
    log = worker.tail(400)
    assert code == EXIT_BATCH_FAILED, log
    assert "Feast push failed (attempt 1), retrying" in log
    assert "before its offsets can be committed" in log
    restarted = ServiceProcess("worker-unlocked", ["worker"], settings).start()
    try:
        assert_exact_histories(store, histories, settings.features.recent_len)
    finally:
        assert restarted.stop() == 0, restarted.tail()


def test_a_worker_resumes_from_its_table_not_from_committed_offsets(
    make_settings: Callable[..., Settings],
) -> None:
    """The worker resumes from the positions in its own table, not from the group's committed
    offsets: offsets committed past records it never applied (what faust-streaming's own offset
    tracking was seen to leave behind) are replaced by the table's at assignment, and the
    offsets it commits afterwards never run past what it applied."""
    settings = make_settings(features_recent_len=20, features_long_len=300)
    ratings, store, worker = worker_on_first_half(settings, 3_000, "worker-first")
    second, histories = ratings.tail(1_500), replay_histories(ratings)
    assert worker.stop() == 0, worker.tail()
    with EventProducer(settings.kafka) as producer:
        replay_events(producer, movielens_events(second))
    # Move the group's committed offsets to the end of each partition, past every record of the
    # second half, which no worker has applied: what a CI run's second SIGKILLed worker left
    # (Faust had committed up to the end). Nothing is delivered from there, so only a worker that
    # resumes from its table's positions finds those records. The stopped worker left its group
    # (streaming/membership.py), so no member holds the partitions meanwhile.
    assert f"{settings.worker.instance_id} left group" in worker.tail(400), worker.tail()
    group = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=settings.worker.app_id,
        enable_auto_commit=False,
    )
    try:
        ends = group.end_offsets(list(committed_offsets(settings, settings.worker.app_id)))
        before = committed_offsets(settings, settings.worker.app_id)
        assert all((before[tp] or 0) < end for tp, end in ends.items())
        group.commit({tp: OffsetAndMetadata(end, "", -1) for tp, end in ends.items()})
    finally:
        group.close()
    assert committed_offsets(settings, settings.worker.app_id) == ends
    restarted = ServiceProcess("worker-second", ["worker"], settings).start()
    try:
        assert_exact_histories(store, histories, settings.features.recent_len)
    finally:
        assert restarted.stop() == 0, restarted.tail()
    log = restarted.tail(2_000)
    assert f"resuming {settings.kafka.events_topic} at the table's positions" in log, log
    assert committed_offsets(settings, settings.worker.app_id) == ends  # the worker's commits
    assert sum(ends.values()) == len(ratings)


def test_records_the_consumer_skips_are_sought_back_and_applied_once(
    make_settings: Callable[..., Settings],
) -> None:
    """faust-streaming once delivered offset N + 1 where N was next (a 100k-event kill run). The
    worker must seek back and apply the skipped records once; its first seek, made from the
    wrong thread, crashed aiokafka. The skip is injected (``worker_fault_drop``): the worker
    ignores the first delivery of those offsets, as if the consumer had never delivered them."""
    settings = make_settings(features_recent_len=20, features_long_len=300)
    ensure_topics(settings.kafka)
    build_item_features(settings)
    ratings = load_ratings().head(3_000)
    with EventProducer(settings.kafka) as producer:
        replay_events(producer, movielens_events(ratings))
    ends = sorted((end, p) for p, end in end_offsets(settings, settings.kafka.events_topic).items())
    # A run of 50 records in the middle of the fullest partition, one record in the next, and
    # the very first record of the third (which a new worker knows only from the broker).
    dropped = {ends[-1][1]: (ends[-1][0] // 2, ends[-1][0] // 2 + 49)}
    dropped[ends[-2][1]] = (ends[-2][0] // 3, ends[-2][0] // 3)
    dropped[ends[-3][1]] = (0, 0)
    assert ends[-3][0] > 1
    spec = ",".join(f"{p}:{a}-{b}" for p, (a, b) in dropped.items())
    settings = settings.updated(worker_fault_drop=spec)
    store = FeatureStoreClient(settings)
    worker = ServiceProcess("worker-skips", ["worker"], settings).start()
    try:
        assert_exact_histories(store, replay_histories(ratings), settings.features.recent_len)
        samples = read_topic(settings, settings.kafka.training_topic, expected=len(ratings))
    finally:
        assert worker.stop() == 0, worker.tail()
    event_ids = [json.loads(record.value)["event_id"] for record in samples]
    assert len(event_ids) == len(set(event_ids)) == len(ratings)  # one sample per event
    log = worker.tail(2_000)
    for partition, (first, last) in dropped.items():
        # The first record after the dropped run is what reveals the gap.
        line = (
            f"{settings.kafka.events_topic}[{partition}]: offset {last + 1} delivered where "
            f"{first} was next; seeking back to {first}"
        )
        assert line in log, log
