"""mSPRT: the mixture likelihood ratio by numerical integration, the sequence boundary, tuning."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from abtest.stats import (
    SampleMeanStatistic,
    TestResult,
    always_valid_p_values,
    confidence_sequence_halfwidth,
    log_mixture_likelihood_ratio,
    msprt_tau,
    msprt_test,
)


@pytest.mark.parametrize(
    ("effect", "variance", "tau"),
    [(0.0, 1.0, 1.0), (0.3, 0.01, 0.1), (-2.0, 0.5, 3.0), (0.05, 1e-4, 0.02)],
)
def test_mixture_likelihood_ratio_by_numerical_integration(
    effect: float, variance: float, tau: float
) -> None:
    """Λ = ∫ N(Δ̂; θ, V) N(θ; 0, τ²) dθ / N(Δ̂; 0, V) (Johari et al. 2017)."""
    sd = math.sqrt(variance)

    def integrand(theta: float) -> float:
        return float(stats.norm.pdf(effect, theta, sd) * stats.norm.pdf(theta, 0.0, tau))

    marginal, _ = integrate.quad(integrand, -12 * tau, 12 * tau, points=[effect], limit=200)
    expected = math.log(marginal / stats.norm.pdf(effect, 0.0, sd))
    assert float(log_mixture_likelihood_ratio(effect, variance, tau)) == pytest.approx(
        expected, rel=1e-7, abs=1e-9
    )


@pytest.mark.parametrize(
    ("variance", "tau", "alpha"), [(1.0, 1.0, 0.05), (0.01, 0.3, 0.1), (2e-4, 0.01, 0.01)]
)
def test_sequence_boundary_is_where_the_likelihood_ratio_reaches_one_over_alpha(
    variance: float, tau: float, alpha: float
) -> None:
    h = float(confidence_sequence_halfwidth(variance, tau, alpha))
    assert float(log_mixture_likelihood_ratio(h, variance, tau)) == pytest.approx(
        math.log(1 / alpha), rel=1e-10
    )


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
def test_msprt_tau_minimises_width_at_the_horizon(alpha: float) -> None:
    sd, n = 2.0, 5000
    variance = 2 * sd**2 / n
    best = optimize.minimize_scalar(
        lambda log_tau: float(confidence_sequence_halfwidth(variance, math.exp(log_tau), alpha)),
        bracket=(-8.0, 0.0),
        tol=1e-12,
    )
    assert msprt_tau(sd, n, alpha=alpha) == pytest.approx(math.exp(best.x), rel=1e-4)


def test_running_p_value_and_nested_intervals_match_vectorised_kernel() -> None:
    rng = np.random.default_rng(11)
    batches_c = rng.normal(0.0, 1.0, (30, 50))
    batches_t = rng.normal(0.15, 1.3, (30, 50))
    tau = msprt_tau(1.0, 1500)
    control = treatment = SampleMeanStatistic(0, 0.0, 0.0)
    result: TestResult | None = None
    looped: list[float] = []
    effects, variances = [], []
    for bc, bt in zip(batches_c, batches_t, strict=True):
        control = control + SampleMeanStatistic.from_array(bc)
        treatment = treatment + SampleMeanStatistic.from_array(bt)
        new = msprt_test(control, treatment, tau=tau, previous=result)
        assert new.ci_abs is not None
        if result is not None and result.ci_abs is not None:
            assert new.ci_abs[0] >= result.ci_abs[0] and new.ci_abs[1] <= result.ci_abs[1]
        result = new
        assert result.p_value is not None
        looped.append(result.p_value)
        effects.append(treatment.mean - control.mean)
        variances.append(treatment.variance / treatment.n + control.variance / control.n)
    assert looped == pytest.approx(list(always_valid_p_values(effects, variances, tau)), rel=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(looped))
    assert result is not None and result.method == "msprt"


def test_msprt_interval_is_wider_than_fixed_horizon_and_relative_is_given() -> None:
    rng = np.random.default_rng(5)
    c = SampleMeanStatistic.from_array(rng.normal(10.0, 2.0, 400))
    t = SampleMeanStatistic.from_array(rng.normal(10.5, 2.0, 400))
    r = msprt_test(c, t, tau=msprt_tau(2.0, 400))
    z_half = stats.norm.ppf(0.975) * math.sqrt(c.variance / c.n + t.variance / t.n)
    assert r.ci_abs is not None and r.ci_rel is not None and r.effect_rel is not None
    assert r.ci_abs[1] - r.ci_abs[0] > 2 * z_half
    assert r.ci_rel[0] < r.effect_rel < r.ci_rel[1]


def test_msprt_degenerate_and_validation() -> None:
    one = SampleMeanStatistic.from_array([1.0])
    const = SampleMeanStatistic.from_array([2.0, 2.0, 2.0])
    assert msprt_test(SampleMeanStatistic(0, 0.0, 0.0), const, tau=1.0).message == "empty_arm"
    assert msprt_test(one, const, tau=1.0).message == "insufficient_data"
    assert msprt_test(const, const, tau=1.0).message == "zero_variance"
    with pytest.raises(ValueError, match="tau"):
        msprt_test(const, const, tau=0.0)
    ok = SampleMeanStatistic.from_array([1.0, 2.0, 4.0])
    with pytest.raises(ValueError, match="previous"):
        msprt_test(ok, ok, tau=1.0, previous=msprt_test(ok, ok, tau=1.0, alpha=0.1))
