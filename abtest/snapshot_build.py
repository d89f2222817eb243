"""One experiment's readout snapshot, built from ClickHouse: the readout table from the per-variant
sums, the request guardrails, the cumulative effect over time, the SRM check against the plan and
the sequential states carried over from the previous look (``abtest.publish`` writes it)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
from clickhouse_connect.driver.client import Client

from abtest.clickhouse import query_df
from abtest.cumulative import as_float, cumulative_series
from abtest.ground_truth import GroundTruth
from abtest.metrics import ExperimentMetrics, ExperimentSums, variant_sums_from_users
from abtest.plans import ExperimentPlan
from abtest.readout import Readout, readout_from_sums
from abtest.sequential_looks import SequentialState
from abtest.snapshot import (
    SNAPSHOT_SCHEMA_VERSION,
    EffectRow,
    ExperimentSnapshot,
    GuardrailCheck,
    Guardrails,
    RequestGuardrail,
    SrmCheck,
    VariantTraffic,
    clean_floats,
)

__all__ = ["TRAINING_POLICY", "build_snapshot", "request_guardrails"]

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
