"""The ClickHouse sink on the real broker and chdb: exact counts after redeliveries and faults.

Every produced event is built so that exactly one per-user metric column counts it (impressions,
clicks, plays, errors, or pre-period events), so the per-user columns must sum to exactly the
number of distinct events, however often each was delivered.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from kafka.errors import KafkaError

from abtest.clickhouse import analytics_client, open_client, query_df
from abtest.metrics import user_metrics
from abtest.sink import EventSink, SinkStats
from core.errors import AnalyticsError, BrokerError
from core.settings import Settings
from hymirec.processes import ServiceProcess
from streaming.kafka_io import EventProducer, ensure_topics, event_key
from streaming.schema import Event
from tests.conftest import committed_offsets as group_offsets
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

EXP = "sink-exp"
DAY = 86_400_000
T = 300 * DAY
COUNTED = ["impressions", "clicks", "plays", "errors", "pre_positive_events"]


def experiment_events(users: int = 40, seed: int = 3) -> list[Event]:
    """Impressions, later clicks and plays, failed requests and pre-period ratings."""
    rng = np.random.default_rng(seed)
    events = []

    def add(user: int, kind: str, ts: int, item: int | None = None, **tags: Any) -> None:
        events.append(
            Event(
                event_id=uuid.uuid4(), user_id=user, item_id=item, event_type=kind, ts_ms=ts, **tags
            )
        )

    for user in range(users):
        variant = "b" if user % 2 else "a"
        add(user, "rating", T - DAY, 1)  # pre-period (inside the 14-day default window)
        for k in range(1 + int(rng.integers(0, 3))):
            ts = T + k * 60_000
            for pos in range(3):
                add(
                    user,
                    "impression",
                    ts,
                    pos + 1,
                    experiment=EXP,
                    variant=variant,
                    request_id=f"{user}-{k}",
                    position=pos,
                    latency_ms=20.0,
                )
            if rng.random() < 0.5:
                add(user, "click", ts + 1_000, 1)
                add(user, "play", ts + 2_000, 1)
        if user % 7 == 0:
            add(user, "error", T + DAY, experiment=EXP, variant=variant, request_id=f"{user}-e")
    return events


INVALID = [
    (b"{not json", "malformed_json"),
    (b'{"event_type": "click"}', "validation"),
    (b"[1, 2, 3]", "validation"),
    (b'{"event_id": "x", "user_id": -1, "event_type": "play", "ts_ms": 1}', "validation"),
]


def produce(settings: Settings, events: list[Event]) -> tuple[int, int, Counter[str]]:
    """Send every event once, some 2-3 times, and invalid records; return the totals."""
    rng = np.random.default_rng(11)
    sent = 0
    with EventProducer(settings.kafka) as producer:
        for i, event in enumerate(events):
            copies = 1 + (int(rng.integers(1, 3)) if i % 5 == 0 else 0)  # every 5th: 2-3 times
            for _ in range(copies):
                producer.send(event)
            sent += copies
            if i % 40 == 0:
                raw, _ = INVALID[(i // 40) % len(INVALID)]
                producer.send_raw(event_key(event.user_id), raw)
        too_large = b'{"pad": "' + b"x" * settings.kafka.max_event_bytes + b'"}'
        producer.send_raw(None, too_large)
    invalid = Counter(INVALID[(i // 40) % len(INVALID)][1] for i in range(0, len(events), 40))
    invalid["too_large"] += 1
    return sent, sent + sum(invalid.values()), invalid


def committed_offsets(settings: Settings) -> int:
    """Sum over partitions of the sink group's committed offsets (0 where none)."""
    return sum(o or 0 for o in group_offsets(settings, settings.sink.group_id).values())


def run_in_thread(sink: EventSink) -> tuple[threading.Thread, threading.Event, list[BaseException]]:
    stop, errors = threading.Event(), []

    def target() -> None:
        try:
            sink.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="sink", daemon=True)
    thread.start()
    return thread, stop, errors


def drain(sink: EventSink, records: int, timeout_s: float = 90) -> SinkStats:
    """Run ``sink`` until it has committed ``records`` records, then stop it."""
    thread, stop, errors = run_in_thread(sink)
    try:
        wait_until(
            lambda: errors or sink.stats.committed >= records, timeout_s, "the sink to commit"
        )
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    assert not thread.is_alive()
    return sink.stats


def assert_exact_counts(client: Client, events: list[Event]) -> None:
    distinct = int(query_df(client, "SELECT count() FROM events FINAL").iloc[0, 0])
    assert distinct == len(events)
    metrics = user_metrics(client, EXP, pre_days=14)
    assert int(metrics.users[COUNTED].to_numpy().sum()) == len(events)
    assert len(metrics.users) == len({e.user_id for e in events})
    expected_kinds = Counter(e.event_type for e in events)
    for column, kind in (("impressions", "impression"), ("clicks", "click"), ("plays", "play")):
        assert int(metrics.users[column].sum()) == expected_kinds[kind]


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    made = make_settings(sink_batch_size=100, sink_batch_window_s=0.2)
    ensure_topics(made.kafka)
    return made


def test_redeliveries_and_invalid_records_give_exact_counts(settings: Settings) -> None:
    events = experiment_events()
    valid_sent, total, invalid = produce(settings, events)
    assert valid_sent > len(events)  # there are redeliveries
    with analytics_client(settings.clickhouse) as client:
        stats = drain(EventSink(settings.kafka, settings.sink, client), total)
        assert stats.records == stats.committed == total
        assert stats.inserted == valid_sent  # copies go in; the table collapses them
        assert stats.invalid == invalid
        assert stats.batches >= total // settings.sink.batch_size
        assert_exact_counts(client, events)
    assert committed_offsets(settings) == total


class FailingInserts:
    """A client whose first ``failures`` inserts fail like a ClickHouse outage; else delegates."""

    def __init__(self, client: Client, failures: int) -> None:
        self._client, self.failures = client, failures

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise DatabaseError("Code: 999. simulated outage")
        return self._client.insert(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_after_insert_and_commit_faults_a_restart_gives_exact_counts(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = experiment_events(users=24, seed=5)
    first, second = events[: len(events) // 2], events[len(events) // 2 :]
    with analytics_client(settings.clickhouse) as client:
        # 1. A transient insert failure is retried inside the sink; everything is committed.
        _, total_1, _ = produce(settings, first)
        flaky = EventSink(settings.kafka, settings.sink, FailingInserts(client, failures=1))  # type: ignore[arg-type]
        assert drain(flaky, total_1).insert_retries == 1
        assert committed_offsets(settings) == total_1

        _, total_2, _ = produce(settings, second)
        # 2. A crash between the insert and the commit: rows are in, offsets are not.
        crashing = EventSink(settings.kafka, settings.sink, client)

        def lost_commit(*args: Any, **kwargs: Any) -> None:
            raise KafkaError("simulated crash before the commit")

        monkeypatch.setattr(crashing._consumer, "commit", lost_commit)
        with pytest.raises(BrokerError, match="offset commit failed"):
            crashing.run(max_idle_s=60)
        assert crashing.stats.inserted > 0 and crashing.stats.committed == 0

        # 3. A lasting outage: the sink gives up after its attempts and commits nothing.
        down = EventSink(
            settings.kafka, settings.sink, FailingInserts(client, 10**6), insert_attempts=2
        )  # type: ignore[arg-type]
        with pytest.raises(AnalyticsError, match="gave up after 2 insert attempts"):
            down.run(max_idle_s=60)
        assert down.stats.committed == 0
        assert committed_offsets(settings) == total_1

        # 4. A restart re-reads everything after the last commit; the table absorbs the overlap.
        restarted = drain(EventSink(settings.kafka, settings.sink, client), total_2)
        assert restarted.records == total_2
        assert_exact_counts(client, events)
    assert committed_offsets(settings) == total_1 + total_2


def test_the_sink_command_holds_the_chdb_directory_and_stops_cleanly(settings: Settings) -> None:
    events = experiment_events(users=10, seed=9)
    _, total, _ = produce(settings, events)
    sink = ServiceProcess("sink", ["sink"], settings).start()
    try:
        wait_until(
            lambda: not sink.alive() or committed_offsets(settings) == total,
            120,
            "`hymirec sink` to commit every record",
            every_s=0.5,
        )
        assert sink.alive(), sink.tail()
        # While it runs, no other process can open its chdb directory; the error says who has it.
        with pytest.raises(AnalyticsError, match=f"in use by process {sink.pid}"):
            open_client(settings.clickhouse)
    finally:
        code = sink.stop()
    assert code == 0, sink.tail()  # SIGTERM: flush, commit, leave the group, free the directory
    assert "sink stopped:" in sink.tail()
    with analytics_client(settings.clickhouse) as client:
        assert_exact_counts(client, events)


def test_a_sigkilled_sink_takes_its_partitions_back_and_counts_stay_exact(
    settings: Settings,
) -> None:
    """Static membership: the restarted sink rejoins under its instance id at once (the embedded
    broker never expires the dead member's session, so without it the group would stay stuck)."""
    events = experiment_events(users=120, seed=13)
    _, total, _ = produce(settings, events)
    sink = ServiceProcess("sink", ["sink"], settings)
    for run in range(2):  # killed twice, at its first progress each time
        sink.start()
        before = committed_offsets(settings)
        wait_until(
            lambda before=before: not sink.alive() or committed_offsets(settings) > before,  # type: ignore[misc]
            120,
            f"the sink (run {run + 1}) to commit",
            every_s=0.1,
        )
        assert sink.alive(), sink.tail()
        sink.kill()
        sink.process.wait(timeout=30)  # type: ignore[union-attr]
    assert committed_offsets(settings) < total  # the kills were mid-stream
    sink.start()
    try:
        wait_until(
            lambda: not sink.alive() or committed_offsets(settings) == total,
            120,
            "the restarted sink to commit every record",
            every_s=0.5,
        )
        assert sink.alive(), sink.tail()
    finally:
        assert sink.stop() == 0, sink.tail()
    with analytics_client(settings.clickhouse) as client:
        assert_exact_counts(client, events)


def test_a_rebalance_inserts_the_pending_batch_and_loses_nothing(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A second member joins mid-stream; the first one's rebalance listener runs on kafka-python's
    I/O thread, where it may not commit: it inserts, and the run loop commits what it still owns.

    The listener's insert is made slower than a poll (as a large batch's is) and the next commit
    slow too, so the first member's join attempt completes while no poll waits for it:
    kafka-python 3.0.12 threw such an attempt away and joined again, and on the embedded broker
    the group then never settled (``streaming.kafka_group`` fixes it)."""
    caplog.set_level(logging.INFO, logger="kafka.coordinator")
    events = experiment_events(users=160, seed=17)
    _, total, _ = produce(settings, events)
    # The first member's batch stays pending (no size or time flush) until the rebalance.
    slow = settings.updated(sink_batch_size=100_000, sink_batch_window_s=8.0)
    with analytics_client(settings.clickhouse) as client:
        first = EventSink(slow.kafka, slow.sink, client)
        insert_pending, commit_inserted = first.insert_pending, first._commit_inserted
        inserted_on_revoke = threading.Event()

        def slow_insert() -> bool:
            time.sleep(0.4)  # longer than the sink's 200 ms poll: the join attempt starts late
            inserted_on_revoke.set()
            return insert_pending()

        def slow_commit() -> None:
            if inserted_on_revoke.is_set():  # once: the attempt completes before the next poll
                inserted_on_revoke.clear()
                time.sleep(0.4)
            commit_inserted()

        first.insert_pending = slow_insert  # type: ignore[method-assign]
        first._commit_inserted = slow_commit  # type: ignore[method-assign]
        second = EventSink(
            settings.kafka, settings.sink.model_copy(update={"instance_id": "sink-1"}), client
        )
        thread_1, stop_1, errors_1 = run_in_thread(first)
        threads = [(thread_1, stop_1)]
        try:
            wait_until(lambda: errors_1 or first.stats.records > 0, 60, "the first sink to poll")
            thread_2, stop_2, errors_2 = run_in_thread(second)  # joins: the group rebalances
            threads.append((thread_2, stop_2))
            wait_until(
                lambda: errors_1 or errors_2 or committed_offsets(settings) == total,
                120,
                "every commit",
            )
        finally:
            for thread, stop in threads:
                stop.set()
                thread.join(timeout=30)
        assert not errors_1, errors_1
        assert not errors_2, errors_2
        assert first.failure is None
        assert first.stats.rebalance_inserts >= 1  # the listener inserted the pending batch
        logged = [r.getMessage() for r in caplog.records]
        # One member joining is one rebalance: nobody joined again after generation 2.
        generations = [int(g) for m in logged for g in re.findall(r"<Generation (\d+) ", m)]
        assert max(generations) == 2, generations
        assert second.stats.records > 0  # the second member got partitions
        assert first.stats.committed + second.stats.committed >= total
        assert_exact_counts(client, events)
