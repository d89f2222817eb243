"""The freshness series in ``_pipeline.json``: the trainer's lag and each model's newest event age.

Kafka is replaced by a fixed pipeline snapshot (the broker-side lag has its own tests in
``tests/dashboard/test_publish.py``); the registry is real files in the registry's format.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

import abtest.publish
from abtest.freshness import FRESHNESS_POINTS, FRESHNESS_WINDOW_MS
from abtest.publish import publish_pipeline_health
from abtest.snapshot import (
    PIPELINE_FILE,
    SNAPSHOT_SCHEMA_VERSION,
    ConsumerLag,
    FreshnessPoint,
    ModelFreshness,
    PipelineSnapshot,
    read_pipeline_snapshot,
    write_json_atomic,
)
from core.settings import Settings
from model.checkpoint_registry import REGISTRY_FORMAT

NOW_MS = 1_700_000_600_000
HOUR_MS = 3_600_000


def write_version(registry: Path, model: str, version: str, latest: bool, **meta: Any) -> None:
    """A complete version folder as ``CheckpointRegistry.publish`` leaves it."""
    folder = registry / model / version
    folder.mkdir(parents=True)
    body = {"format": REGISTRY_FORMAT, "model": model, "version": version} | meta
    (folder / "metadata.json").write_text(json.dumps(body))
    if latest:
        (registry / model / "LATEST").write_text(version + "\n")


def lag(group: str, topic: str, value: int | None) -> ConsumerLag:
    return ConsumerLag(
        group=group,
        role=group,
        topic=topic,
        partitions=1,
        committed_partitions=1,
        end_offset=value,
        committed_offset=0,
        lag=value,
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture(autouse=True)
def previous_seen(monkeypatch: pytest.MonkeyPatch) -> list[PipelineSnapshot | None]:
    """Fixes the pipeline health (trainer lag 123 on the training topic); records ``previous``."""
    previous_seen: list[PipelineSnapshot | None] = []

    def fake_health(
        settings: Settings, previous: PipelineSnapshot | None = None, *, now_ms: int | None = None
    ) -> PipelineSnapshot:
        previous_seen.append(previous)
        assert now_ms is not None
        return PipelineSnapshot(
            schema_version=SNAPSHOT_SCHEMA_VERSION,
            generated_at_ms=now_ms,
            bootstrap=settings.kafka.bootstrap,
            reachable=True,
            error=None,
            events_topic=settings.kafka.events_topic,
            events_end_offset=None,
            events_per_s=None,
            rate_interval_s=None,
            dead_letter_topic=settings.kafka.dead_letter_topic,
            dead_letter_records=None,
            consumer_lag=[
                lag(settings.sink.group_id, settings.kafka.events_topic, 999),
                lag(settings.trainer.group_id, settings.kafka.events_topic, 888),  # not its topic
                lag(settings.trainer.group_id, settings.kafka.training_topic, 123),
            ],
        )

    monkeypatch.setattr(abtest.publish, "pipeline_health", fake_health)
    return previous_seen


def test_ages_of_two_models_are_computed_from_their_latest_versions(settings: Settings) -> None:
    registry = settings.registry_dir
    write_version(
        registry,
        "sasrec",
        "v000001",
        latest=False,
        published_at_ms=NOW_MS - 90_000,
        newest_ingest_ts_ms=NOW_MS - 100_000,
        freshness_ms={"p50": 1.0, "p99": 2.0, "max": 3.0},
    )
    write_version(
        registry,
        "sasrec",
        "v000002",
        latest=True,
        published_at_ms=NOW_MS - 20_000,
        newest_event_ts_ms=NOW_MS - 40_000,
        newest_ingest_ts_ms=NOW_MS - 25_000,
        newest_event_age_ms=5_000,
        freshness_ms={"p50": 1_500.0, "p99": 4_200.0, "max": 6_000.0},
    )
    write_version(
        registry,
        "hymirec",
        "v000007",
        latest=True,
        published_at_ms=NOW_MS - 3_000,
        newest_ingest_ts_ms=NOW_MS - 61_500,
        freshness_ms={"p50": 20_000.0, "p99": 58_000.0, "max": 60_000.0},
    )

    snapshot = publish_pipeline_health(settings, now_ms=NOW_MS)

    [point] = snapshot.freshness
    assert point.ts_ms == NOW_MS and point.training_lag == 123
    assert point.models == [
        ModelFreshness(
            model="hymirec",
            version="v000007",
            published_at_ms=NOW_MS - 3_000,
            newest_event_age_ms=61_500,
            freshness_p99_ms=58_000.0,
        ),
        ModelFreshness(
            model="sasrec",
            version="v000002",
            published_at_ms=NOW_MS - 20_000,
            newest_event_age_ms=25_000,  # now − its newest ingest, not the age at publish
            freshness_p99_ms=4_200.0,
        ),
    ]
    assert read_pipeline_snapshot(settings.readouts_dir / PIPELINE_FILE) == snapshot


def test_a_version_without_samples_has_no_age(settings: Settings) -> None:
    write_version(
        settings.registry_dir,
        "popular",
        "v000001",
        latest=True,
        published_at_ms=NOW_MS,
        newest_ingest_ts_ms=None,
        freshness_ms=None,
    )
    [point] = publish_pipeline_health(settings, now_ms=NOW_MS).freshness
    [model] = point.models
    assert model.newest_event_age_ms is None and model.freshness_p99_ms is None


def test_a_missing_or_unreadable_registry_never_fails_the_publish(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    [point] = publish_pipeline_health(settings, now_ms=NOW_MS).freshness  # no registry yet
    assert point.models == [] and point.training_lag == 123

    registry = settings.registry_dir
    write_version(registry, "good", "v000001", latest=True, newest_ingest_ts_ms=NOW_MS - 1_000)
    write_version(registry, "typed", "v000001", latest=True, newest_ingest_ts_ms="soon")
    write_version(registry, "listed", "v000001", latest=True)
    (registry / "listed" / "v000001" / "metadata.json").write_text("[1, 2]")
    write_version(registry, "broken", "v000001", latest=True)
    (registry / "broken" / "v000001" / "metadata.json").write_text("{half")
    (registry / "pruned").mkdir()
    (registry / "pruned" / "LATEST").write_text("v000009\n")  # names a missing version

    with caplog.at_level(logging.WARNING, logger="abtest.publish"):
        snapshot = publish_pipeline_health(settings, now_ms=NOW_MS + 1_000)
    assert [m.model for m in snapshot.freshness[-1].models] == ["good"]
    assert snapshot.freshness[-1].models[0].newest_event_age_ms == 2_000
    assert len(snapshot.freshness) == 2
    logged = " ".join(r.getMessage() for r in caplog.records)
    for name in ("typed", "listed", "broken", "pruned"):
        assert f"freshness of model {name!r} left out" in logged


def point_at(ts_ms: int) -> FreshnessPoint:
    return FreshnessPoint(ts_ms=ts_ms, training_lag=ts_ms % 1_000, models=[])


def write_previous(settings: Settings, points: list[FreshnessPoint]) -> None:
    publish_pipeline_health(settings, now_ms=NOW_MS - 10 * HOUR_MS)  # any valid file
    path = settings.readouts_dir / PIPELINE_FILE
    previous = read_pipeline_snapshot(path)
    write_json_atomic(path, previous.model_copy(update={"freshness": points}))


def test_the_series_carries_over_between_publishes(settings: Settings) -> None:
    for k in range(3):
        snapshot = publish_pipeline_health(settings, now_ms=NOW_MS + k * 10_000)
    assert [p.ts_ms for p in snapshot.freshness] == [NOW_MS, NOW_MS + 10_000, NOW_MS + 20_000]
    assert read_pipeline_snapshot(settings.readouts_dir / PIPELINE_FILE).freshness == (
        snapshot.freshness
    )


def test_the_series_keeps_the_last_24_hours(settings: Settings) -> None:
    old = [
        NOW_MS - FRESHNESS_WINDOW_MS - 1,
        NOW_MS - FRESHNESS_WINDOW_MS,  # exactly 24 h old: out
        NOW_MS - 23 * HOUR_MS,
        NOW_MS - 1,
        NOW_MS + 5_000,  # after now: the clock stepped back, so it is dropped
    ]
    write_previous(settings, [point_at(t) for t in old])
    snapshot = publish_pipeline_health(settings, now_ms=NOW_MS)
    assert [p.ts_ms for p in snapshot.freshness] == [NOW_MS - 23 * HOUR_MS, NOW_MS - 1, NOW_MS]


def test_the_series_is_capped(settings: Settings) -> None:
    old = [point_at(NOW_MS - (FRESHNESS_POINTS - k) * 10_000) for k in range(FRESHNESS_POINTS)]
    write_previous(settings, old)
    snapshot = publish_pipeline_health(settings, now_ms=NOW_MS)
    assert len(snapshot.freshness) == FRESHNESS_POINTS == 2_000
    assert snapshot.freshness[:-1] == old[1:]
    assert snapshot.freshness[-1].ts_ms == NOW_MS


def test_an_old_pipeline_file_without_the_series_still_reads(
    settings: Settings, previous_seen: list[PipelineSnapshot | None]
) -> None:
    publish_pipeline_health(settings, now_ms=NOW_MS)
    path = settings.readouts_dir / PIPELINE_FILE
    raw = json.loads(path.read_text())
    del raw["freshness"]  # as written before the series existed
    path.write_text(json.dumps(raw))

    old = read_pipeline_snapshot(path)
    assert old.freshness == [] and old.generated_at_ms == NOW_MS
    snapshot = publish_pipeline_health(settings, now_ms=NOW_MS + 10_000)
    assert previous_seen[-1] == old  # still the previous file (for the event rate)
    assert [p.ts_ms for p in snapshot.freshness] == [NOW_MS + 10_000]
