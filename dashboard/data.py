"""What the dashboard reads, validated, and the tables it shows: pure where possible.

Three sources, all read-only: the readout snapshots that ``abtest.publish`` writes (one JSON per
experiment and ``_pipeline.json``), the model registry's metadata
(``<registry_dir>/<model>/LATEST`` and ``<version>/metadata.json``), and the recommendation
service's ``GET /status``. The dashboard never opens ClickHouse: on chdb the sink owns it.
A bad file is reported for itself (an error string), never as an exception that hides the rest.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from abtest.snapshot import (
    PIPELINE_FILE,
    CumulativeSeries,
    ExperimentSnapshot,
    GroundTruth,
    PipelineSnapshot,
    read_experiment_snapshot,
    read_pipeline_snapshot,
)
from core.errors import DataError

__all__ = [
    "FreshnessPercentiles",
    "ModelHistory",
    "ModelMetadata",
    "ReadoutFolder",
    "ServiceProbe",
    "TrueLift",
    "cumulative_frame",
    "effects_frame",
    "fetch_service_status",
    "freshness_age_frame",
    "ground_truth_frame",
    "lag_frame",
    "load_readouts",
    "load_registry",
    "model_versions_frame",
    "traffic_frame",
    "training_lag_frame",
    "true_lifts",
]


@dataclass(frozen=True)
class ReadoutFolder:
    """The snapshots found in a folder; ``errors`` maps an unreadable file's name to the reason."""

    folder: Path
    experiments: dict[str, ExperimentSnapshot]
    errors: dict[str, str]
    pipeline: PipelineSnapshot | None
    pipeline_error: str | None

    @property
    def empty(self) -> bool:
        return not self.experiments and not self.errors


def load_readouts(folder: Path) -> ReadoutFolder:
    """Every ``*.json`` snapshot in ``folder`` (dot files are the publisher's temporary files)."""
    experiments: dict[str, ExperimentSnapshot] = {}
    errors: dict[str, str] = {}
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    for path in files:
        if path.name.startswith(".") or path.name == PIPELINE_FILE:
            continue
        try:
            snap = read_experiment_snapshot(path)
        except DataError as exc:
            errors[path.name] = str(exc)
            continue
        experiments[snap.experiment] = snap
    pipeline, pipeline_error = None, None
    if (folder / PIPELINE_FILE).is_file():
        try:
            pipeline = read_pipeline_snapshot(folder / PIPELINE_FILE)
        except DataError as exc:
            pipeline_error = str(exc)
    return ReadoutFolder(folder, experiments, errors, pipeline, pipeline_error)


def effects_frame(snap: ExperimentSnapshot) -> pd.DataFrame:
    """One row per metric × treatment, with the columns the tables and the forest plot use."""
    rows = [e.model_dump() for e in snap.effects]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["label"] = frame["metric"] + " · " + frame["treatment"]
    frame["verdict"] = [
        _verdict(r.significant_holm, r.effect_abs, r.higher_is_better)
        for r in frame.itertuples(index=False)
    ]
    return frame


def _verdict(significant: bool, effect: float | None, higher_is_better: bool) -> str:
    if not significant or effect is None or effect == 0:
        return "not significant"
    better = effect > 0 if higher_is_better else effect < 0
    return "better" if better else "worse"


def cumulative_frame(series: CumulativeSeries) -> pd.DataFrame:
    """The series' points with a datetime column for the time axis."""
    frame = pd.DataFrame([p.model_dump() for p in series.points])
    frame["time"] = pd.to_datetime(frame["ts_ms"], unit="ms", utc=True)
    return frame


def traffic_frame(snap: ExperimentSnapshot) -> pd.DataFrame:
    """Cumulative users per variant over time (long format)."""
    frame = pd.DataFrame([t.model_dump() for t in snap.traffic])
    if not frame.empty:
        frame["time"] = pd.to_datetime(frame["ts_ms"], unit="ms", utc=True)
    return frame


EXPECTED, OBSERVED = "expected (ground truth)", "observed"


def ground_truth_frame(truth: GroundTruth) -> pd.DataFrame:
    """Per minute and variant, the exact expected CTR and the observed CTR of the same lists.

    Long format: one row per minute × variant × ``series`` (``EXPECTED`` or ``OBSERVED``).
    """
    rows = [
        {
            "time": pd.to_datetime(p.minute_start_ms, unit="ms", utc=True),
            "variant": p.variant,
            "series": series,
            "ctr": value,
            "requests": p.requests,
            "impressions": p.impressions,
        }
        for p in truth.points
        for series, value in ((EXPECTED, p.expected_ctr), (OBSERVED, p.ctr))
        if value is not None
    ]
    columns = ["time", "variant", "series", "ctr", "requests", "impressions"]
    return pd.DataFrame(rows, columns=columns)


@dataclass(frozen=True)
class TrueLift:
    """A treatment's true CTR lift over control, beside the readout's CTR lift and its CI."""

    treatment: str
    true_lift: float | None
    measured: float | None
    ci_low: float | None
    ci_high: float | None

    @property
    def covered(self) -> bool | None:
        """Whether the readout's interval covers the truth (None when either is missing)."""
        if self.true_lift is None or self.ci_low is None or self.ci_high is None:
            return None
        return self.ci_low <= self.true_lift <= self.ci_high


def true_lifts(snap: ExperimentSnapshot, metric: str = "ctr") -> list[TrueLift]:
    """Each treatment in the ground truth against the control, with ``metric``'s readout row."""
    truth, control = snap.ground_truth, snap.control
    if truth is None or control is None:
        return []
    rows = {e.treatment: e for e in snap.effects if e.metric == metric and e.control == control}
    lifts = []
    for treatment in sorted(set(truth.totals) - {control}):
        row = rows.get(treatment)
        lifts.append(
            TrueLift(
                treatment=treatment,
                true_lift=truth.true_lift(control, treatment),
                measured=None if row is None else row.effect_rel,
                ci_low=None if row is None else row.ci_rel_low,
                ci_high=None if row is None else row.ci_rel_high,
            )
        )
    return lifts


def lag_frame(pipeline: PipelineSnapshot) -> pd.DataFrame:
    """Consumer lag per group (rows with an unknown lag keep ``None``)."""
    return pd.DataFrame(
        [
            {
                "group": f"{lag.role} ({lag.group})",
                "topic": lag.topic,
                "lag": lag.lag,
                "committed partitions": f"{lag.committed_partitions}/{lag.partitions}",
            }
            for lag in pipeline.consumer_lag
        ]
    )


def freshness_age_frame(pipeline: PipelineSnapshot) -> pd.DataFrame:
    """Per publish and model: the newest learned event's age (s) and the version's p99 (s)."""
    rows = [
        {
            "time": pd.to_datetime(point.ts_ms, unit="ms", utc=True),
            "model": m.model,
            "version": m.version,
            "newest event age s": m.newest_event_age_ms / 1000,
            "event→publish p99 s": (
                None if m.freshness_p99_ms is None else m.freshness_p99_ms / 1000
            ),
        }
        for point in pipeline.freshness
        for m in point.models
        if m.newest_event_age_ms is not None
    ]
    columns = ["time", "model", "version", "newest event age s", "event→publish p99 s"]
    return pd.DataFrame(rows, columns=columns)


def training_lag_frame(pipeline: PipelineSnapshot) -> pd.DataFrame:
    """Per publish with a known lag: the trainer's lag (samples) on the training topic."""
    rows = [
        {"time": pd.to_datetime(p.ts_ms, unit="ms", utc=True), "lag": p.training_lag}
        for p in pipeline.freshness
        if p.training_lag is not None
    ]
    return pd.DataFrame(rows, columns=["time", "lag"])


# --- the model registry -------------------------------------------------------------------------


class FreshnessPercentiles(BaseModel):
    model_config = ConfigDict(frozen=True)
    p50: float
    p99: float
    max: float


class ModelMetadata(BaseModel):
    """The part of a version's ``metadata.json`` the dashboard relies on (more keys are kept)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    model: str
    version: str
    published_at_ms: int
    samples_seen: int
    newest_event_ts_ms: int | None
    newest_ingest_ts_ms: int | None
    freshness_ms: FreshnessPercentiles | None
    metrics: dict[str, float]
    device: str


@dataclass(frozen=True)
class ModelHistory:
    """A model's versions on disk (oldest first), the one ``LATEST`` names, and bad folders."""

    model: str
    latest: str | None
    versions: list[ModelMetadata]
    errors: dict[str, str] = field(default_factory=dict)


def _metadata(folder: Path) -> ModelMetadata:
    try:
        raw = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
        return ModelMetadata.model_validate(raw)
    except (OSError, ValueError) as exc:  # ValidationError is a ValueError
        reason = str(exc).splitlines()[0] if not isinstance(exc, ValidationError) else str(exc)
        raise DataError(f"{folder.name}/metadata.json: {reason}") from exc


def load_registry(registry_dir: Path) -> list[ModelHistory]:
    """Every model folder with its versions' metadata; unreadable versions land in ``errors``."""
    if not registry_dir.is_dir():
        return []
    models = []
    for model_dir in sorted(p for p in registry_dir.iterdir() if p.is_dir()):
        if model_dir.name.startswith("."):
            continue
        latest_file = model_dir / "LATEST"
        latest = latest_file.read_text().strip() or None if latest_file.is_file() else None
        versions, errors = [], {}
        for folder in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            if folder.name.startswith(".") or not (folder / "metadata.json").exists():
                continue  # a version being written, or not a version
            try:
                versions.append(_metadata(folder))
            except DataError as exc:
                errors[folder.name] = str(exc)
        models.append(ModelHistory(model_dir.name, latest, versions, errors))
    return models


# --- the recommendation service -----------------------------------------------------------------


class ServedModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")
    version: str
    loaded_at_ms: int
    published_at_ms: int


class ServiceStatus(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")
    models: dict[str, ServedModel]


@dataclass(frozen=True)
class ServiceProbe:
    """The service's ``/status``, or why it could not be read."""

    url: str
    status: ServiceStatus | None
    error: str | None

    @property
    def reachable(self) -> bool:
        return self.status is not None


def fetch_service_status(host: str, port: int, timeout_s: float = 0.5) -> ServiceProbe:
    """``GET http://host:port/status`` with a short timeout; never raises."""
    url = f"http://{host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body: Any = json.loads(response.read())
        return ServiceProbe(url, ServiceStatus.model_validate(body), None)
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
        return ServiceProbe(url, None, f"{type(exc).__name__}: {exc}".splitlines()[0])


def model_versions_frame(
    registry: list[ModelHistory], service: ServiceProbe, now_ms: int
) -> pd.DataFrame:
    """One row per version: role (latest, in service), age and freshness in seconds, metrics.

    ``newest ingest age`` is now − when the newest learned event entered Kafka; ``event→publish``
    are the trainer's percentiles of publish time − ingest time; for the version in service,
    ``event→served`` ≈ loaded_at − newest ingest (when its newest event reached users).
    """
    served = service.status.models if service.status is not None else {}
    rows = []
    for history in registry:
        in_service = served.get(history.model)
        for meta in history.versions:
            serving = in_service is not None and in_service.version == meta.version
            to_served = None
            if serving and in_service is not None and meta.newest_ingest_ts_ms is not None:
                to_served = (in_service.loaded_at_ms - meta.newest_ingest_ts_ms) / 1000
            rows.append(
                {
                    "model": meta.model,
                    "version": meta.version,
                    "latest": meta.version == history.latest,
                    "in service": serving,
                    "published": pd.to_datetime(meta.published_at_ms, unit="ms", utc=True),
                    "samples seen": meta.samples_seen,
                    "newest ingest age s": _age_s(now_ms, meta.newest_ingest_ts_ms),
                    "event→publish p50 s": _seconds(meta, "p50"),
                    "event→publish p99 s": _seconds(meta, "p99"),
                    "event→served s": to_served,
                    "metrics": ", ".join(f"{k}={v:.4g}" for k, v in sorted(meta.metrics.items())),
                    "device": meta.device,
                }
            )
    return pd.DataFrame(rows)


def _age_s(now_ms: int, ts_ms: int | None) -> float | None:
    return None if ts_ms is None else (now_ms - ts_ms) / 1000


def _seconds(meta: ModelMetadata, which: str) -> float | None:
    if meta.freshness_ms is None:
        return None
    value: float = getattr(meta.freshness_ms, which)
    return value / 1000
