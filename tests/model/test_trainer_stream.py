"""The online trainer on the real broker: SIGKILLed at random moments, it still learns every
produced sample exactly once."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from core.movielens import load_ratings
from core.settings import Settings
from hymirec.processes import ServiceProcess
from model.checkpoint_registry import CheckpointRegistry
from model.training.online import load_version_model
from streaming.kafka_io import ensure_topics
from streaming.schema import TrainingSample
from tests.conftest import end_offsets, wait_until

pytestmark = pytest.mark.integration

MODELS = ("sasrec", "popular")


def _samples(count: int) -> list[TrainingSample]:
    """The first ``count`` ML-100K ratings as the stream worker would turn them into samples."""
    histories: dict[int, list[int]] = {}
    out = []
    for row in load_ratings().head(count).itertuples():
        items = histories.setdefault(int(row.user_id), [])
        out.append(
            TrainingSample(
                event_id=uuid.uuid4(),
                user_id=int(row.user_id),
                item_id=int(row.item_id),
                event_type="rating",
                ts_ms=int(row.ts_ms),
                seq=len(items),
                recent_item_ids=items[-50:],
                ingest_ts_ms=int(time.time() * 1000),
            )
        )
        items.append(int(row.item_id))
    return out


def _produce(
    settings: Settings, samples: list[TrainingSample], bad: tuple[bytes, ...] = ()
) -> None:
    """Keyed by user, as the stream worker sends them (one user's samples stay in order)."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all", linger_ms=5)
    for sample in samples:
        producer.send(
            settings.kafka.training_topic,
            key=str(sample.user_id).encode(),
            value=sample.model_dump_json().encode(),
        )
    for value in bad:
        producer.send(settings.kafka.training_topic, key=b"bad", value=value)
    producer.flush()
    producer.close()


def test_killed_trainer_learns_every_sample_exactly_once(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        trainer_models=",".join(MODELS),
        trainer_publish_every_samples=400,
        trainer_publish_every_s=1.0,
        trainer_batch_size=128,
    )
    ensure_topics(settings.kafka)
    samples = _samples(6000)
    # Repeats (as an at-least-once worker would send them) and records that are not samples.
    repeats = random.Random(0).sample(samples[:3000], 50)
    bad = [b"{not json", b'{"schema_version": 1, "user_id": "x"}']
    _produce(settings, samples[:3000] + repeats, tuple(bad))
    store = CheckpointRegistry(settings.registry_dir)
    rng = random.Random(7)
    kills = 0
    for round_ in range(4):
        trainer = ServiceProcess("trainer", ["trainer"], settings).start()
        try:

            def ready(trainer: ServiceProcess = trainer, starts: int = round_ + 1) -> bool:
                # The log file is shared by the restarts: count the readiness lines.
                return trainer.tail(100_000).count("trainer ready") >= starts or not trainer.alive()

            wait_until(ready, 180, "the trainer to start")
            assert trainer.alive(), trainer.tail()
            if round_ == 1:
                _produce(settings, samples[3000:])  # the stream goes on while it trains

            def finished() -> bool:
                latest = store.latest("sasrec")
                return latest is not None and latest.metadata["samples_seen"] == len(samples)

            if round_ < 3:
                before = store.latest_version("sasrec")

                def moved(before: str | None = before, trainer: ServiceProcess = trainer) -> bool:
                    assert trainer.alive(), trainer.tail()
                    return store.latest_version("sasrec") != before or finished()

                wait_until(moved, 120, "a new sasrec version")
                time.sleep(rng.uniform(0.0, 1.5))  # the fault: a random moment after a publish
                trainer.kill()
                kills += 1
                continue
            wait_until(finished, 300, "every sample in the latest sasrec version")
        finally:
            trainer.stop()
    assert kills == 3
    expected_digest = sum(s.event_id.int for s in samples) % 2**64
    ends = end_offsets(settings, settings.kafka.training_topic)
    for name in MODELS:
        latest = store.latest(name)
        assert latest is not None
        meta = latest.metadata
        assert meta["samples_seen"] == len(samples), name
        assert meta["sample_digest"] == f"{expected_digest:016x}", name
        assert {int(p): o for p, o in meta["offsets"].items()} == ends, name
        assert meta["duplicates_skipped"] == len(repeats), name
        assert meta["freshness_ms"] is None or meta["freshness_ms"]["p99"] >= 0
        # The prequential metrics say how many probes they ranked, of how many.
        ranked = meta["prequential"]
        assert ranked["ranked"] <= ranked["probes"] <= ranked["samples_learned"], name
        assert ranked["samples_learned"] == meta["samples_in_version"], name
    # The bad records were dead-lettered, with their reason.
    consumer = KafkaConsumer(
        settings.kafka.dead_letter_topic,
        bootstrap_servers=settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=3000,
    )
    dead = list(consumer)
    consumer.close()
    # Dead letters are at least once: a crash before the next publish re-sends them.
    by_source = {dict(r.headers)["source"]: r.value for r in dead}
    assert sorted(by_source.values()) == sorted(bad)
    assert {dict(r.headers)["reason"] for r in dead} == {b"validation"}
    # A served copy loads and ranks.
    from model.data import build_catalog

    latest = store.latest("sasrec")
    assert latest is not None
    model = load_version_model(latest, build_catalog(settings))
    assert not model.training


def test_second_trainer_on_the_same_registry_is_refused(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(trainer_models="popular")
    with CheckpointRegistry(settings.registry_dir).lock():
        result = ServiceProcess("trainer2", ["trainer", "--max-idle", "1"], settings)
        result.start()
        wait_until(lambda: not result.alive(), 120, "the refused trainer to exit")
        assert "another trainer" in result.tail()


def test_trainer_starts_from_offline_checkpoints(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """``--init-from``: the offline weights are the first version, the samples already in the
    topic count as learned by them (absorbed, not trained on), and learning goes on from there."""
    import shutil

    import torch

    from model.data import build_catalog, load_movielens_sequences
    from model.training.offline import load_checkpoint
    from model.training.pretrain import pretrained_checkpoint, pretrained_filename

    settings = make_settings(
        trainer_models=",".join(MODELS),
        trainer_publish_every_samples=100,
        trainer_publish_every_s=1.0,
    )
    ensure_topics(settings.kafka)
    catalog = build_catalog(settings)
    init = tmp_path / "init"
    init.mkdir()
    missing = ServiceProcess(
        "trainer-missing", ["trainer", "--init-from", str(init), "--max-idle", "1"], settings
    ).start()
    wait_until(lambda: not missing.alive(), 120, "the trainer to refuse a missing checkpoint")
    assert "no sasrec.pt for model 'sasrec'" in missing.tail() or "no popular.pt" in missing.tail()
    data = load_movielens_sequences()
    for name in MODELS:
        path, _ = pretrained_checkpoint(name, catalog, data, tmp_path / "cache", epochs=1)
        shutil.copyfile(path, init / pretrained_filename(name))
    samples = _samples(1500)
    _produce(settings, samples[:1200])
    store = CheckpointRegistry(settings.registry_dir)
    trainer = ServiceProcess("trainer", ["trainer", "--init-from", str(init)], settings).start()
    try:
        wait_until(
            lambda: all(store.latest(m) is not None for m in MODELS) or not trainer.alive(),
            180,
            "the offline versions",
        )
        assert trainer.alive(), trainer.tail()
        offline = load_checkpoint(init / "sasrec.pt", catalog).model.state_dict()
        first = store.latest("sasrec")
        assert first is not None
        published = load_version_model(first, catalog).state_dict()
        assert all(torch.equal(offline[k], published[k]) for k in offline)
        meta = first.metadata
        assert meta["samples_seen"] == 1200 and meta["origin"]["absorbed_samples"] == 1200
        assert meta["origin"]["kind"] == "offline_checkpoint"
        assert "prequential" not in meta or meta["prequential"]["probes"] == 0
        _produce(settings, samples[1200:])

        def learned_all() -> bool:
            assert trainer.alive(), trainer.tail()
            latest = store.latest("sasrec")
            return latest is not None and latest.metadata["samples_seen"] == len(samples)

        wait_until(learned_all, 180, "the online samples learned")
    finally:
        trainer.stop()
    latest = store.latest("sasrec")
    assert latest is not None
    meta = latest.metadata
    assert meta["origin"]["absorbed_samples"] == 1200  # the online 300 were learned, not absorbed
    assert meta["sample_digest"] == f"{sum(s.event_id.int for s in samples) % 2**64:016x}"
    assert meta["offsets"] == {
        str(p): o for p, o in end_offsets(settings, settings.kafka.training_topic).items()
    }
