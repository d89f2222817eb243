"""The readout publisher: each experiment's readout as an atomic JSON snapshot for the dashboard.

``publish_readouts`` lists the experiments with exposures (impressions that carry an experiment and
a variant, as ``exposure_users`` keeps them) and the planned ones (``experiment_plans`` of the
experiments file: the SRM check uses the configured weights, the first variant is the control; a
planned experiment without traffic gets a snapshot with no users), computes each one's per-user
metrics (``abtest.metrics``), its readout from their per-variant sums
(``abtest.readout.readout_from_sums``, the path of ``experiment_readout``), adds the request
guardrails and the cumulative effect over time (``abtest.cumulative``, which needs the per-user
rows: so the publisher reads them once and sums them with numpy rather than asking ClickHouse for
the sums as well), and writes ``<readouts_dir>/<experiment>.json`` (schema: ``abtest.snapshot``).
It also writes the pipeline's Kafka health (``abtest.pipeline_health``) to ``_pipeline.json``, with
the freshness series: per publish, the trainer's lag on the training topic and each registry
model's newest learned event age (read from the checkpoint registry's metadata; an unreadable
registry gives no models, logged). The same code runs inside the sink on chdb (which owns the
directory) and as ``hymirec readout --publish`` against a ClickHouse server.

In a closed-loop simulation the simulator also writes its ground truth per variant and minute
(``abtest.ground_truth``, into ``settings.ground_truth_dir``); the snapshot carries it when there
is one. A broken truth file is logged and left out: it never stops the snapshot.

Guardrails: a guardrail metric of the readout (request latency, error rate) is breached when the
treatment is worse at p < alpha; the p99 request latency is breached when a treatment's exceeds
the control's by more than ``p99_tolerance`` (20 % by default).

The sequential test: each publish is one look. The states of the previous look (τ fixed once per
metric × treatment, the running minimum of the p-value) are read back from the experiment's last
snapshot and advanced (``abtest.sequential_looks``), so they survive restarts of the publisher; a
plan that would change τ mid-experiment fails that experiment's publish with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from clickhouse_connect.driver.client import Client

from abtest.clickhouse import analytics_client, query_df
from abtest.cumulative import as_float, cumulative_series
from abtest.freshness import freshness_point, freshness_series
from abtest.ground_truth import GroundTruth, read_ground_truth
from abtest.metrics import ExperimentMetrics, ExperimentSums, user_metrics, variant_sums_from_users
from abtest.pipeline_health import pipeline_health
from abtest.plans import ExperimentPlan, experiment_plans
from abtest.readout import Readout, experiment_names, readout_from_sums
from abtest.sequential_looks import SequentialState
from abtest.snapshot import (
    PIPELINE_FILE,
    SNAPSHOT_SCHEMA_VERSION,
    EffectRow,
    ExperimentSnapshot,
    GuardrailCheck,
    Guardrails,
    PipelineSnapshot,
    RequestGuardrail,
    SrmCheck,
    VariantTraffic,
    clean_floats,
    previous_sequential_states,
    read_pipeline_snapshot,
    snapshot_filename,
    write_json_atomic,
)
from core.errors import DataError
from core.settings import Settings

__all__ = [
    "TRAINING_POLICY",
    "ExperimentPlan",
    "PublishReport",
    "ReadoutPublisher",
    "build_snapshot",
    "cumulative_series",
    "experiment_ground_truth",
    "experiment_names",
    "experiment_plans",
    "publish_pipeline_health",
    "publish_readouts",
    "request_guardrails",
    "run_publish_loop",
]

log = logging.getLogger(__name__)

TRAINING_POLICY = (
    "pooled: every arm's model trains on the pooled training stream of all arms, so the "
    "experiment compares models, not data volume (DESIGN.md)"
)

# The freshness series in _pipeline.json keeps the last 24 hours, at most this many points.

_GUARDRAIL_COLUMNS = ["variant", "requests", "latency_requests", "latency_p50_ms", "latency_p99_ms"]
_GUARDRAIL_COLUMNS += ["errors"]

# Each request's latency counted once (its impressions share it), as in abtest.metrics.
_GUARDRAIL_SQL = """
WITH
    requests AS (
        SELECT toString(assumeNotNull(variant)) AS variant, request_id, max(latency_ms) AS latency
        FROM events FINAL
        PREWHERE event_type = 'impression'
            AND experiment = {experiment:String}
            AND variant IS NOT NULL
        GROUP BY variant, request_id
    ),
    failures AS (
        SELECT toString(assumeNotNull(variant)) AS variant, count() AS errors
        FROM events FINAL
        PREWHERE event_type = 'error' AND experiment = {experiment:String} AND variant IS NOT NULL
        GROUP BY variant
    ),
    latency AS (
        SELECT
            variant,
            toInt64(count()) AS requests,
            toInt64(count(latency)) AS latency_requests,
            quantileExactIf(0.5)(assumeNotNull(latency), latency IS NOT NULL) AS p50,
            quantileExactIf(0.99)(assumeNotNull(latency), latency IS NOT NULL) AS p99
        FROM requests
        GROUP BY variant
    )
SELECT
    if(l.variant != '', l.variant, f.variant) AS variant,
    toInt64(coalesce(l.requests, 0)) AS requests,
    toInt64(coalesce(l.latency_requests, 0)) AS latency_requests,
    toFloat64(l.p50) AS latency_p50_ms,
    toFloat64(l.p99) AS latency_p99_ms,
    toInt64(coalesce(f.errors, 0)) AS errors
FROM latency AS l
FULL OUTER JOIN failures AS f ON l.variant = f.variant
ORDER BY variant
"""


@dataclass
class PublishReport:
    """What one publish wrote, and which experiments failed (name -> error)."""

    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pipeline: PipelineSnapshot | None = None
    seconds: float = 0.0


def request_guardrails(client: Client, experiment: str) -> pd.DataFrame:
    """Per variant: requests, latency p50/p99 (ms) over distinct exposure requests, errors."""
    frame = query_df(client, _GUARDRAIL_SQL, {"experiment": experiment})
    if frame.empty:  # no columns either (see experiment_names)
        return pd.DataFrame(columns=_GUARDRAIL_COLUMNS)
    return frame.replace({np.nan: None})


def _effect_rows(readout: Readout) -> list[EffectRow]:
    rows = []
    for record in readout.table.to_dict(orient="records"):
        clean = clean_floats(record)  # NaN (undefined) -> None
        p, p_holm = clean["p_value"], clean["p_holm"]
        rows.append(
            EffectRow(
                **clean,
                significant=p is not None and p < readout.alpha,
                significant_holm=p_holm is not None and p_holm < readout.alpha,
            )
        )
    return rows


def _variant_traffic(
    sums: ExperimentSums, readout: Readout, plan: ExperimentPlan
) -> list[VariantTraffic]:
    total = max(1, sum(readout.users.values()))
    expected: dict[str, float] = {}
    if readout.srm is not None and sum(readout.srm.expected) > 0:
        scale = sum(readout.srm.expected)
        expected = {
            a: e / scale for a, e in zip(readout.srm_arms, readout.srm.expected, strict=True)
        }
    arms = sorted(set(readout.users) | set(plan.weights or {}))
    return [
        VariantTraffic(
            variant=arm,
            users=int(readout.users.get(arm, 0)),
            exposures=int(sums.variants[arm].sums["exposures"]) if arm in sums.variants else 0,
            share=readout.users.get(arm, 0) / total,
            expected_share=expected.get(arm),
            weight=None if plan.weights is None else float(plan.weights.get(arm, 0.0)),
        )
        for arm in arms
    ]


def _srm_check(readout: Readout, plan: ExperimentPlan) -> SrmCheck | None:
    srm = readout.srm
    if srm is None:
        return None
    return SrmCheck(
        arms=list(readout.srm_arms),
        observed=list(srm.observed),
        expected=list(srm.expected),
        chi2=srm.chi2,
        df=srm.df,
        p_value=srm.p_value,
        threshold=srm.threshold,
        flagged=srm.mismatch,
        weights_configured=plan.weights is not None,
        message=srm.message,
    )


def _guardrails(
    readout: Readout, effects: list[EffectRow], requests: pd.DataFrame, p99_tolerance: float
) -> Guardrails:
    per_variant = [
        RequestGuardrail(
            variant=str(r["variant"]),
            requests=int(r["requests"]),
            latency_requests=int(r["latency_requests"]),
            latency_p50_ms=as_float(r["latency_p50_ms"]) if r["latency_requests"] else None,
            latency_p99_ms=as_float(r["latency_p99_ms"]) if r["latency_requests"] else None,
            errors=int(r["errors"]),
            error_rate=(
                int(r["errors"]) / (int(r["requests"]) + int(r["errors"]))
                if int(r["requests"]) + int(r["errors"])
                else None
            ),
        )
        for r in requests.to_dict(orient="records")
    ]
    checks = []
    for row in (e for e in effects if e.guardrail):
        worse = row.effect_abs is not None and (
            row.effect_abs < 0 if row.higher_is_better else row.effect_abs > 0
        )
        breached = worse and row.significant
        lift = "-" if row.effect_rel is None else f"{row.effect_rel:+.1%}"
        p = "-" if row.p_value is None else f"{row.p_value:.3g}"
        checks.append(
            GuardrailCheck(
                metric=row.metric,
                treatment=row.treatment,
                kind="significant_regression",
                breached=breached,
                detail=f"{row.metric}: {row.treatment} vs {row.control} {lift} (p={p})",
            )
        )
    p99 = {g.variant: g.latency_p99_ms for g in per_variant}
    base = p99.get(readout.control or "")
    for variant, value in p99.items():
        if variant == readout.control or value is None or not base:
            continue
        change = value / base - 1.0
        checks.append(
            GuardrailCheck(
                metric="latency_p99_ms",
                treatment=variant,
                kind="p99_regression",
                breached=change > p99_tolerance,
                detail=(
                    f"p99 latency {value:.1f} ms vs {base:.1f} ms ({change:+.1%}; "
                    f"limit +{p99_tolerance:.0%})"
                ),
            )
        )
    return Guardrails(
        per_variant=per_variant, checks=checks, breached=any(c.breached for c in checks)
    )


def build_snapshot(
    metrics: ExperimentMetrics,
    requests: pd.DataFrame,
    *,
    plan: ExperimentPlan | None = None,
    alpha: float = 0.05,
    buckets: int = 20,
    min_users_per_arm: int = 10,
    p99_tolerance: float = 0.2,
    training_policy: str = TRAINING_POLICY,
    notes: str | None = None,
    now_ms: int | None = None,
    ground_truth: GroundTruth | None = None,
    previous: Sequence[SequentialState] = (),
) -> ExperimentSnapshot:
    """The snapshot of one experiment from its per-user metrics and request guardrails (pure).

    The effects are the readout of the frame's per-variant sums (``readout_from_sums``), so they
    are ``experiment_readout``'s numbers (integer sums exactly, latency sums up to float order).

    A planned control with no exposed users yet gives a snapshot without effects; its traffic and
    SRM check still show (an arm with no users is itself a sample-ratio mismatch).
    ``ground_truth`` is the simulator's, when the experiment runs in a simulation; ``previous``
    the sequential states of the last snapshot (this publish is the next look).
    """
    plan = plan or ExperimentPlan()
    sums = variant_sums_from_users(metrics)
    readout = readout_from_sums(
        sums,
        plan.control,
        plan.weights,
        alpha,
        notes=notes,
        sequential=plan.sequential,
        previous=previous,
        require_control=False,
    )
    effects = _effect_rows(readout)
    series, traffic = cumulative_series(
        metrics, readout, buckets=buckets, min_users_per_arm=min_users_per_arm
    )
    times = metrics.users["first_exposure_ms"]
    return ExperimentSnapshot(
        schema_version=SNAPSHOT_SCHEMA_VERSION,
        generated_at_ms=now_ms if now_ms is not None else int(time.time() * 1000),
        experiment=metrics.experiment,
        control=readout.control,
        alpha=alpha,
        total_users=int(sum(readout.users.values())),
        excluded_users=metrics.excluded_users,
        first_exposure_ms=int(times.min()) if len(times) else None,
        last_exposure_ms=int(times.max()) if len(times) else None,
        variants=_variant_traffic(sums, readout, plan),
        srm=_srm_check(readout, plan),
        effects=effects,
        guardrails=_guardrails(readout, effects, requests, p99_tolerance),
        cumulative=series,
        traffic=traffic,
        training_policy=training_policy,
        notes=notes,
        ground_truth=ground_truth,
        bayes_prior=readout.prior,
        sequential=list(readout.sequential),
    )


def experiment_ground_truth(settings: Settings, experiment: str) -> GroundTruth | None:
    """The simulator's truth about ``experiment``, or None (none written, or unreadable: logged)."""
    try:
        return read_ground_truth(settings.ground_truth_dir, experiment)
    except DataError as exc:
        log.warning("ground truth of %r left out of its snapshot: %s", experiment, exc)
        return None


def publish_readouts(
    client: Client,
    settings: Settings,
    *,
    plans: Mapping[str, ExperimentPlan] | None = None,
    with_pipeline: bool = True,
    now_ms: int | None = None,
    **snapshot_options: Any,
) -> PublishReport:
    """Write every experiment's snapshot (and ``_pipeline.json``) into ``settings.readouts_dir``.

    One experiment's failure is logged and reported in ``PublishReport.failed``; the others are
    still written. ``snapshot_options`` go to ``build_snapshot`` (alpha, buckets, ...).
    """
    started = time.monotonic()
    plans = plans or {}
    out_dir = settings.readouts_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PublishReport()
    for name in sorted(set(experiment_names(client)) | set(plans)):
        try:
            previous = previous_sequential_states(out_dir, name)
            metrics = user_metrics(client, name, pre_days=settings.cuped_pre_days)
            snapshot = build_snapshot(
                metrics,
                request_guardrails(client, name),
                plan=plans.get(name),
                now_ms=now_ms,
                ground_truth=experiment_ground_truth(settings, name),
                previous=previous,
                **snapshot_options,
            )
            path = out_dir / snapshot_filename(name)
            write_json_atomic(path, snapshot)
            report.written.append(path)
        except Exception as exc:  # one broken experiment must not hide the others
            log.exception("readout snapshot of %r failed", name)
            report.failed[name] = f"{type(exc).__name__}: {exc}"
    if with_pipeline:
        report.pipeline = publish_pipeline_health(settings, now_ms=now_ms)
    report.seconds = time.monotonic() - started
    return report


def publish_pipeline_health(settings: Settings, *, now_ms: int | None = None) -> PipelineSnapshot:
    """Write ``_pipeline.json``; the previous file (if readable) gives the event rate and the
    freshness series so far, to which this publish adds a point."""
    path = settings.readouts_dir / PIPELINE_FILE
    try:
        previous: PipelineSnapshot | None = read_pipeline_snapshot(path)
    except DataError:
        previous = None
    snapshot = pipeline_health(settings, previous, now_ms=now_ms)
    series = freshness_series(previous, freshness_point(settings, snapshot))
    snapshot = snapshot.model_copy(update={"freshness": series})
    write_json_atomic(path, snapshot)
    return snapshot


class ReadoutPublisher:
    """Publishes at most every ``every_s`` seconds on an open client (the sink calls it)."""

    def __init__(
        self,
        settings: Settings,
        client: Client,
        *,
        plans: Mapping[str, ExperimentPlan] | None = None,
        every_s: float | None = None,
    ) -> None:
        self.settings, self.client, self.plans = settings, client, dict(plans or {})
        self.every_s = every_s if every_s is not None else settings.readout_publish_s
        self._next = 0.0  # the first call publishes
        self.publishes = 0

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def publish(self) -> PublishReport:
        """Publish now (raises only when listing the experiments or writing fails)."""
        self._next = time.monotonic() + self.every_s
        report = publish_readouts(self.client, self.settings, plans=self.plans)
        self.publishes += 1
        log.log(
            logging.WARNING if report.failed else logging.DEBUG,
            "published %d readout snapshot(s) in %.2f s%s",
            len(report.written),
            report.seconds,
            f"; failed: {sorted(report.failed)}" if report.failed else "",
        )
        return report

    def maybe_publish(self) -> PublishReport | None:
        """``publish`` when due, else None."""
        return self.publish() if self.due() else None


def run_publish_loop(
    settings: Settings,
    *,
    every_s: float | None = None,
    stop: threading.Event | None = None,
    plans: Mapping[str, ExperimentPlan] | None = None,
    once: bool = False,
) -> int:
    """Publish every ``every_s`` s until ``stop`` is set (or once); return the failed cycles.

    A failed cycle (ClickHouse down, a full disk) is logged and counted and the loop goes on.
    """
    stop = stop or threading.Event()
    failures = 0
    with analytics_client(settings) as client:
        publisher = ReadoutPublisher(settings, client, plans=plans, every_s=every_s)
        while True:
            try:
                report = publisher.publish()
                failures += bool(report.failed)
            except Exception as exc:  # ClickHouse away, a full disk: log, count, go on
                failures += 1
                if once:
                    raise
                log.error("readout publish failed (retrying in %.1f s): %s", publisher.every_s, exc)
            if once or stop.wait(publisher.every_s):
                return failures
