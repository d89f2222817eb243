"""Readout snapshots: the JSON files the publisher writes and the dashboard reads.

The dashboard never queries ClickHouse (on chdb only one process may open the directory, and the
sink holds it), so ``abtest.publish`` writes one ``<experiment>.json`` per experiment plus
``_pipeline.json`` into ``settings.readouts_dir``. Every write goes to a temporary file in the same
folder and is renamed over the old one (``os.replace``, atomic on POSIX), so a reader sees the
previous complete file or the new complete file, never a partial one. Temporary files start with a
dot; readers skip dot files.

The models below are the schema (``SNAPSHOT_SCHEMA_VERSION``); both sides validate with them.
``ground_truth`` is optional: only a closed-loop simulation knows the truth (``abtest.ground_truth``
records and reads it), and files written before it existed still validate; so is the pipeline's
``freshness`` series (files written before it read as an empty series).

An experiment snapshot also carries the state of its sequential test (``sequential``: per
metric × treatment, the fixed τ, the running minimum of the p-value and the confidence
sequence; ``abtest.sequential_looks``): the publisher reads it back at its next look, so the
running minimum survives restarts (``previous_sequential_states``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from abtest.sequential_looks import SequentialState
from abtest.snapshot_truth import GroundTruth, TruthPoint, VariantTruth
from core.errors import DataError

__all__ = [
    "PIPELINE_FILE",
    "SNAPSHOT_SCHEMA_VERSION",
    "ConsumerLag",
    "CumulativePoint",
    "CumulativeSeries",
    "EffectRow",
    "ExperimentSnapshot",
    "FreshnessPoint",
    "GroundTruth",
    "GuardrailCheck",
    "Guardrails",
    "ModelFreshness",
    "PipelineSnapshot",
    "RequestGuardrail",
    "SrmCheck",
    "TrafficPoint",
    "TruthPoint",
    "VariantTraffic",
    "VariantTruth",
    "clean_floats",
    "previous_sequential_states",
    "read_experiment_snapshot",
    "read_pipeline_snapshot",
    "snapshot_filename",
    "write_json_atomic",
]

SNAPSHOT_SCHEMA_VERSION = 1
PIPELINE_FILE = "_pipeline.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class VariantTraffic(_Frozen):
    """Included users and exposure requests of one variant; ``weight`` is the configured one."""

    variant: str
    users: int
    exposures: int
    share: float
    expected_share: float | None
    weight: float | None


class SrmCheck(_Frozen):
    """Pearson's chi-square of users per arm against the weights (``abtest.stats.srm``)."""

    arms: list[str]
    observed: list[int]
    expected: list[float]
    chi2: float
    df: int
    p_value: float
    threshold: float
    flagged: bool
    weights_configured: bool
    message: str


class EffectRow(_Frozen):
    """One metric × treatment row of the readout (``abtest.readout.READOUT_COLUMNS``).

    ``p_value`` is on the scale named by ``p_scale`` ("relative": it tests the lift and agrees with
    ``ci_rel_*``; "absolute": it tests the difference and agrees with ``ci_abs_*``).
    """

    metric: str
    guardrail: bool
    higher_is_better: bool
    method: str
    control: str
    treatment: str
    n_control: int
    n_treatment: int
    control_mean: float | None
    treatment_mean: float | None
    effect_abs: float | None
    effect_rel: float | None
    ci_abs_low: float | None
    ci_abs_high: float | None
    ci_rel_low: float | None
    ci_rel_high: float | None
    p_value: float | None
    p_scale: Literal["relative", "absolute"] | None = None
    p_value_abs: float | None = None
    variance_abs: float | None = None
    p_holm: float | None
    p_bh: float | None
    chance_to_win: float | None
    expected_loss: float | None
    p_sequential: float | None
    significant: bool
    significant_holm: bool
    message: str


class RequestGuardrail(_Frozen):
    """Per-variant request latency percentiles (distinct exposure requests) and failed requests."""

    variant: str
    requests: int
    latency_requests: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    errors: int
    error_rate: float | None


class GuardrailCheck(_Frozen):
    """One guardrail verdict for one treatment; ``breached`` means it got significantly worse."""

    metric: str
    treatment: str
    kind: Literal["significant_regression", "p99_regression"]
    breached: bool
    detail: str


class Guardrails(_Frozen):
    per_variant: list[RequestGuardrail]
    checks: list[GuardrailCheck]
    breached: bool


class CumulativePoint(_Frozen):
    """The readout of the users first exposed up to ``ts_ms``: fixed-horizon CI and the CS."""

    ts_ms: int
    n_control: int
    n_treatment: int
    effect: float
    ci_low: float | None
    ci_high: float | None
    cs_low: float
    cs_high: float
    variance: float


class CumulativeSeries(_Frozen):
    """The cumulative absolute effect of one metric × treatment, with its mSPRT sequence at the
    readout's fixed τ (the ``SequentialState``'s)."""

    metric: str
    treatment: str
    method: str
    tau: float
    alpha: float
    points: list[CumulativePoint]


class TrafficPoint(_Frozen):
    """Users of ``variant`` first exposed up to ``ts_ms`` (cumulative)."""

    ts_ms: int
    variant: str
    users: int


class ExperimentSnapshot(_Frozen):
    """Everything the dashboard shows about one experiment, computed at ``generated_at_ms``."""

    schema_version: int
    generated_at_ms: int
    experiment: str
    control: str | None
    alpha: float
    total_users: int
    excluded_users: int
    first_exposure_ms: int | None
    last_exposure_ms: int | None
    variants: list[VariantTraffic]
    srm: SrmCheck | None
    effects: list[EffectRow]
    guardrails: Guardrails
    cumulative: list[CumulativeSeries]
    traffic: list[TrafficPoint]
    training_policy: str
    notes: str | None
    ground_truth: GroundTruth | None = None
    bayes_prior: str | None = None
    sequential: list[SequentialState] = Field(default_factory=list)


class ConsumerLag(_Frozen):
    """End offset − committed offset over a topic's partitions, for one consumer group.

    A partition without a committed offset counts from its beginning offset
    (``committed_partitions`` < ``partitions`` says so); ``lag`` is None when the topic is missing.
    """

    group: str
    role: str
    topic: str
    partitions: int
    committed_partitions: int
    end_offset: int | None
    committed_offset: int | None
    lag: int | None


class ModelFreshness(_Frozen):
    """How fresh a model's latest registry version (the one serving loads) is at a point.

    ``newest_event_age_ms`` is the point's time − when the newest event the version learned
    entered Kafka (its ``newest_ingest_ts_ms``); ``freshness_p99_ms`` is the version's own p99 of
    publish time − ingest time over its samples. Either is None when the metadata lacks it.
    """

    model: str
    version: str
    published_at_ms: int | None
    newest_event_age_ms: int | None
    freshness_p99_ms: float | None


class FreshnessPoint(_Frozen):
    """One publish's freshness: the trainer's lag on the training topic and each model's age."""

    ts_ms: int
    training_lag: int | None
    models: list[ModelFreshness] = Field(default_factory=list)


class PipelineSnapshot(_Frozen):
    """Kafka-side pipeline health: consumer lag, event rate, dead-letter records.

    ``freshness`` is a series, one point per publish, carried over from the previous file (the
    last 24 hours, at most ``abtest.publish.FRESHNESS_POINTS`` points).
    """

    schema_version: int
    generated_at_ms: int
    bootstrap: str
    reachable: bool
    error: str | None
    events_topic: str
    events_end_offset: int | None
    events_per_s: float | None
    rate_interval_s: float | None
    dead_letter_topic: str
    dead_letter_records: int | None
    consumer_lag: list[ConsumerLag]
    freshness: list[FreshnessPoint] = Field(default_factory=list)


def snapshot_filename(experiment: str) -> str:
    """A safe file name for ``experiment``; names that need escaping get a hash suffix."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).lstrip("._")[:80] or "experiment"
    if safe != experiment:
        safe += "-" + hashlib.sha1(experiment.encode()).hexdigest()[:8]
    return f"{safe}.json"


def clean_floats(value: Any) -> Any:
    """NaN and ±inf become None (JSON has neither), recursively through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_floats(v) for v in value]
    return value


def write_json_atomic(path: Path, model: BaseModel) -> None:
    """Write ``model`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    text = json.dumps(clean_floats(model.model_dump(mode="json")), allow_nan=False, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read snapshot {path}: {exc}") from exc
    except ValueError as exc:
        raise DataError(f"snapshot {path.name} is not valid JSON ({exc}); republish it") from exc
    if not isinstance(raw, dict):
        raise DataError(f"snapshot {path.name} must hold a JSON object, not {type(raw).__name__}")
    version = raw.get("schema_version")
    if version != SNAPSHOT_SCHEMA_VERSION:
        raise DataError(
            f"snapshot {path.name} has schema_version {version!r}, this dashboard reads "
            f"{SNAPSHOT_SCHEMA_VERSION}; republish with the same hymirec version"
        )
    return raw


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()[:5]
    )


def read_experiment_snapshot(path: Path) -> ExperimentSnapshot:
    """Load and validate one experiment snapshot; DataError names the file and the field."""
    try:
        return ExperimentSnapshot.model_validate(_read(path))
    except ValidationError as exc:
        raise DataError(f"snapshot {path.name} is malformed: {_problems(exc)}") from exc


def previous_sequential_states(folder: Path, experiment: str) -> list[SequentialState]:
    """The sequential states in ``experiment``'s snapshot in ``folder``; none when there is no
    snapshot yet. An unreadable snapshot raises DataError: starting the sequence again would
    silently forget its running minimum (delete the file to start over on purpose)."""
    path = folder / snapshot_filename(experiment)
    if not path.exists():
        return []
    return list(read_experiment_snapshot(path).sequential)


def read_pipeline_snapshot(path: Path) -> PipelineSnapshot:
    """Load and validate ``_pipeline.json``; DataError names the file and the field."""
    try:
        return PipelineSnapshot.model_validate(_read(path))
    except ValidationError as exc:
        raise DataError(f"snapshot {path.name} is malformed: {_problems(exc)}") from exc
