"""Fixed-horizon tests against scipy, statsmodels and explicit delta-method formulas."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats import proportion as sm_proportion
from statsmodels.stats.proportion import confint_proportions_2indep

from abtest.stats import (
    ProportionStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
    cuped_ttest,
    delta_method_ratio_test,
    two_proportion_ztest,
    welch_ttest,
)


def delta_variance(g: Callable[[np.ndarray], float], theta: np.ndarray, cov: np.ndarray) -> float:
    """∇gᵀ Σ ∇g with a central-difference gradient: the delta method, computed independently."""
    grad = np.empty_like(theta)
    for i in range(theta.size):
        h = 1e-6 * abs(theta[i]) if theta[i] != 0 else 1e-9
        up, down = theta.copy(), theta.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (g(up) - g(down)) / (2 * h)
    return float(grad @ cov @ grad)


def lift(theta: np.ndarray) -> float:
    return float(theta[1] / theta[0] - 1.0)


# --- Welch ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_c", "n_t", "mu_t", "sd_c", "sd_t"),
    [
        (2, 2, 0.5, 1.0, 1.0),  # tiny samples
        (3, 40, 1.0, 0.1, 5.0),  # very unequal variances and sizes
        (200, 150, 0.2, 1.0, 2.0),
        (5000, 5000, 0.01, 3.0, 3.0),
    ],
)
def test_welch_matches_scipy(n_c: int, n_t: int, mu_t: float, sd_c: float, sd_t: float) -> None:
    rng = np.random.default_rng(n_c + n_t)
    c = rng.normal(10.0, sd_c, n_c)
    t = rng.normal(10.0 + mu_t, sd_t, n_t)
    r = welch_ttest(SampleMeanStatistic.from_array(c), SampleMeanStatistic.from_array(t))
    ref = stats.ttest_ind(t, c, equal_var=False)
    assert r.method == "welch_t"
    assert r.message == "ok"
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert r.ci_abs == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-9)
    assert r.effect_abs == pytest.approx(t.mean() - c.mean(), rel=1e-12)
    assert (r.n_control, r.n_treatment) == (n_c, n_t)

    cov = np.diag([c.var(ddof=1) / n_c, t.var(ddof=1) / n_t])
    theta = np.array([c.mean(), t.mean()])
    half = stats.t.ppf(0.975, ref.df) * np.sqrt(delta_variance(lift, theta, cov))
    assert r.effect_rel == pytest.approx(lift(theta), rel=1e-12)
    assert r.ci_rel == pytest.approx((lift(theta) - half, lift(theta) + half), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-100, 100), min_size=2, max_size=30),
    st.lists(st.floats(-100, 100), min_size=2, max_size=30),
    st.sampled_from([0.01, 0.05, 0.2]),
)
def test_welch_matches_scipy_on_drawn_data(c: list[float], t: list[float], alpha: float) -> None:
    assume(np.std(c) > 1e-2 and np.std(t) > 1e-2)
    r = welch_ttest(
        SampleMeanStatistic.from_array(c), SampleMeanStatistic.from_array(t), alpha=alpha
    )
    ref = stats.ttest_ind(t, c, equal_var=False)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)
    lo, hi = ref.confidence_interval(1 - alpha)
    assert r.ci_abs == pytest.approx((lo, hi), rel=1e-6, abs=1e-9)


def test_welch_on_ten_million_units_from_summary_statistics() -> None:
    n = 10_000_000

    def stat(mean: float, sd: float) -> SampleMeanStatistic:
        return SampleMeanStatistic(n, n * mean, (n - 1) * sd**2 + n * mean**2)

    r = welch_ttest(stat(4.0, 2.0), stat(4.002, 2.5))
    ref = stats.ttest_ind_from_stats(4.002, 2.5, n, 4.0, 2.0, n, equal_var=False)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-6)
    assert r.effect_abs == pytest.approx(0.002, rel=1e-9)
    assert r.significant


def test_welch_with_one_constant_arm_still_tests() -> None:
    c = np.zeros(20)
    t = np.random.default_rng(3).normal(0.5, 1.0, 25)
    r = welch_ttest(SampleMeanStatistic.from_array(c), SampleMeanStatistic.from_array(t))
    assert r.message == "zero_control_mean"  # absolute test fine, relative undefined
    assert r.p_value == pytest.approx(stats.ttest_ind(t, c, equal_var=False).pvalue, rel=1e-9)
    assert r.effect_rel is None
    assert r.ci_rel is None


@pytest.mark.parametrize(
    ("c", "t", "message"),
    [
        ([], [1.0, 2.0], "empty_arm"),
        ([1.0, 2.0], [], "empty_arm"),
        ([1.0], [1.0, 2.0], "insufficient_data"),
        ([3.0, 3.0, 3.0], [4.0, 4.0], "zero_variance"),
        ([0.1] * 1000, [0.1] * 500, "zero_variance"),
    ],
)
def test_welch_degenerate_arms_give_coded_results(
    c: list[float], t: list[float], message: str
) -> None:
    r = welch_ttest(SampleMeanStatistic.from_array(c), SampleMeanStatistic.from_array(t))
    assert r.message == message
    assert r.p_value is None
    assert r.ci_abs is None and r.ci_rel is None
    assert not r.significant
    json.dumps(r.as_dict())  # no NaN/inf reaches the dashboard


def test_zero_variance_result_keeps_the_observed_effect() -> None:
    r = welch_ttest(
        SampleMeanStatistic.from_array([3.0, 3.0]), SampleMeanStatistic.from_array([4.0] * 3)
    )
    assert (r.control_mean, r.treatment_mean, r.effect_abs) == (3.0, 4.0, 1.0)
    assert r.effect_rel == pytest.approx(1 / 3)


def test_alpha_is_validated() -> None:
    s = SampleMeanStatistic.from_array([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="alpha"):
        welch_ttest(s, s, alpha=1.5)


def test_result_as_dict_and_labels() -> None:
    a = SampleMeanStatistic.from_array([1.0, 2.0, 3.0, 4.0])
    b = SampleMeanStatistic.from_array([2.0, 3.0, 5.0, 6.0])
    r = welch_ttest(a, b).with_labels(metric="plays", control_name="A", treatment_name="B")
    d = r.as_dict()
    assert d["metric"] == "plays" and d["control_name"] == "A" and d["treatment_name"] == "B"
    assert d["method"] == "welch_t"
    assert isinstance(d["ci_abs"], list) and len(d["ci_abs"]) == 2
    assert d["significant"] is False
    assert json.loads(json.dumps(d)) == d


# --- proportions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x_c", "n_c", "x_t", "n_t"),
    [(5, 40, 12, 45), (1000, 10_000, 1100, 10_000), (3, 3_000_000, 9, 3_000_000), (0, 50, 4, 50)],
)
def test_two_proportion_ztest_matches_statsmodels(x_c: int, n_c: int, x_t: int, n_t: int) -> None:
    r = two_proportion_ztest(ProportionStatistic(n_c, x_c), ProportionStatistic(n_t, x_t))
    with np.errstate(divide="ignore"):  # statsmodels also computes the ratio, 4/0 at x_c = 0
        ref = sm_proportion.test_proportions_2indep(
            x_t, n_t, x_c, n_c, method="wald", compare="diff"
        )
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    lo, hi = confint_proportions_2indep(x_t, n_t, x_c, n_c, method="wald", compare="diff")
    assert r.ci_abs == pytest.approx((lo, hi), rel=1e-9, abs=1e-12)
    if x_c > 0:
        p_c, p_t = x_c / n_c, x_t / n_t
        cov = np.diag([p_c * (1 - p_c) / n_c, p_t * (1 - p_t) / n_t])
        theta = np.array([p_c, p_t])
        half = stats.norm.ppf(0.975) * np.sqrt(delta_variance(lift, theta, cov))
        assert r.ci_rel == pytest.approx((lift(theta) - half, lift(theta) + half), rel=1e-6)
    else:
        assert r.message == "zero_control_mean"


@pytest.mark.parametrize(
    ("c", "t", "message"),
    [
        ((0, 0), (10, 3), "empty_arm"),
        ((10, 0), (10, 0), "zero_variance"),
        ((8, 8), (9, 9), "zero_variance"),
    ],
)
def test_two_proportion_degenerate(c: tuple[int, int], t: tuple[int, int], message: str) -> None:
    r = two_proportion_ztest(ProportionStatistic(*c), ProportionStatistic(*t))
    assert r.message == message
    assert r.p_value is None


# --- ratio metrics (delta method) ----------------------------------------------------------


def ratio_arm(rng: np.random.Generator, n: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
    views = rng.poisson(8.0, n).astype(float) + 1.0
    clicks = rng.binomial(views.astype(int), rate).astype(float)
    return clicks, views


@pytest.mark.parametrize(("n_c", "n_t", "rate_t"), [(30, 40, 0.1), (2000, 2500, 0.11)])
def test_delta_method_ratio_matches_explicit_formula(n_c: int, n_t: int, rate_t: float) -> None:
    rng = np.random.default_rng(n_c)
    m_c, d_c = ratio_arm(rng, n_c, 0.1)
    m_t, d_t = ratio_arm(rng, n_t, rate_t)
    r = delta_method_ratio_test(
        RatioStatistic.from_arrays(m_c, d_c), RatioStatistic.from_arrays(m_t, d_t)
    )

    theta = np.array([m_c.mean(), d_c.mean(), m_t.mean(), d_t.mean()])
    cov = np.zeros((4, 4))
    cov[:2, :2] = np.cov(m_c, d_c) / n_c
    cov[2:, 2:] = np.cov(m_t, d_t) / n_t

    def diff(th: np.ndarray) -> float:
        return float(th[2] / th[3] - th[0] / th[1])

    def rel(th: np.ndarray) -> float:
        return float((th[2] / th[3]) / (th[0] / th[1]) - 1.0)

    # Student's t with Welch–Satterthwaite df on the two arms' delta-method variances.
    v_c = delta_variance(lambda th: float(th[0] / th[1]), theta[:2], cov[:2, :2])
    v_t = delta_variance(lambda th: float(th[0] / th[1]), theta[2:], cov[2:, 2:])
    df = (v_c + v_t) ** 2 / (v_c**2 / (n_c - 1) + v_t**2 / (n_t - 1))
    z = stats.t.ppf(0.975, df)
    se = np.sqrt(delta_variance(diff, theta, cov))
    assert r.effect_abs == pytest.approx(diff(theta), rel=1e-9)
    assert r.p_value == pytest.approx(2 * stats.t.sf(abs(diff(theta)) / se, df), rel=1e-5)
    assert r.ci_abs == pytest.approx((diff(theta) - z * se, diff(theta) + z * se), rel=1e-6)
    half_rel = z * np.sqrt(delta_variance(rel, theta, cov))
    assert r.ci_rel == pytest.approx((rel(theta) - half_rel, rel(theta) + half_rel), rel=1e-6)


def test_delta_ratio_degenerate() -> None:
    ok = RatioStatistic.from_arrays([1.0, 2.0, 0.0], [3.0, 3.0, 4.0])
    no_views = RatioStatistic.from_arrays([0.0, 0.0], [0.0, 0.0])
    assert delta_method_ratio_test(ok, no_views).message == "zero_denominator"
    assert delta_method_ratio_test(RatioStatistic.from_arrays([], []), ok).message == "empty_arm"
    const = RatioStatistic.from_arrays([1.0, 2.0], [2.0, 4.0])  # every unit has ratio 1/2
    assert delta_method_ratio_test(const, const).message == "zero_variance"


# --- CUPED -----------------------------------------------------------------------------------


def cuped_data(seed: int, n_c: int, n_t: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x_c, x_t = rng.gamma(2.0, 3.0, n_c), rng.gamma(2.0, 3.0, n_t)
    y_c = 2.0 + 0.8 * x_c + rng.normal(0, 2.0, n_c)
    y_t = 2.3 + 0.8 * x_t + rng.normal(0, 2.5, n_t)
    return y_c, x_c, y_t, x_t


@pytest.mark.parametrize(("n_c", "n_t"), [(5, 6), (300, 250), (20_000, 20_000)])
def test_cuped_equals_welch_on_pooled_ols_residuals(n_c: int, n_t: int) -> None:
    y_c, x_c, y_t, x_t = cuped_data(n_c, n_c, n_t)
    r = cuped_ttest(
        RegressionAdjustedStatistic.from_arrays(y_c, x_c),
        RegressionAdjustedStatistic.from_arrays(y_t, x_t),
    )
    x, y = np.concatenate([x_c, x_t]), np.concatenate([y_c, y_t])
    (_, theta), *_ = np.linalg.lstsq(np.column_stack([np.ones_like(x), x]), y, rcond=None)
    ref = stats.ttest_ind(y_t - theta * x_t, y_c - theta * x_c, equal_var=False)
    assert r.method == "cuped_t"
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-300)
    assert r.ci_abs == pytest.approx(tuple(ref.confidence_interval()), rel=1e-7)
    assert (r.control_mean, r.treatment_mean) == pytest.approx((y_c.mean(), y_t.mean()))

    means = np.array([y_c.mean(), x_c.mean(), y_t.mean(), x_t.mean()])
    cov = np.zeros((4, 4))
    cov[:2, :2] = np.cov(y_c, x_c) / n_c
    cov[2:, 2:] = np.cov(y_t, x_t) / n_t

    def rel(th: np.ndarray) -> float:
        return float(((th[2] - theta * th[3]) - (th[0] - theta * th[1])) / th[0])

    half = stats.t.ppf(0.975, ref.df) * np.sqrt(delta_variance(rel, means, cov))
    assert r.effect_rel == pytest.approx(rel(means), rel=1e-9)
    assert r.ci_rel == pytest.approx((rel(means) - half, rel(means) + half), rel=1e-6)


def test_cuped_reduces_variance_and_falls_back_without_covariate() -> None:
    y_c, x_c, y_t, x_t = cuped_data(7, 2000, 2000)
    plain = welch_ttest(SampleMeanStatistic.from_array(y_c), SampleMeanStatistic.from_array(y_t))
    adj = cuped_ttest(
        RegressionAdjustedStatistic.from_arrays(y_c, x_c),
        RegressionAdjustedStatistic.from_arrays(y_t, x_t),
    )
    assert plain.ci_abs is not None and adj.ci_abs is not None
    assert adj.ci_abs[1] - adj.ci_abs[0] < 0.6 * (plain.ci_abs[1] - plain.ci_abs[0])
    flat = cuped_ttest(
        RegressionAdjustedStatistic.from_arrays(y_c, np.ones_like(y_c)),
        RegressionAdjustedStatistic.from_arrays(y_t, np.ones_like(y_t)),
    )
    assert flat.p_value == pytest.approx(plain.p_value, rel=1e-9)
    assert flat.ci_abs == pytest.approx(plain.ci_abs, rel=1e-9)


def test_cuped_degenerate() -> None:
    y = np.arange(10.0)
    perfect = RegressionAdjustedStatistic.from_arrays(2 * y + 1, y)
    assert cuped_ttest(perfect, perfect).message == "zero_variance"
    empty = RegressionAdjustedStatistic.from_arrays([], [])
    assert cuped_ttest(empty, perfect).message == "empty_arm"
