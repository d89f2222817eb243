"""No event lost, none counted twice: the Faust worker, the ClickHouse sink and the trainer are
each SIGKILLed several times at random moments while events stream through, and restarted.

The stream is MovieLens-100K ratings (positive events) in replay order with impressions (not
positive: no history, no training sample) mixed in at random places. The test runs the first
30,000 ratings and 150 impressions, to keep the suite short; ``benchmarks/fault_injection.py
--chaos`` runs this same scenario on all 100,000 ratings and 500 impressions (issue 8 asks for
at least 100,000 events) and records the figures in ``benchmarks/RESULTS.md``.

A thread produces the stream in chunks, at most one chunk ahead of the worker (the slowest
stage), so every service is busy throughout and the stream goes on while services are down.
Once the stream has reached a chunk chosen by a seeded RNG, one service (in a seeded order,
each the same number of times) is killed a random delay after it was seen to make progress,
and restarted at once. At the end: every user's online history in Feast equals the ratings
produced; ClickHouse holds every produced event exactly once, per event type; the trainer's
latest version counted every positive event exactly once (``samples_seen``, and the sum of
their event ids mod 2**64). The random delay is the only sleep: everything else waits on a
condition with a deadline.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
from kafka import KafkaConsumer, TopicPartition

from abtest.clickhouse import analytics_client, query_df
from core.movielens import load_ratings, replay_histories
from core.settings import Settings
from features.item_features import ItemFeatures, build_item_features
from features.store import FeatureStoreClient
from hymirec.processes import ServiceProcess
from model.checkpoint_registry import CheckpointRegistry
from streaming.kafka_io import EventProducer, ensure_topics
from streaming.replay import movielens_events
from streaming.schema import Event
from tests.conftest import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

SERVICES = ("worker", "sink", "trainer")
# The line each service logs once it owns its input partitions (the worker's progress shows it).
READY_LINES = {"sink": "sink assigned", "trainer": "trainer ready"}
RATINGS = 30_000  # the test's stream; the benchmark runs all 100,000
TRAINED_MODEL = "popular"  # cheap: the exactness is about offsets, not the model
Counting = Callable[[], int]
_IMPRESSION_IDS = uuid.UUID("3f1c2b7e-6d1a-4c4e-9b8e-7a0c0ffee008")


@dataclass(frozen=True)
class Stream:
    events: list[Event]  # in production order
    histories: dict[int, np.ndarray]  # the positive item ids per user, in order
    last_ts_ms: dict[int, int]

    @property
    def positives(self) -> list[Event]:
        return [e for e in self.events if e.is_positive]


def build_stream(impressions: int, seed: int, ratings: int | None = None) -> Stream:
    """The first ``ratings`` ML-100K ratings (all by default) in replay order, with
    ``impressions`` impressions mixed in."""
    ratings_df = load_ratings()
    if ratings is not None:
        ratings_df = ratings_df.head(ratings)
    return _stream(ratings_df, impressions, seed)


def _stream(ratings: pd.DataFrame, impressions: int, seed: int) -> Stream:
    rng = np.random.default_rng(seed)
    users = ratings["user_id"].unique()
    ts = ratings["ts_ms"].to_numpy()
    extra = [
        Event(
            event_id=uuid.uuid5(_IMPRESSION_IDS, f"{seed}/{k}"),
            user_id=int(rng.choice(users)),
            item_id=int(rng.integers(1, 1683)),
            event_type="impression",
            ts_ms=int(rng.integers(ts.min(), ts.max() + 1)),
            experiment="faults",
            variant="ab"[k % 2],
            request_id=f"faults-{k}",
            position=k % 10,
        )
        for k in range(impressions)
    ]
    total = len(ratings) + impressions
    at = set(rng.choice(total, size=impressions, replace=False).tolist())
    rated, shown = iter(movielens_events(ratings)), iter(extra)
    events = [next(shown) if i in at else next(rated) for i in range(total)]
    last_ts = ratings.groupby("user_id")["ts_ms"].max()
    return Stream(
        events=events,
        histories=replay_histories(ratings),
        last_ts_ms={int(u): int(t) for u, t in last_ts.items()},
    )


class Probes:
    """What each service has done so far, read from where it writes (Feast, offsets, registry)."""

    def __init__(self, settings: Settings, users: list[int]) -> None:
        self.settings = settings
        self.users = users
        self.store = FeatureStoreClient(settings)
        self.registry = CheckpointRegistry(settings.registry_dir)
        self._offsets = KafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap,
            group_id=settings.sink.group_id,
            enable_auto_commit=False,
        )

    def online_events(self) -> int:
        rows = self.store.user_histories(self.users)
        return sum(r.history_len for r in rows.values() if r is not None)

    def sink_committed(self) -> int:
        topic, parts = (
            self.settings.kafka.events_topic,
            range(self.settings.kafka.events_topic_partitions),
        )
        return sum(self._offsets.committed(TopicPartition(topic, p)) or 0 for p in parts)

    def trainer_samples(self) -> int:
        latest = self.registry.latest(TRAINED_MODEL)
        return 0 if latest is None else int(latest.metadata["samples_seen"])

    def progress(self, service: str) -> object:
        if service == "worker":
            return self.online_events()
        if service == "sink":
            return self.sink_committed()
        return self.registry.latest_version(TRAINED_MODEL)

    def backlog(self, service: str, produced: int, produced_positive: int) -> int:
        """Input the service had not yet made durable (read right after killing it)."""
        if service == "worker":
            return produced_positive - self.online_events()
        if service == "sink":
            return produced - self.sink_committed()
        latest = self.registry.latest(TRAINED_MODEL)
        learned = 0 if latest is None else sum(latest.metadata["offsets"].values())
        return sum(self.end_offsets(self.settings.kafka.training_topic).values()) - learned

    def end_offsets(self, topic: str) -> dict[int, int]:
        parts = [
            TopicPartition(topic, p) for p in range(self.settings.kafka.events_topic_partitions)
        ]
        return {tp.partition: o for tp, o in self._offsets.end_offsets(parts).items()}

    def close(self) -> None:
        self._offsets.close()


@dataclass
class Service:
    """One CLI service, restarted under the same name (its log file collects every run)."""

    name: str
    settings: Settings
    process: ServiceProcess | None = None
    starts: int = 0
    mark: object = None  # its progress when it last started

    def start(self, probes: Probes) -> None:
        self.mark = probes.progress(self.name)
        self.process = ServiceProcess(self.name, [self.name], self.settings).start()
        self.starts += 1

    def wait_ready(self) -> None:
        """Until this run logged its readiness line (the log file is shared by every run)."""
        line = READY_LINES.get(self.name)
        if line is None:
            return

        def ready() -> bool:
            return self.check().tail(1_000_000).count(line) >= self.starts

        hint = (
            "; a consumer-group member restarted after a SIGKILL gets its partitions back only "
            "with static membership (group.instance.id, as the worker has): noida-db never "
            "expires the dead member"
            if self.name == "sink"
            else ""
        )
        wait_until(ready, 180, f"the {self.name} (run {self.starts}) to be ready{hint}")

    def check(self) -> ServiceProcess:
        assert self.process is not None
        assert self.process.alive(), f"{self.name} died:\n{self.process.tail()}"
        return self.process

    def kill(self) -> None:
        self.check().kill()


@dataclass(frozen=True)
class Fault:
    chunk: int
    service: str
    delay_s: float  # after the service was seen to make progress
    backlog: int  # its input not yet made durable when it died (records, or samples)


@dataclass
class ChaosReport:
    kills: dict[str, int]
    faults: list[Fault] = field(default_factory=list)
    produced_s: float = 0.0
    settled_s: float = 0.0
    stop_codes: dict[str, int | None] = field(default_factory=dict)


class StreamProducer(threading.Thread):
    """Produces the stream in chunks, each once the worker is within a chunk of the last one
    and the kills planned up to that chunk were made (``kill_after``: chunks produced before
    each, sorted), so the stream goes on while services are being restarted, and every kill
    finds its service with input still to come."""

    def __init__(
        self, settings: Settings, stream: Stream, chunks: int, kill_after: list[int]
    ) -> None:
        super().__init__(name="stream-producer", daemon=True)
        self.settings, self.stream, self.chunks = settings, stream, chunks
        self.kill_after = kill_after
        self.kills_made = 0
        self.size = -(-len(stream.events) // chunks)
        self.sent = self.sent_positive = self.chunks_sent = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        store = FeatureStoreClient(self.settings)  # this thread's own (Feast, Kafka clients)
        users = sorted(self.stream.histories)
        try:
            with EventProducer(self.settings.kafka) as producer:
                for index in range(self.chunks):
                    chunk = self.stream.events[index * self.size : (index + 1) * self.size]
                    due = sum(after <= index for after in self.kill_after)
                    deadline = time.monotonic() + 240
                    while self.kills_made < due and not self.stop.wait(0.1):
                        assert time.monotonic() < deadline, f"kill {self.kills_made + 1} not made"
                    behind = self.sent_positive - self.size  # the previous chunk's start
                    while sum(
                        r.history_len for r in store.user_histories(users).values() if r
                    ) < behind and not self.stop.wait(0.5):
                        assert time.monotonic() < deadline, "the worker fell a chunk behind"
                    if self.stop.is_set():
                        return
                    with self.lock:  # counted as handed over: the flush takes a while
                        self.sent += len(chunk)
                        self.sent_positive += sum(e.is_positive for e in chunk)
                    producer.send_many(chunk)
                    producer.flush()
                    self.chunks_sent += 1
        except BaseException as exc:  # re-raised by the test's thread
            self.error = exc

    def produced(self, chunks: int) -> bool:
        if self.error is not None:
            raise self.error
        return self.chunks_sent >= chunks


def run_chaos(
    settings: Settings,
    stream: Stream,
    *,
    kills_per_service: int = 3,
    chunks: int = 20,
    seed: int = 0,
    max_delay_s: float = 2.0,
    on_event: Callable[[str], None] = lambda line: None,
) -> ChaosReport:
    """Stream ``stream.events`` through worker, sink and trainer while killing them; return
    once every stage has processed everything, with all three stopped (SIGTERM)."""
    rng = random.Random(seed)
    plan = [name for name in SERVICES for _ in range(kills_per_service)]
    rng.shuffle(plan)
    kill_after = sorted(rng.sample(range(1, chunks), len(plan)))  # chunks produced before each
    probes = Probes(settings, sorted(stream.histories))
    services = {name: Service(name, settings) for name in SERVICES}
    report = ChaosReport(kills={name: 0 for name in SERVICES})
    producer = StreamProducer(settings, stream, chunks, kill_after)
    started = time.monotonic()
    try:
        for service in services.values():
            service.start(probes)
        for service in services.values():
            service.wait_ready()
        producer.start()
        for after, name in zip(kill_after, plan, strict=True):
            service = services[name]

            def produced(after: int = after) -> bool:
                return producer.produced(after)

            wait_until(produced, 240, f"chunk {after} to be produced")

            def moved(service: Service = service) -> bool:
                service.check()
                return probes.progress(service.name) != service.mark

            wait_until(moved, 240, f"{service.name} to make progress", every_s=0.2)
            delay = rng.uniform(0.0, max_delay_s)
            time.sleep(delay)  # the fault injection: a random moment of its work
            with producer.lock:
                sent, sent_positive = producer.sent, producer.sent_positive
            service.kill()
            report.kills[service.name] += 1
            backlog = probes.backlog(service.name, sent, sent_positive)
            report.faults.append(Fault(producer.chunks_sent, service.name, delay, backlog))
            on_event(
                f"{time.monotonic() - started:.0f} s, chunk {producer.chunks_sent}/{chunks}: "
                f"SIGKILL {service.name} {delay:.2f} s after it made progress, with {backlog} "
                "of its input not yet durable"
            )
            service.start(probes)
            producer.kills_made += 1  # the stream goes on while the service starts
            service.wait_ready()
        wait_until(lambda: producer.produced(chunks), 300, "the whole stream to be produced")
        report.produced_s = time.monotonic() - started
        positives = len(stream.positives)
        ends = probes.end_offsets(settings.kafka.events_topic)
        targets: list[tuple[str, Counting, int]] = [
            ("worker", probes.online_events, positives),
            ("sink", probes.sink_committed, sum(ends.values())),
            ("trainer", probes.trainer_samples, positives),
        ]
        for name, count, target in targets:

            def reached(name: str = name, count: Counting = count, n: int = target) -> bool:
                services[name].check()
                return count() >= n

            wait_until(reached, 300, f"the {name} to process all {target}")
        report.settled_s = time.monotonic() - started
    finally:
        producer.stop.set()
        if producer.is_alive():
            producer.join(timeout=120)
        for name, service in services.items():
            if service.process is not None:
                report.stop_codes[name] = service.process.stop()
        probes.close()
    return report


# The settings of the whole-stack runs (this one and the scale-out test): P = 300, so the
# heaviest users' long histories are truncated; small sink and trainer batches, so there are
# many inserts, commits and versions for a kill or a rebalance to fall between.
STREAM_SETTINGS: dict[str, object] = {
    "features_recent_len": 20,
    "features_long_len": 300,
    "sink_batch_size": 2000,
    "sink_batch_window_s": 0.5,
    "trainer_models": TRAINED_MODEL,
    "trainer_batch_size": 1024,
    "trainer_publish_every_samples": 2000,
    "trainer_publish_every_s": 1.0,
}


def assert_exact_online_histories(settings: Settings, built: ItemFeatures, stream: Stream) -> None:
    """Feast holds every user's history exactly as the ratings were produced, in order."""
    online = FeatureStoreClient(settings).user_histories(sorted(stream.histories))
    for user, items in stream.histories.items():
        row = online[user]
        assert row is not None, f"user {user}"
        assert row.history_len == len(items), f"user {user}"
        assert row.recent_item_ids == items[-settings.features.recent_len :].tolist(), (
            f"user {user}"
        )
        assert row.last_ts_ms == stream.last_ts_ms[user], f"user {user}"
        codes = built.codebook.unpack(row.long_codes)
        np.testing.assert_array_equal(
            codes, built.table.lookup(items[-settings.features.long_len :])
        )


def test_no_event_lost_none_counted_twice_under_repeated_sigkills(
    make_settings: Callable[..., Settings],
) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = make_settings(
        **STREAM_SETTINGS,
        sink_group_id=f"sink-{tag}",  # a private group: kills leave none behind for other tests
        trainer_group_id=f"trainer-{tag}",
    )
    ensure_topics(settings.kafka)
    built = build_item_features(settings)
    seed = int(os.environ.get("CHAOS_SEED", "8"))  # another seed: other kill moments
    stream = build_stream(impressions=150, seed=seed, ratings=RATINGS)
    report = run_chaos(settings, stream, kills_per_service=3, chunks=14, seed=seed, on_event=print)
    print(f"chaos: {report}")
    assert report.kills == {"worker": 3, "sink": 3, "trainer": 3}
    assert report.stop_codes["sink"] == 0

    # Feast: every user's history is exactly the ratings produced, in order.
    assert_exact_online_histories(settings, built, stream)

    # ClickHouse: each produced event once, per type, whatever was inserted twice after a kill.
    with analytics_client(settings.clickhouse) as client:
        kinds = query_df(client, "SELECT event_type, count() AS n FROM events FINAL GROUP BY 1")
        stored = query_df(client, "SELECT event_id FROM events FINAL")["event_id"]
        rows = int(query_df(client, "SELECT count() FROM events").iloc[0, 0])
    assert dict(zip(kinds["event_type"], kinds["n"].astype(int), strict=True)) == dict(
        Counter(e.event_type for e in stream.events)
    )
    assert len(stored) == len(stream.events)
    assert {uuid.UUID(str(x)) for x in stored} == {e.event_id for e in stream.events}
    print(f"clickhouse: {rows} rows before deduplication for {len(stream.events)} events")

    # Trainer: every positive event learned once; its position is the training topic's end.
    latest = CheckpointRegistry(settings.registry_dir).latest(TRAINED_MODEL)
    assert latest is not None
    meta = latest.metadata
    positives = stream.positives
    assert meta["samples_seen"] == len(positives) == RATINGS
    digest = sum(e.event_id.int for e in positives) % 2**64
    assert meta["sample_digest"] == f"{digest:016x}"
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap)
    parts = [
        TopicPartition(settings.kafka.training_topic, p)
        for p in range(settings.kafka.training_topic_partitions)
    ]
    ends = {tp.partition: o for tp, o in consumer.end_offsets(parts).items()}
    consumer.close()
    assert {int(p): o for p, o in meta["offsets"].items()} == ends
    print(
        f"trainer: {meta['duplicates_skipped']} repeated samples skipped; "
        f"training topic {sum(ends.values())} records for {len(positives)} samples"
    )
