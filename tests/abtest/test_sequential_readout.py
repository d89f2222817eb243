"""The readout's sequential p-value across looks: τ fixed once, the running minimum carried.

A seeded summary-statistics simulation (normal data, exact batch laws) takes the readout's own
row look by look through its public path (``abtest.readout.compare_statistics``, as the
publisher does), checks it against a vectorised mSPRT at the same τ, and counts false positives
and detections; ``benchmarks/sequential_fpr.py`` runs the same with 1,000 looks up to 1e7 users
per arm. The other tests check the state's life cycle: fixing τ, refusing a change of τ, and the
per-user readout carrying ``previous`` states.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from abtest.experiments import parse_experiments
from abtest.metrics import USER_METRIC_COLUMNS, ExperimentMetrics
from abtest.plans import experiment_plans
from abtest.readout import READOUT_METRICS, compare_statistics, readout_from_metrics
from abtest.sequential_looks import SequentialPlan, SequentialState, sequential_step
from abtest.stats import (
    SampleMeanStatistic,
    SequentialLook,
    always_valid_p_values,
    msprt_look,
    msprt_tau,
    msprt_test,
)
from core.errors import DataError, ExperimentConfigError

ALPHA = 0.05
SPEC = next(s for s in READOUT_METRICS if s.name == "genres_consumed")


def optimal_u() -> float:
    """u = 2 ln(1/α) + ln(1 + u), by a root finder (independent of the module's iteration)."""
    return float(optimize.brentq(lambda u: u - 2 * math.log(1 / ALPHA) - math.log1p(u), 1, 100))


def simulate(
    rng: np.random.Generator, sims: int, n: np.ndarray, effect: float
) -> tuple[np.ndarray, ...]:
    """Cumulative Σx, Σx² per arm of N(1, 1) and N(1 + effect, 1) users at looks ``n``."""
    m = np.diff(n, prepend=0).astype(float)
    out = []
    for mean in (1.0, 1.0 + effect):
        s = rng.normal(m * mean, np.sqrt(m), (sims, m.size))
        ss = rng.chisquare(m - 1, (sims, m.size)) + s**2 / m
        out += [np.cumsum(s, axis=1), np.cumsum(ss, axis=1)]
    return tuple(out)


def readout_looks(
    n: np.ndarray, sums: tuple[np.ndarray, ...], plan: SequentialPlan
) -> tuple[np.ndarray, np.ndarray]:
    """The readout's p_sequential per experiment and look, and each experiment's τ."""
    sum_c, sq_c, sum_t, sq_t = sums
    p, taus = np.full(sum_c.shape, np.nan), np.full(sum_c.shape[0], np.nan)
    for i in range(sum_c.shape[0]):
        state: SequentialState | None = None
        for k, users in enumerate(n):
            row, state = compare_statistics(
                SPEC,
                SampleMeanStatistic(int(users), sum_c[i, k], sq_c[i, k]),
                SampleMeanStatistic(int(users), sum_t[i, k], sq_t[i, k]),
                treatment_name="treatment",
                sequential=plan,
                previous=state,
            )
            p[i, k] = row["p_sequential"]
        assert state is not None and state.looks == n.size
        taus[i] = state.tau
    return p, taus


def test_peeking_at_every_look_keeps_false_positives_below_alpha_and_finds_an_effect() -> None:
    rng = np.random.default_rng(2024)
    n = np.unique(np.round(np.geomspace(100, 1_000_000, 60)).astype(np.int64))
    plan = SequentialPlan(horizon_users_per_arm=1_000_000)
    sims = 400

    sums = simulate(rng, sims, n, 0.0)
    p, taus = readout_looks(n, sums, plan)
    # Reference: τ² = u·V₁·n₁/N from the first look's Welch variance, then the mSPRT written out
    # over the looks (always_valid_p_values, a vectorised kernel separate from the readout's).
    sum_c, sq_c, sum_t, sq_t = sums
    var_c = (sq_c - sum_c**2 / n) / (n - 1)
    var_t = (sq_t - sum_t**2 / n) / (n - 1)
    variance, effect = (var_c + var_t) / n, (sum_t - sum_c) / n
    expected_tau = np.sqrt(optimal_u() * variance[:, 0] * n[0] / 1_000_000)
    assert taus == pytest.approx(expected_tau, rel=1e-9)
    for i in range(sims):
        reference = always_valid_p_values(effect[i], variance[i], float(taus[i]))
        assert p[i] == pytest.approx(reference, rel=1e-9)
    assert np.all(np.diff(p, axis=1) <= 0)  # a running minimum
    false_positives = int((p[:, -1] < ALPHA).sum())
    assert false_positives <= 0.05 * sims, f"{false_positives}/{sims} false positives"

    # Power at Welch's 80 % minimum detectable effect at the horizon.
    mde = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * math.sqrt(2 / 1_000_000)
    p_effect, _ = readout_looks(n, simulate(rng, 200, n, mde), plan)
    power = float((p_effect[:, -1] < ALPHA).mean())
    assert power >= 0.35, f"power {power:.2%} at δ = {mde:.4g}"


def test_tau_is_fixed_once_and_a_change_is_refused() -> None:
    plan = SequentialPlan(horizon_users_per_arm=5000, min_users_per_arm=100)
    first = sequential_step(
        "ctr", "b", "delta_ratio", 0.01, 1e-4, 99, 120, plan=plan, alpha=ALPHA, previous=None
    )
    assert first is None  # an arm below min_users_per_arm: τ not fixed yet
    state = sequential_step(
        "ctr", "b", "delta_ratio", 0.01, 1e-4, 100, 120, plan=plan, alpha=ALPHA, previous=None
    )
    assert state is not None and state.tau_source == "horizon" and state.looks == 1
    assert state.tau == pytest.approx(math.sqrt(optimal_u() * 1e-4 * 110 / 5000), rel=1e-10)
    later = sequential_step(
        "ctr", "b", "delta_ratio", 0.002, 2e-5, 600, 610, plan=plan, alpha=ALPHA, previous=state
    )
    assert later is not None and later.tau == state.tau and later.looks == 2
    assert later.p_value == min(state.p_value, later.p_value)
    # No variance at this look: the state is kept as it was.
    assert (
        sequential_step(
            "ctr", "b", "delta_ratio", 0.0, 0.0, 700, 700, plan=plan, alpha=ALPHA, previous=later
        )
        is later
    )

    with pytest.raises(
        ExperimentConfigError, match="horizon_users_per_arm changed from 5000 to 9000"
    ):
        sequential_step(
            "ctr",
            "b",
            "delta_ratio",
            0.0,
            1e-5,
            800,
            800,
            plan=SequentialPlan(9000),
            alpha=ALPHA,
            previous=later,
        )
    with pytest.raises(ExperimentConfigError, match=r"sequential\.tau changed"):
        stated = SequentialPlan(5000, tau={"ctr": 0.5})
        sequential_step(
            "ctr", "b", "delta_ratio", 0.0, 1e-5, 800, 800, plan=stated, alpha=ALPHA, previous=later
        )
    with pytest.raises(ExperimentConfigError, match="alpha changed"):
        sequential_step(
            "ctr", "b", "delta_ratio", 0.0, 1e-5, 800, 800, plan=plan, alpha=0.1, previous=later
        )


def test_a_stated_tau_is_used_from_the_first_look_and_must_stay() -> None:
    plan = SequentialPlan(tau={"ctr": 0.004})
    state = sequential_step(
        "ctr", "b", "delta_ratio", 0.003, 1e-6, 20, 20, plan=plan, alpha=ALPHA, previous=None
    )
    assert state is not None and (state.tau, state.tau_source) == (0.004, "stated")
    v, t2 = 1e-6, 0.004**2
    lam = math.sqrt(v / (v + t2)) * math.exp(0.003**2 * t2 / (2 * v * (v + t2)))
    assert state.p_value == pytest.approx(min(1.0, 1 / lam), rel=1e-12)
    with pytest.raises(ExperimentConfigError, match="was removed"):
        sequential_step(
            "ctr",
            "b",
            "delta_ratio",
            0.0,
            1e-6,
            40,
            40,
            plan=SequentialPlan(),
            alpha=ALPHA,
            previous=state,
        )


def test_the_engine_refuses_a_different_tau_between_looks() -> None:
    rng = np.random.default_rng(1)
    c = SampleMeanStatistic.from_array(rng.normal(0, 1, 200))
    t = SampleMeanStatistic.from_array(rng.normal(0.1, 1, 200))
    first = msprt_test(c, t, tau=msprt_tau(1.0, 200))
    assert first.tau == msprt_tau(1.0, 200)
    with pytest.raises(ValueError, match="tau changed between looks"):
        msprt_test(c, t, tau=msprt_tau(1.0, 400), previous=first)
    look = msprt_look(0.1, 0.01, tau=0.2)
    assert isinstance(look, SequentialLook) and look.looks == 1
    with pytest.raises(ValueError, match="tau changed between looks"):
        msprt_look(0.1, 0.01, tau=0.3, previous=look)


def per_user_frame(rng: np.random.Generator, users: int, lift: float) -> ExperimentMetrics:
    variant = np.where(np.arange(users) % 2 == 0, "control", "treatment")
    frame = pd.DataFrame({"user_id": np.arange(users, dtype=np.uint64), "variant": variant})
    for column in USER_METRIC_COLUMNS[2:]:
        frame[column] = rng.poisson(2.0, users)
    frame["genres_consumed"] = rng.poisson(np.where(variant == "treatment", 3.0 + lift, 3.0))
    frame["converted"] = (frame["plays"] > 0).astype(int)
    frame["impressions"] = frame["impressions"] + frame["clicks"]
    frame["requests"] = frame["requests"] + frame["errors"] + 1
    frame["latency_requests"] = frame["latency_requests"] + 1
    return ExperimentMetrics("seq", frame[list(USER_METRIC_COLUMNS)], 0, 7)


def test_the_readout_carries_states_from_look_to_look() -> None:
    rng = np.random.default_rng(3)
    full = per_user_frame(rng, 2000, 0.3)
    early = ExperimentMetrics("seq", full.users.iloc[:400], 0, 7)
    first = readout_from_metrics(early)
    assert {s.metric for s in first.sequential} == {spec.name for spec in READOUT_METRICS}
    second = readout_from_metrics(full, previous=first.sequential)
    one_look = readout_from_metrics(full)
    for before, after in zip(first.sequential, second.sequential, strict=True):
        assert (after.tau, after.looks) == (before.tau, 2)
        alone = next(s for s in one_look.sequential if s.metric == after.metric)
        assert alone.tau != before.tau  # τ from the first look's variance, not re-tuned
        assert after.p_value <= before.p_value
    p = second.table.set_index("metric")["p_sequential"]
    assert p["genres_consumed"] == next(
        s.p_value for s in second.sequential if s.metric == "genres_consumed"
    )
    assert readout_from_metrics(full, sequential=None).table["p_sequential"].isna().all()


def test_malformed_values_are_a_data_error_naming_the_experiment() -> None:
    metrics = per_user_frame(np.random.default_rng(4), 50, 0.0)
    broken = metrics.users.astype({"genres_consumed": float})
    broken.loc[3, "genres_consumed"] = np.nan
    with pytest.raises(DataError, match="'seq': values contains NaN"):
        readout_from_metrics(ExperimentMetrics("seq", broken, 0, 7))


def test_the_experiments_file_states_the_plan_and_unknown_metrics_are_refused() -> None:
    text = """
default_model: sasrec
layers: [{name: l, salt: l-salt}]
experiments:
  - name: e
    layer: l
    salt: e-salt
    range: [0, 1]
    variants: [{name: control, weight: 1}, {name: treatment, weight: 1}]
    sequential: {horizon_users_per_arm: 50000, min_users_per_arm: 500, tau: {ctr: 0.002}}
"""
    plan = experiment_plans(parse_experiments(text))["e"].sequential
    assert plan == SequentialPlan(50_000, 500, {"ctr": 0.002})
    with pytest.raises(ExperimentConfigError, match=r"unknown metric\(s\) \['clicks'\]"):
        experiment_plans(parse_experiments(text.replace("ctr: 0.002", "clicks: 0.002")))
    with pytest.raises(ExperimentConfigError, match="tau"):
        parse_experiments(text.replace("ctr: 0.002", "ctr: -1"))
