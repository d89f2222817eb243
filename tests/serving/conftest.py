"""A serving world built once per session and copied per test: item features and the codebook,
a Feast online store holding every ML-100K user's history in exactly the row shape the stream
worker pushes, and sasrec, hymirec and popular versions trained briefly on the first ratings."""

from __future__ import annotations

import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kafka import KafkaConsumer, TopicPartition

from core.movielens import load_ratings, replay_histories
from core.settings import Settings
from features.codebook import ResidualCodebook
from features.item_features import ItemCodeTable, build_item_features
from features.store import FeatureStoreClient, UserHistoryFeatures
from model.base import CatalogInfo
from model.checkpoint_registry import CheckpointRegistry
from model.data import build_catalog
from model.training.online import ModelTrainer, StreamRecord, TrainerOptions
from streaming.broker import LocalBroker
from streaming.kafka_io import ensure_topics
from streaming.schema import TrainingSample, exposure_impressions, parse_event
from tests.conftest import EMBEDDING_CACHE

TRAIN_RATINGS = 2000  # the first ratings, learned by the template's versions
CHUNK = 300  # ratings per extra version (hot-swap tests)
MODELS = ("sasrec", "hymirec", "popular")

EXPERIMENTS_YAML = """
default_model: sasrec
holdout: {{salt: serve-holdout-{tag}, percent: {holdout}}}
layers:
  - {{name: ranking, salt: serve-ranking-{tag}}}
  - {{name: ui, salt: serve-ui-{tag}}}
experiments:
  - name: models-ab
    layer: ranking
    salt: models-ab-{tag}
    range: [0.0, 1.0]
    variants:
      - {{name: control, weight: 1, model: sasrec}}
      - {{name: treatment, weight: 1, model: hymirec}}
  - name: page-size
    layer: ui
    salt: page-size-{tag}
    range: [0.0, 0.5]
    variants:
      - {{name: small, weight: 1, params: {{page_size: 5}}}}
      - {{name: large, weight: 1, params: {{page_size: 20}}}}
"""


def history_row(
    user: int, items: np.ndarray, settings: Settings, codebook: ResidualCodebook,
    table: ItemCodeTable,
) -> UserHistoryFeatures:  # fmt: skip
    """The row ``streaming.app`` pushes for a user whose history is ``items`` (oldest first)."""
    kept = items[-settings.features.long_len :]
    return UserHistoryFeatures(
        user_id=user,
        recent_item_ids=[int(i) for i in kept[-settings.features.recent_len :]],
        long_codes=codebook.pack(table.lookup(kept)),
        history_len=len(items),
        last_ts_ms=1_000 * len(items),
        last_offset=len(items) - 1,
        codebook_version=codebook.version,
    )


def training_records(first: int, count: int) -> list[StreamRecord]:
    """Training samples of ratings ``first .. first + count - 1`` (replay order), as the stream
    worker would have sent them (per-user seq numbers and recent items)."""
    ratings = load_ratings().head(first + count)
    seqs: dict[int, list[int]] = {}
    records = []
    for offset, row in enumerate(ratings.itertuples()):
        items = seqs.setdefault(int(row.user_id), [])
        sample = TrainingSample(
            event_id=uuid.uuid5(uuid.NAMESPACE_OID, f"rating-{offset}"),
            user_id=int(row.user_id),
            item_id=int(row.item_id),
            event_type="rating",
            ts_ms=int(row.ts_ms),
            seq=len(items),
            recent_item_ids=items[-50:],
        )
        items.append(int(row.item_id))
        if offset >= first:
            records.append(StreamRecord(0, offset, sample, int(time.time() * 1000)))
    return records


def reference_seen(settings: Settings, catalog: CatalogInfo, items: np.ndarray) -> set[int]:
    """What the ranking must leave out, computed independently of ``serving.features``: the R
    recent ids, plus every long-history item whose code tuple no other catalogue item has."""
    codes = [tuple(row) for row in catalog.codes[1:].tolist()]
    unknown = catalog.codebook_scales.shape[1]
    counts = Counter(c for c in codes if any(x != unknown for x in c))
    kept = items[-settings.features.long_len :]
    unique = {int(i) for i in kept if counts.get(codes[int(i) - 1], 0) == 1}
    return {int(i) for i in kept[-settings.features.recent_len :]} | unique


@dataclass
class Template:
    data_dir: Path
    histories: dict[int, np.ndarray]


@pytest.fixture(scope="session")
def serving_template(tmp_path_factory: pytest.TempPathFactory, broker: LocalBroker) -> Template:
    data_dir = tmp_path_factory.mktemp("serving-template") / "data"
    settings = Settings(data_dir=data_dir, cache_dir=EMBEDDING_CACHE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        built = build_item_features(settings)
        histories = replay_histories(load_ratings())
        rows = [
            history_row(u, items, settings, built.codebook, built.table)
            for u, items in histories.items()
        ]
        store = FeatureStoreClient(settings)
        for start in range(0, len(rows), 200):
            store.push_user_histories(rows[start : start + 200])
        catalog = build_catalog(settings)
        registry = CheckpointRegistry(settings.registry_dir)
        records = training_records(0, TRAIN_RATINGS)
        for name in MODELS:
            trainer = ModelTrainer(name, catalog, TrainerOptions())
            trainer.learn(records)
            trainer.publish(registry, "training", keep=100)
    finally:
        torch.set_num_threads(threads)
    return Template(data_dir, histories)


@dataclass
class World:
    settings: Settings
    histories: dict[int, np.ndarray]
    registry: CheckpointRegistry

    def catalog(self) -> CatalogInfo:
        return build_catalog(self.settings)

    def trainer(self, name: str, catalog: CatalogInfo) -> ModelTrainer:
        published = self.registry.latest(name)
        assert published is not None
        return ModelTrainer.resume(published, catalog, TrainerOptions())


@pytest.fixture
def make_world(
    serving_template: Template, make_settings: Callable[..., Settings], tmp_path: Path
) -> Callable[..., World]:
    """A copy of the template in this test's data dir; ``models`` picks the registry folders
    copied; other keywords are settings (``holdout`` is the holdout percent)."""

    def build(models: tuple[str, ...] = MODELS, holdout: float = 0, **overrides: Any) -> World:
        data_dir = tmp_path / "data"
        shutil.copytree(
            serving_template.data_dir,
            data_dir,
            ignore=shutil.ignore_patterns("model_registry"),
        )
        for name in models:
            shutil.copytree(
                serving_template.data_dir / "model_registry" / name,
                data_dir / "model_registry" / name,
            )
        tag = uuid.uuid4().hex[:8]
        experiments = tmp_path / "experiments.yaml"
        experiments.write_text(EXPERIMENTS_YAML.format(tag=tag, holdout=holdout))
        settings = make_settings(data_dir=data_dir, experiments_file=experiments, **overrides)
        ensure_topics(settings.kafka)
        registry = CheckpointRegistry(settings.registry_dir)
        return World(settings, serving_template.histories, registry)

    return build


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """The service sets one torch thread per request thread, process-wide: undo it after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_impressions(
    settings: Settings, request_ids: set[str], expected: int, timeout_s: float = 60.0
) -> list[dict[str, Any]]:
    """The impressions of these requests on the events topic, once ``expected`` arrived (fewer at
    the deadline: what arrived, for the assertion to show). The service sends one ``exposure``
    record per request and layer; it is read as the impressions the ClickHouse sink stores."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=500,
    )
    partitions = range(settings.kafka.events_topic_partitions)
    consumer.assign([TopicPartition(settings.kafka.events_topic, p) for p in partitions])
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < expected and time.monotonic() < deadline:
            for record in consumer:
                event = parse_event(record.value, settings.kafka.max_event_bytes)
                if event.request_id not in request_ids:
                    continue
                assert event.event_type == "exposure", event
                found.extend(e.model_dump(mode="json") for e in exposure_impressions(event))
    finally:
        consumer.close()
    return found
