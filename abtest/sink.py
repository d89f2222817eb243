"""The ClickHouse sink: a Kafka consumer group that copies the ``events`` topic into ``events``.

At-least-once: records are parsed, inserted in batches (at most ``sink_batch_size`` records or
``sink_batch_window_s`` seconds), and their offsets are committed only after the insert returned.
A crash between the insert and the commit re-reads the batch; the table collapses the copies by
``event_id`` (see ``abtest.clickhouse``), so the analytics see every event once. An ``exposure``
record (a whole served list) is stored as its impressions, whose ids it determines. A record that
fails ``parse_event`` is counted under its reason, logged with its offset and skipped: the Faust
worker, which reads the same topic, owns the dead-letter topic.

When the group rebalances, the rebalance listener (which kafka-python 3 runs on its I/O thread,
where no blocking Kafka call may be made) inserts the pending batch and keeps its offsets; the run
loop commits them after the poll returns, for the partitions this sink still owns. A partition
that moved to another member is re-read there from its last committed offset, and the copies
collapse as above. The sink joins its group with static membership (``sink_instance_id``): a sink
restarted after a crash takes its partitions back at once under the same id, where a new member
would wait for the dead one's session to expire (which the embedded broker never does). A sink
that stops cleanly leaves the group (``streaming.membership``: a static member sends no
LeaveGroup of its own), so that replicas scale down as well as up: its partitions move to the
other sinks at once.

An insert that fails is retried (``insert_attempts`` times, with a doubling back-off); after that
the sink raises :class:`~core.errors.AnalyticsError` without committing, and a restart resumes
from the last committed offsets. On chdb the sink holds the ClickHouse directory for as long as it
runs, so readouts on the same directory must wait until it stops (``abtest.clickhouse``); that is
why the sink can publish the dashboard's readout snapshots itself (``abtest.publish``).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
from clickhouse_connect.driver.client import Client
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import OffsetAndMetadata

from abtest.clickhouse import analytics_client, insert_events, load_item_dimension
from core.errors import AnalyticsError, BrokerError, InvalidEvent
from core.settings import Settings
from core.settings_groups import KafkaSettings, SinkSettings
from streaming.fetch_backoff import install_kafka_python_backoff
from streaming.kafka_group import fix_group_join
from streaming.membership import leave_group
from streaming.schema import Event, exposure_impressions, parse_event

if TYPE_CHECKING:
    from abtest.publish import ExperimentPlan, ReadoutPublisher

__all__ = ["EventSink", "SinkStats", "run_sink"]

log = logging.getLogger(__name__)

_POLL_MS = 200
# Commit errors that mean "the group is rebalancing or has moved on", not "Kafka is down".
_REBALANCING = (
    CommitFailedError,
    RebalanceInProgressError,
    IllegalGenerationError,
    UnknownMemberIdError,
)  # longest single poll, so that ``stop`` is noticed quickly


@dataclass
class SinkStats:
    """Running counts (read them from another thread while the sink runs).

    ``records`` were polled; ``inserted`` rows were written (redelivered copies included);
    ``invalid`` counts skipped records per reason; ``committed`` records have committed offsets.
    """

    records: int = 0
    inserted: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    committed: int = 0
    commit_failures: int = 0
    rebalance_inserts: int = 0  # pending batches inserted by the rebalance listener
    insert_retries: int = 0
    readout_publishes: int = 0
    readout_publish_failures: int = 0

    def summary(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in sorted(self.invalid.items())) or "none"
        published = ""
        if self.readout_publishes or self.readout_publish_failures:
            published = (
                f"; readouts published {self.readout_publishes} times, "
                f"{self.readout_publish_failures} failed"
            )
        return (
            f"{self.records} records, {self.inserted} rows inserted in {self.batches} batches, "
            f"{self.committed} committed; invalid: {bad}{published}"
        )


class _FlushOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sink: EventSink) -> None:
        self.sink = sink

    def on_partitions_revoked(self, revoked: Any) -> None:
        # kafka-python logs and swallows a listener's exception; keep it for the run loop.
        try:
            if self.sink.insert_pending():
                self.sink.stats.rebalance_inserts += 1
        except Exception as exc:  # re-raised by EventSink.run after the poll
            self.sink.failure = exc

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.sink.forget_moved(set(assigned))
        log.info("sink assigned %d partition(s)", len(assigned))


class EventSink:
    """Consume ``kafka.events_topic`` in group ``sink.group_id`` into ``client``."""

    def __init__(
        self,
        kafka: KafkaSettings,
        sink: SinkSettings,
        client: Client,
        *,
        insert_attempts: int = 3,
        publisher: ReadoutPublisher | None = None,
    ) -> None:
        self.kafka, self.sink = kafka, sink
        self.client = client
        self.insert_attempts = max(1, insert_attempts)
        self.publisher = publisher  # readout snapshots, published from this loop (it owns chdb)
        self.stats = SinkStats()
        self._pending: list[ConsumerRecord] = []
        self._batch_started: float | None = None
        # Offsets of inserted records, committed by the run loop (``insert_pending``).
        self._inserted: dict[TopicPartition, OffsetAndMetadata] = {}
        self._inserted_records: Counter[TopicPartition] = Counter()
        self.failure: BaseException | None = None  # raised in a rebalance callback
        self._closed = False
        fix_group_join()  # a join that completes between two polls must not be thrown away
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=kafka.bootstrap,
                group_id=sink.group_id,
                group_instance_id=sink.instance_id,
                client_id="hymirec-clickhouse-sink",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=sink.batch_size,
                max_partition_fetch_bytes=kafka.max_message_bytes,
                fetch_max_bytes=max(kafka.max_message_bytes, 64 * 1024 * 1024),
            )
            self._consumer.subscribe([kafka.events_topic], listener=_FlushOnRevoke(self))
            # The embedded broker answers an empty fetch at once: pause after empty ones.
            install_kafka_python_backoff(self._consumer, kafka.empty_fetch_backoff_ms)
        except KafkaError as exc:
            raise BrokerError(f"sink cannot reach Kafka at {kafka.bootstrap}: {exc}") from exc

    def run(
        self, stop: threading.Event | None = None, max_idle_s: float | None = None
    ) -> SinkStats:
        """Consume until ``stop`` is set or no record arrived for ``max_idle_s``; then flush."""
        stop = stop or threading.Event()
        window_s = self.sink.batch_window_s
        last_record = time.monotonic()
        try:
            while not stop.is_set():
                room = self.sink.batch_size - len(self._pending)
                polled = self._poll(room)
                if self.failure is not None:
                    raise self.failure
                if self._inserted:  # inserted by the rebalance listener during that poll
                    self._commit_inserted()
                now = time.monotonic()
                if polled:
                    last_record = now
                    self._batch_started = self._batch_started or now
                    self._pending.extend(polled)
                started = self._batch_started
                if self._pending and (
                    len(self._pending) >= self.sink.batch_size
                    or (started is not None and now - started >= window_s)
                ):
                    self.flush()
                self._publish_readouts()
                if max_idle_s is not None and not self._pending and now - last_record > max_idle_s:
                    break
            self.flush()
        finally:
            self.close()
        return self.stats

    def _publish_readouts(self) -> None:
        """Publish the readout snapshots when due; a failure is logged and counted, never raised
        (the pending records stay pending and are committed only after their insert)."""
        if self.publisher is None or not self.publisher.due():
            return
        try:
            report = self.publisher.publish()
        except Exception:
            self.stats.readout_publish_failures += 1
            log.exception("readout publish failed; the sink goes on")
            return
        self.stats.readout_publishes += 1
        if report.failed:
            self.stats.readout_publish_failures += 1

    def _poll(self, max_records: int) -> list[ConsumerRecord]:
        try:
            batches = self._consumer.poll(timeout_ms=_POLL_MS, max_records=max_records)
        except KafkaError as exc:
            raise BrokerError(f"sink poll of {self.kafka.events_topic} failed: {exc}") from exc
        records = [r for part in batches.values() for r in part]
        self.stats.records += len(records)
        return records

    def flush(self) -> None:
        """Insert the pending records' valid events, then commit their offsets."""
        self.insert_pending()
        self._commit_inserted()

    def insert_pending(self) -> bool:
        """Insert the pending records' valid events and keep their offsets for the next commit;
        return whether there were any.

        Makes no Kafka call, so the rebalance listener can run it on kafka-python's I/O thread.
        """
        if not self._pending:
            return False
        records, self._pending, self._batch_started = self._pending, [], None
        events = list(self._parse(records))
        self._insert(events)
        self.stats.batches += 1
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            if tp not in self._inserted or self._inserted[tp].offset <= r.offset:
                self._inserted[tp] = OffsetAndMetadata(r.offset + 1, "", -1)
            self._inserted_records[tp] += 1
        return True

    def _commit_inserted(self) -> None:
        """Commit the inserted records' offsets for the partitions this sink owns now; the
        others wait for the rebalance to end (``forget_moved`` drops those that moved)."""
        owned = self._consumer.assignment()
        offsets = {tp: o for tp, o in self._inserted.items() if tp in owned}
        if not offsets:
            return
        try:
            self._consumer.commit(offsets)
        except _REBALANCING as exc:
            # The rows are in; retried after the next poll, which completes the rebalance.
            self.stats.commit_failures += 1
            log.warning("offset commit deferred until the rebalance completes: %s", exc)
            return
        except KafkaError as exc:
            raise BrokerError(f"sink offset commit failed: {exc}") from exc
        records = 0
        for tp, offset in offsets.items():
            if self._inserted.get(tp) == offset:  # nothing newer was inserted meanwhile
                del self._inserted[tp]
                records += self._inserted_records.pop(tp, 0)
        self.stats.committed += records

    def forget_moved(self, assigned: set[TopicPartition]) -> None:
        """After a rebalance: offsets of partitions now owned by another member are dropped (their
        rows are in; the new owner re-reads them from the last commit, deduplicated)."""
        moved = [tp for tp in self._inserted if tp not in assigned]
        for tp in moved:
            del self._inserted[tp]
            self._inserted_records.pop(tp, None)
        if moved:
            names = sorted(f"{tp.topic}/{tp.partition}" for tp in moved)
            log.info(
                "partitions %s moved to another member; their last rows will be re-read", names
            )

    def _parse(self, records: list[ConsumerRecord]) -> Iterator[Event]:
        """Valid events; an ``exposure`` (one served list) as the impressions it stands for."""
        for r in records:
            try:
                event = parse_event(r.value, self.kafka.max_event_bytes)
                is_exposure = event.event_type == "exposure"
                yield from exposure_impressions(event) if is_exposure else [event]
            except InvalidEvent as exc:
                self.stats.invalid[exc.reason] += 1
                log.warning(
                    "skipped invalid record %s/%d@%d: %s", r.topic, r.partition, r.offset, exc
                )

    def _insert(self, events: list[Event]) -> None:
        for attempt in range(self.insert_attempts):
            try:
                self.stats.inserted += insert_events(self.client, events)
                return
            except AnalyticsError as exc:
                if attempt + 1 == self.insert_attempts:
                    raise AnalyticsError(
                        f"sink gave up after {self.insert_attempts} insert attempts; nothing of "
                        f"this batch was committed, a restart re-reads it: {exc}"
                    ) from exc
                self.stats.insert_retries += 1
                log.warning("insert failed (attempt %d), retrying: %s", attempt + 1, exc)
                time.sleep(0.5 * 2**attempt)

    def close(self) -> None:
        """Leave the group (uncommitted records go to the next member); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close(autocommit=False)
        except KafkaError as exc:
            log.warning("sink consumer close failed: %s", exc)
        leave_group(self.kafka.bootstrap, self.sink.group_id, self.sink.instance_id)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop`` (main thread only), so the sink flushes and commits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_sink(
    settings: Settings,
    stop: threading.Event | None = None,
    max_idle_s: float | None = None,
    *,
    items: pd.DataFrame | None = None,
    publish_readouts: bool = False,
    plans: Mapping[str, ExperimentPlan] | None = None,
) -> SinkStats:
    """Open ClickHouse (creating the schema), load ``items`` if given, and run the sink.

    With ``publish_readouts`` the sink also writes the readout snapshots every
    ``settings.readout.publish_s`` (``abtest.publish``; ``plans``: the configured experiments'
    weights and controls), since on chdb no other process can read the directory while it runs.
    Without ``stop``, SIGTERM and SIGINT stop it cleanly. Returns the final counts.
    """
    own_stop = stop is None
    stop = stop or threading.Event()
    with analytics_client(settings.clickhouse) as client:
        if items is not None:
            load_item_dimension(client, items)
        publisher = None
        if publish_readouts:
            from abtest.publish import ReadoutPublisher

            publisher = ReadoutPublisher(settings, client, plans=plans)
        sink = EventSink(settings.kafka, settings.sink, client, publisher=publisher)
        if not own_stop:
            return sink.run(stop, max_idle_s)
        with _stop_on_signals(stop):
            return sink.run(stop, max_idle_s)
