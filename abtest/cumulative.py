"""The cumulative effect of an experiment over time, with its always-valid confidence sequence.

Users enter in order of first exposure; the point at ``t`` is the readout (``readout_from_sums`` of
``variant_sums_from_users``, as the publisher's table) of the users first exposed by ``t``, each
with the metric value measured now (a cohort view, like GrowthBook's cumulative charts by first
exposure), so the last point is the full readout. Beside the fixed-horizon CI each point carries
the mSPRT confidence sequence (Johari et al. 2017; Howard et al. 2021's normal mixture,
``abtest.stats.sequential``) of the same estimator: effect ± sqrt(V(V + τ²)/τ² · (ln((V + τ²)/V) +
2 ln(1/α))), V the estimator's variance (CUPED-adjusted where the readout used CUPED). τ is the
readout's own for that metric and treatment, fixed once for the experiment (``Readout.sequential``,
``abtest.sequential_looks``), so the band and ``p_sequential`` are one test; a series whose τ is
not fixed yet has no band. The band holds the true effect at every point at once with probability ≥
1 − α, so it is always wider than the fixed-horizon CI, which holds at one pre-chosen look only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from abtest.metrics import ExperimentMetrics, variant_sums_from_users
from abtest.readout import Readout, readout_from_sums
from abtest.snapshot import CumulativePoint, CumulativeSeries, TrafficPoint
from abtest.stats import confidence_sequence_halfwidth

__all__ = ["as_float", "cumulative_series"]


def as_float(value: Any) -> float | None:
    if value is None or pd.isna(value):
        return None
    return float(value)


def _edges(times: np.ndarray[Any, Any], buckets: int) -> list[int]:
    """``buckets`` evenly spaced cut points over the exposure window; the last is the newest."""
    lo, hi = int(times.min()), int(times.max())
    if hi == lo:
        return [hi]
    return sorted({int(e) for e in np.linspace(lo, hi, buckets + 1)[1:]} | {hi})


def cumulative_series(
    metrics: ExperimentMetrics,
    readout: Readout,
    *,
    buckets: int = 20,
    min_users_per_arm: int = 10,
) -> tuple[list[CumulativeSeries], list[TrafficPoint]]:
    """The cumulative effect of every metric × treatment over time, and the traffic over time.

    A point needs ``min_users_per_arm`` users in both arms (so that a Welch interval has enough
    degrees of freedom to be narrower than the sequence); see the module docstring.
    """
    if buckets < 1 or min_users_per_arm < 2:
        raise ValueError("buckets must be >= 1 and min_users_per_arm >= 2")
    frame, control, alpha = metrics.users, readout.control, readout.alpha
    if control is None or frame.empty:
        return [], []
    times = frame["first_exposure_ms"].to_numpy(dtype=np.int64)
    variants = frame["variant"].to_numpy()
    edges = _edges(times, buckets)
    traffic = [
        TrafficPoint(ts_ms=e, variant=v, users=int(((times <= e) & (variants == v)).sum()))
        for e in edges
        for v in readout.users
    ]
    taus = {(s.metric, s.treatment): s.tau for s in readout.sequential}
    points: dict[tuple[str, str], list[CumulativePoint]] = {key: [] for key in taus}
    methods: dict[tuple[str, str], str] = {}
    for edge in edges:
        sub = frame[times <= edge]
        counts = sub["variant"].value_counts()
        if counts.get(control, 0) < min_users_per_arm:
            continue
        look = readout_from_sums(
            variant_sums_from_users(
                ExperimentMetrics(metrics.experiment, sub, 0, metrics.pre_days)
            ),
            control,
            alpha=alpha,
            sequential=None,
        )
        for row in look.table.itertuples(index=False):
            key = (str(row.metric), str(row.treatment))
            tau, effect = taus.get(key), as_float(row.effect_abs)
            variance = as_float(row.variance_abs)
            if tau is None or effect is None or counts.get(row.treatment, 0) < min_users_per_arm:
                continue
            if variance is None or not variance > 0:
                continue
            halfwidth = float(confidence_sequence_halfwidth(variance, tau, alpha))
            methods[key] = str(row.method)
            points[key].append(
                CumulativePoint(
                    ts_ms=edge,
                    n_control=int(row.n_control),
                    n_treatment=int(row.n_treatment),
                    effect=effect,
                    ci_low=as_float(row.ci_abs_low),
                    ci_high=as_float(row.ci_abs_high),
                    cs_low=effect - halfwidth,
                    cs_high=effect + halfwidth,
                    variance=variance,
                )
            )
    series = [
        CumulativeSeries(
            metric=m,
            treatment=t,
            method=methods[(m, t)],
            tau=tau,
            alpha=alpha,
            points=points[(m, t)],
        )
        for (m, t), tau in taus.items()
        if points[(m, t)]
    ]
    return series, traffic
