"""Freshness as a figure over time: how old the newest event each served model learned is, and
the trainer's lag on the training topic, one point per pipeline snapshot.

The readout publisher adds a point to ``_pipeline.json`` at each publish and carries the series
over from the previous file: the points of the last ``FRESHNESS_WINDOW_MS``, at most
``FRESHNESS_POINTS`` of them. Reading the model registry never fails a publish.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from abtest.snapshot import FreshnessPoint, ModelFreshness, PipelineSnapshot
from core.settings import Settings
from model.checkpoint_registry import CheckpointRegistry, PublishedVersion

__all__ = [
    "FRESHNESS_POINTS",
    "FRESHNESS_WINDOW_MS",
    "FreshnessMinute",
    "freshness_by_minute",
    "freshness_point",
    "freshness_series",
    "registry_freshness",
]

log = logging.getLogger(__name__)

FRESHNESS_WINDOW_MS = 86_400_000
FRESHNESS_POINTS = 2_000


def _model_freshness(published: PublishedVersion, ts_ms: int) -> ModelFreshness:
    meta = published.metadata
    ingest, fresh = meta.get("newest_ingest_ts_ms"), meta.get("freshness_ms")
    return ModelFreshness(
        model=published.model,
        version=published.version,
        published_at_ms=meta.get("published_at_ms"),
        newest_event_age_ms=None if ingest is None else ts_ms - int(ingest),
        freshness_p99_ms=fresh.get("p99") if isinstance(fresh, dict) else None,
    )


def registry_freshness(registry_dir: Path, ts_ms: int) -> list[ModelFreshness]:
    """Each registry model's latest version's freshness at ``ts_ms``; never raises.

    A missing registry (no trainer has published yet) gives no models; an unreadable one, or a
    version with unreadable metadata, is logged and left out.
    """
    registry = CheckpointRegistry(registry_dir)
    try:
        names = registry.models()
    except OSError as exc:
        log.warning("model registry %s unreadable; freshness without models: %s", registry_dir, exc)
        return []
    models = []
    for name in names:
        try:
            published = registry.latest(name)
            if published is not None:
                models.append(_model_freshness(published, ts_ms))
        except Exception as exc:  # a bad metadata file must not stop the pipeline snapshot
            log.warning("freshness of model %r left out: %s: %s", name, type(exc).__name__, exc)
    return models


def freshness_point(settings: Settings, snapshot: PipelineSnapshot) -> FreshnessPoint:
    """The freshness at ``snapshot``'s time: the trainer group's lag on the training topic (None
    when unknown) and every registry model's newest learned event age."""
    lag = next(
        (
            c.lag
            for c in snapshot.consumer_lag
            if c.group == settings.trainer.group_id and c.topic == settings.kafka.training_topic
        ),
        None,
    )
    ts_ms = snapshot.generated_at_ms
    return FreshnessPoint(
        ts_ms=ts_ms, training_lag=lag, models=registry_freshness(settings.registry_dir, ts_ms)
    )


def freshness_series(
    previous: PipelineSnapshot | None, point: FreshnessPoint
) -> list[FreshnessPoint]:
    """The previous series within the window before ``point`` (a clock stepped back drops the
    points after it), then ``point``; the newest ``FRESHNESS_POINTS``."""
    since_ms = point.ts_ms - FRESHNESS_WINDOW_MS
    kept = [p for p in (previous.freshness if previous else []) if since_ms < p.ts_ms < point.ts_ms]
    return [*kept, point][-FRESHNESS_POINTS:]


@dataclass(frozen=True)
class FreshnessMinute:
    """The worst freshness among the points of one minute: the trainer's largest lag on the
    training topic and the oldest newest-learned event among the models (None: not known)."""

    start_ms: int
    points: int
    max_training_lag: int | None
    max_event_age_ms: int | None
    oldest_model: str | None

    def kept_up(self, lag_limit: int, age_limit_ms: int) -> bool:
        """Both figures known and under their limits."""
        return (
            self.max_training_lag is not None
            and self.max_training_lag < lag_limit
            and self.max_event_age_ms is not None
            and self.max_event_age_ms < age_limit_ms
        )


def freshness_by_minute(
    series: list[FreshnessPoint], start_ms: int, end_ms: int, models: set[str] | None = None
) -> list[FreshnessMinute]:
    """The points in ``[start_ms, end_ms]`` grouped into whole minutes from ``start_ms`` (the last
    one may be shorter), each minute's worst lag and worst model age; ``models`` limits the ages
    to those models (e.g. the served ones), and a point that lacks one of them leaves the
    minute's age unknown. A minute without points is left out."""
    if end_ms < start_ms:
        raise ValueError(f"the window ends ({end_ms}) before it starts ({start_ms})")
    minutes: dict[int, list[FreshnessPoint]] = {}
    for point in series:
        if start_ms <= point.ts_ms <= end_ms:
            minutes.setdefault((point.ts_ms - start_ms) // 60_000, []).append(point)
    return [_worst(start_ms + i * 60_000, minutes[i], models) for i in sorted(minutes)]


def _worst(start_ms: int, points: list[FreshnessPoint], models: set[str] | None) -> FreshnessMinute:
    lags = [p.training_lag for p in points]
    ages = [
        (m.newest_event_age_ms, m.model)
        for p in points
        for m in p.models
        if m.newest_event_age_ms is not None and (models is None or m.model in models)
    ]
    known = models is None or all(
        models <= {m.model for m in p.models if m.newest_event_age_ms is not None} for p in points
    )
    oldest = max(ages) if ages and known else None
    return FreshnessMinute(
        start_ms=start_ms,
        points=len(points),
        max_training_lag=None if None in lags else max(lag for lag in lags if lag is not None),
        max_event_age_ms=oldest[0] if oldest else None,
        oldest_model=oldest[1] if oldest else None,
    )
