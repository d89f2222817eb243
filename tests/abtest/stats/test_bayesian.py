"""Bayesian readout against Monte Carlo draws and numerical integration of the posterior."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats

from abtest.stats import (
    DifferenceType,
    NormalPrior,
    ProportionStatistic,
    RatioStatistic,
    SampleMeanStatistic,
    bayesian_normal_test,
)


def arms(seed: int = 0, n: int = 4000, lift: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(10.0, 3.0, n), rng.normal(10.0 * (1 + lift), 3.0, n)


def test_flat_prior_absolute_matches_monte_carlo() -> None:
    c, t = arms(seed=3)
    r = bayesian_normal_test(
        SampleMeanStatistic.from_array(c), SampleMeanStatistic.from_array(t), difference="absolute"
    )
    # posterior of each arm mean under a flat prior, sampled independently of the module
    rng = np.random.default_rng(1)
    draws = rng.normal(t.mean(), t.std(ddof=1) / np.sqrt(t.size), 2_000_000) - rng.normal(
        c.mean(), c.std(ddof=1) / np.sqrt(c.size), 2_000_000
    )
    assert r.message == "ok" and r.difference == "absolute"
    assert r.effect == pytest.approx(draws.mean(), abs=3e-4)
    assert r.chance_to_win == pytest.approx((draws > 0).mean(), abs=2e-3)
    assert r.expected_loss_treatment == pytest.approx(np.maximum(0, -draws).mean(), rel=0.02)
    assert r.expected_loss_control == pytest.approx(np.maximum(0, draws).mean(), rel=0.02)
    lo, hi = np.quantile(draws, [0.025, 0.975])
    assert r.credible_interval == pytest.approx((lo, hi), abs=2e-3)


def test_flat_prior_relative_matches_monte_carlo_of_the_ratio() -> None:
    """The delta-method normal for the lift is close to the exact ratio of posterior means."""
    c, t = arms(seed=1)  # an observed lift of ~0.7 sd: neither tail is negligible
    r = bayesian_normal_test(SampleMeanStatistic.from_array(c), SampleMeanStatistic.from_array(t))
    rng = np.random.default_rng(3)
    mu_c = rng.normal(c.mean(), c.std(ddof=1) / np.sqrt(c.size), 2_000_000)
    mu_t = rng.normal(t.mean(), t.std(ddof=1) / np.sqrt(t.size), 2_000_000)
    draws = mu_t / mu_c - 1
    assert r.difference == "relative"
    assert r.chance_to_win == pytest.approx((draws > 0).mean(), abs=5e-3)
    assert r.effect_sd == pytest.approx(draws.std(), rel=0.01)
    assert r.expected_loss_treatment == pytest.approx(np.maximum(0, -draws).mean(), rel=0.03)


@pytest.mark.parametrize("difference", ["absolute", "relative"])
def test_normal_prior_matches_numerical_posterior(difference: DifferenceType) -> None:
    c = ProportionStatistic(2000, 210)
    t = ProportionStatistic(2100, 250)
    prior = NormalPrior(mean=0.0, sd=0.05 if difference == "relative" else 0.005)
    r = bayesian_normal_test(c, t, difference=difference, prior=prior)
    flat = bayesian_normal_test(c, t, difference=difference)
    est, se = flat.effect, flat.effect_sd  # the likelihood N(est, se²)
    assert est is not None and se is not None and r.effect is not None

    def unnorm(x: float) -> float:
        return float(stats.norm.pdf(est, x, se) * stats.norm.pdf(x, prior.mean, prior.sd))

    span = (est - 12 * se, est + 12 * se)
    z, _ = integrate.quad(unnorm, *span, points=[0.0, est])
    mean = integrate.quad(lambda x: x * unnorm(x), *span, points=[0.0, est])[0] / z
    var = integrate.quad(lambda x: (x - mean) ** 2 * unnorm(x), *span, points=[0.0, est])[0] / z
    p_win = integrate.quad(unnorm, 0.0, span[1])[0] / z
    loss_t = integrate.quad(lambda x: -x * unnorm(x), span[0], 0.0)[0] / z
    assert r.effect == pytest.approx(mean, rel=1e-6)
    assert r.effect_sd == pytest.approx(np.sqrt(var), rel=1e-6)
    assert r.chance_to_win == pytest.approx(p_win, rel=1e-6)
    assert r.expected_loss_treatment == pytest.approx(loss_t, rel=1e-5, abs=1e-12)
    assert abs(r.effect) < abs(est)  # shrunk towards the prior mean


def test_ratio_metric_posterior() -> None:
    rng = np.random.default_rng(4)
    d = rng.poisson(5, (2, 3000)).astype(float) + 1
    m = rng.binomial(d.astype(int), [[0.2], [0.22]]).astype(float)
    r = bayesian_normal_test(
        RatioStatistic.from_arrays(m[0], d[0]), RatioStatistic.from_arrays(m[1], d[1])
    )
    assert r.message == "ok"
    assert r.chance_to_win is not None and r.chance_to_win > 0.95


def sm(*xs: float) -> SampleMeanStatistic:
    return SampleMeanStatistic.from_array(xs)


@pytest.mark.parametrize(
    ("c", "t", "difference", "message"),
    [
        (SampleMeanStatistic(0, 0.0, 0.0), sm(1.0, 2.0), "relative", "empty_arm"),
        (sm(1.0), sm(1.0, 2.0), "absolute", "insufficient_data"),
        (sm(0.0, 0.0), sm(1.0, 2.0), "relative", "zero_control_mean"),
        (sm(3.0, 3.0), sm(1.0, 1.0), "absolute", "zero_variance"),
        (
            RatioStatistic.from_arrays([0.0, 0.0], [0.0, 0.0]),
            RatioStatistic.from_arrays([1.0, 2.0], [2.0, 2.0]),
            "absolute",
            "zero_denominator",
        ),
    ],
)
def test_degenerate_bayesian(
    c: SampleMeanStatistic, t: SampleMeanStatistic, difference: DifferenceType, message: str
) -> None:
    r = bayesian_normal_test(c, t, difference=difference)
    assert r.message == message
    assert r.chance_to_win is None and r.credible_interval is None
    assert r.as_dict()["message"] == message


def test_prior_is_validated() -> None:
    with pytest.raises(ValueError, match="prior sd"):
        NormalPrior(sd=0.0)
