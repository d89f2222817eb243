"""The streaming feature pipeline on real components: broker → Faust worker → Feast online.

Replays all 100,000 MovieLens-100K ratings and checks every user's online features against the
history computed straight from the file; then feeds bad records between valid ones and checks the
dead-letter topic, the worker's survival and the valid events' effect.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from core.movielens import load_ratings, replay_histories
from core.settings import Settings
from features.item_features import ItemFeatures, build_item_features
from features.store import FeatureStoreClient
from hymirec.demo import wait_for_histories
from hymirec.processes import ServiceProcess
from streaming.kafka_io import EventProducer, ensure_topics, event_key
from streaming.replay import movielens_events, replay_events
from streaming.schema import Event

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def read_topic(settings: Settings, topic: str, expected: int, timeout_s: float = 60) -> list:
    """Every record of ``topic`` once ``expected`` are there (fails on fewer after the timeout)."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=2000,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=32 * 1024 * 1024,
    )
    partitions = [TopicPartition(topic, p) for p in range(settings.kafka.events_topic_partitions)]
    consumer.assign(partitions)
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        records.extend(consumer)
    consumer.close()
    return records


@pytest.fixture
def pipeline(make_settings: Callable[..., Settings]) -> Iterator[tuple[Settings, ItemFeatures]]:
    # P=300 < the heaviest users' 737 ratings, so truncation of the long history is exercised.
    settings = make_settings(features_recent_len=20, features_long_len=300)
    ensure_topics(settings.kafka)
    built = build_item_features(settings)
    worker = ServiceProcess("worker", ["worker"], settings).start()
    try:
        yield settings, built
        assert worker.alive(), f"the worker died:\n{worker.tail()}"
    finally:
        worker.stop()


@pytest.mark.parametrize(
    "count",
    [
        # The first 20,000 ratings in replay order (215 users, 5 of them past P = 300); all
        # 100,000 under `slow` (benchmarks/pipeline_throughput.py times the whole replay too).
        20_000,
        pytest.param(100_000, marks=pytest.mark.slow),
    ],
)
def test_replaying_movielens_gives_exact_online_histories(
    pipeline: tuple[Settings, ItemFeatures], count: int
) -> None:
    settings, built = pipeline
    ratings = load_ratings().head(count)
    histories = replay_histories(ratings)
    with EventProducer(settings.kafka) as producer:
        assert replay_events(producer, movielens_events(ratings)) == count

    store = FeatureStoreClient(settings)
    expected = {user: len(items) for user, items in histories.items()}
    wait_for_histories(store, expected, timeout_s=600)
    online = store.user_histories(sorted(histories))
    codebook, table = built.codebook, built.table
    last_ts = ratings.groupby("user_id")["ts_ms"].max()
    for user, items in histories.items():
        row = online[user]
        assert row is not None
        assert row.recent_item_ids == items[-settings.features.recent_len :].tolist(), (
            f"user {user}"
        )
        assert row.history_len == len(items)
        assert row.last_ts_ms == last_ts[user]
        assert row.codebook_version == codebook.version
        codes = codebook.unpack(row.long_codes)
        long_items = items[-settings.features.long_len :]
        np.testing.assert_array_equal(codes, table.lookup(long_items), err_msg=f"user {user}")
        # Decoding the pushed codes gives the codebook's reconstruction of those very items.
        rows = np.searchsorted(table.item_ids, long_items)
        reference = codebook.decode(codebook.encode(built.embeddings[rows]))
        np.testing.assert_allclose(codebook.decode(codes), reference, rtol=0, atol=1e-6)

    # One training sample per positive event, each user's numbered 0..n-1 in order.
    samples = read_topic(settings, settings.kafka.training_topic, expected=count)
    assert len(samples) == count
    seqs: dict[int, list[int]] = defaultdict(list)
    for record in samples:
        sample = json.loads(record.value)
        seqs[sample["user_id"]].append(sample["seq"])
    assert {u: s for u, s in seqs.items()} == {u: list(range(n)) for u, n in expected.items()}


def test_bad_records_go_to_the_dead_letter_topic_and_valid_ones_are_processed(
    pipeline: tuple[Settings, ItemFeatures],
) -> None:
    settings, _ = pipeline

    def valid(user: int, item: int) -> bytes:
        return Event(
            event_id=uuid.uuid4(), user_id=user, item_id=item, event_type="play", ts_ms=item
        ).to_json_bytes()

    good = json.loads(valid(1, 1))
    bad = {
        "malformed_json": b'{"event_id": "abc", ',
        "missing_field": json.dumps({k: v for k, v in good.items() if k != "item_id"}).encode(),
        "wrong_type": json.dumps({**good, "user_id": "seven"}).encode(),
        "unknown_type": json.dumps({**good, "event_type": "purchase"}).encode(),
        "not_utf8": b"\xff\xfe\xfa",
        "huge": b'{"pad": "' + b"x" * (10 * 1024 * 1024) + b'"}',
    }
    expected_reason = {
        "malformed_json": "malformed_json",
        "missing_field": "validation",
        "wrong_type": "validation",
        "unknown_type": "validation",
        "not_utf8": "malformed_json",
        "huge": "too_large",
    }
    users = [501, 502, 503]
    sent_valid: dict[int, list[int]] = {u: [] for u in users}
    with EventProducer(settings.kafka) as producer:
        for round_ in range(3):
            for payload in bad.values():
                user = users[round_ % len(users)]
                item = 100 * round_ + len(sent_valid[user]) + 1
                producer.send_raw(event_key(user), valid(user, item))
                sent_valid[user].append(item)
                for _ in range(2):  # a repeated bad record is dead-lettered each time
                    producer.send_raw(event_key(user), payload)

    store = FeatureStoreClient(settings)
    wait_for_histories(store, {u: len(v) for u, v in sent_valid.items()}, timeout_s=120)
    online = store.user_histories(users)
    for user in users:
        assert online[user] is not None
        assert online[user].recent_item_ids == sent_valid[user]

    dead = read_topic(settings, settings.kafka.dead_letter_topic, expected=2 * 3 * len(bad))
    assert len(dead) == 2 * 3 * len(bad)
    by_payload = defaultdict(list)
    for record in dead:
        headers = dict(record.headers)
        by_payload[record.value].append(headers["reason"].decode())
        assert headers["error"] and headers["source"].startswith(
            settings.kafka.events_topic.encode()
        )
    for name, payload in bad.items():
        # Each bad record is kept whole (the 10 MB one too) with the reason it was refused.
        assert by_payload[payload] == [expected_reason[name]] * 6, name
