"""Seeded simulation studies of error rates, power and coverage (gbstats-style calibration).

Data are drawn once as arrays and reduced to per-experiment sums with numpy; the tests under study
then run on those cheap summary statistics. Each study reports its numbers in the assertion text.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from abtest.stats import (
    ProportionStatistic,
    RatioStatistic,
    SampleMeanStatistic,
    always_valid_p_values,
    delta_method_ratio_test,
    minimum_detectable_effect_means,
    msprt_tau,
    power_means,
    power_proportions,
    two_proportion_ztest,
    welch_ttest,
)

ALPHA = 0.05


def sample_mean_stats(x: np.ndarray) -> list[SampleMeanStatistic]:
    """One statistic per row of an (experiments, units) array."""
    sums, squares = x.sum(axis=1), np.einsum("ij,ij->i", x, x)
    return [
        SampleMeanStatistic(x.shape[1], float(s), float(q))
        for s, q in zip(sums, squares, strict=True)
    ]


def welch_p_values(control: np.ndarray, treatment: np.ndarray) -> np.ndarray:
    results = [
        welch_ttest(c, t)
        for c, t in zip(sample_mean_stats(control), sample_mean_stats(treatment), strict=True)
    ]
    return np.array([r.p_value for r in results])


def test_fixed_horizon_welch_false_positive_rate() -> None:
    """10,000 A/A experiments, unequal sizes and variances (40 units sd 1 vs 80 units sd 3)."""
    rng = np.random.default_rng(2024)
    p = welch_p_values(rng.normal(5.0, 1.0, (10_000, 40)), rng.normal(5.0, 3.0, (10_000, 80)))
    fpr = float((p < ALPHA).mean())
    assert 0.04 <= fpr <= 0.06, f"Welch A/A false-positive rate {fpr:.4f}"


def test_fixed_horizon_proportion_false_positive_rate() -> None:
    rng = np.random.default_rng(7)
    n, sims = 3000, 10_000
    x_c, x_t = rng.binomial(n, 0.08, sims), rng.binomial(n, 0.08, sims)
    p = np.array(
        [
            two_proportion_ztest(
                ProportionStatistic(n, int(a)), ProportionStatistic(n, int(b))
            ).p_value
            for a, b in zip(x_c, x_t, strict=True)
        ]
    )
    fpr = float((p < ALPHA).mean())
    assert 0.04 <= fpr <= 0.06, f"z-test A/A false-positive rate {fpr:.4f}"


def cumulative_looks(
    rng: np.random.Generator, draw: str, sims: int, looks: int, batch: int
) -> tuple[np.ndarray, ...]:
    """Effect, its variance and the per-arm n at every look of A/A experiments (cumulative data)."""
    out = []
    for _ in range(2):
        x = (
            rng.normal(0.0, 1.0, (sims, looks, batch))
            if draw == "normal"
            else rng.lognormal(0.0, 1.0, (sims, looks, batch))
        )
        s = np.cumsum(x.sum(axis=2), axis=1)
        q = np.cumsum(np.einsum("ijk,ijk->ij", x, x), axis=1)
        n = batch * np.arange(1, looks + 1)
        out.append((s / n, (q - s * s / n) / (n - 1), n))
    (m_c, v_c, n), (m_t, v_t, _) = out
    return m_t - m_c, v_t / n + v_c / n, m_c, v_c, m_t, v_t, n


@pytest.mark.parametrize(
    ("draw", "sims", "looks", "batch"), [("normal", 3000, 25, 40), ("lognormal", 2000, 100, 20)]
)
def test_msprt_controls_false_positives_under_peeking_where_naive_t_does_not(
    draw: str, sims: int, looks: int, batch: int
) -> None:
    rng = np.random.default_rng(99)
    effect, variance, m_c, v_c, m_t, v_t, n = cumulative_looks(rng, draw, sims, looks, batch)
    sd = 1.0 if draw == "normal" else float(np.sqrt((np.e - 1) * np.e))
    tau = msprt_tau(sd, n[-1])
    p_seq = always_valid_p_values(effect, variance, tau)
    fpr_seq = float((p_seq[:, -1] < ALPHA).mean())  # running minimum: rejected at any look

    naive = stats.ttest_ind_from_stats(
        m_t, np.sqrt(v_t), n, m_c, np.sqrt(v_c), n, equal_var=False
    ).pvalue
    fpr_naive = float((naive < ALPHA).any(axis=1).mean())
    fpr_final = float((naive[:, -1] < ALPHA).mean())
    summary = (
        f"{draw}: {looks} looks, mSPRT {fpr_seq:.4f}, naive peeking {fpr_naive:.4f}, "
        f"last look only {fpr_final:.4f}"
    )
    assert fpr_seq <= ALPHA, summary
    assert fpr_naive > 2 * ALPHA, summary
    assert 0.035 <= fpr_final <= 0.065, summary


def test_welch_power_matches_calculator() -> None:
    rng = np.random.default_rng(314)
    n, sd, sims = 50, 2.0, 5000
    for target in (0.8, 0.5):
        effect = minimum_detectable_effect_means(sd, n, power=target)
        p = welch_p_values(rng.normal(0.0, sd, (sims, n)), rng.normal(effect, sd, (sims, n)))
        empirical = float((p < ALPHA).mean())
        predicted = power_means(effect, sd, n)
        assert abs(empirical - predicted) <= 0.03, (
            f"Welch power {empirical:.4f} vs calculator {predicted:.4f}"
        )


def test_proportion_power_matches_calculator() -> None:
    rng = np.random.default_rng(271)
    n, sims, p_c, p_t = 4000, 5000, 0.10, 0.115
    x_c, x_t = rng.binomial(n, p_c, sims), rng.binomial(n, p_t, sims)
    p = np.array(
        [
            two_proportion_ztest(
                ProportionStatistic(n, int(a)), ProportionStatistic(n, int(b))
            ).p_value
            for a, b in zip(x_c, x_t, strict=True)
        ]
    )
    empirical = float((p < ALPHA).mean())
    predicted = power_proportions(p_c, p_t, n)
    assert abs(empirical - predicted) <= 0.03, (
        f"z-test power {empirical:.4f} vs calculator {predicted:.4f}"
    )


def test_relative_interval_coverage() -> None:
    """The delta-method interval for the lift covers the true lift ~95 % of the time."""
    rng = np.random.default_rng(8)
    sims, n, true_lift = 4000, 200, 0.05
    control = sample_mean_stats(rng.normal(10.0, 6.0, (sims, n)))
    treatment = sample_mean_stats(rng.normal(10.0 * (1 + true_lift), 6.0, (sims, n)))
    cis = [welch_ttest(c, t).ci_rel for c, t in zip(control, treatment, strict=True)]
    coverage = float(np.mean([ci is not None and ci[0] <= true_lift <= ci[1] for ci in cis]))
    assert 0.935 <= coverage <= 0.965, f"relative CI coverage {coverage:.4f}"


def test_delta_method_ratio_interval_coverage() -> None:
    """Clicks/views per user with views varying by user: the ratio difference is covered ~95 %."""
    rng = np.random.default_rng(12)
    sims, n, rates = 3000, 300, (0.10, 0.12)
    results = []
    views = rng.poisson(6.0, (2, sims, n)) + 1
    clicks = rng.binomial(
        views, np.array(rates)[:, None, None] * rng.gamma(4.0, 0.25, (2, sims, n)).clip(0, 1 / 0.12)
    )
    m, d = clicks.astype(float), views.astype(float)
    sums = [
        (m[a].sum(1), (m[a] ** 2).sum(1), d[a].sum(1), (d[a] ** 2).sum(1), (m[a] * d[a]).sum(1))
        for a in range(2)
    ]
    for i in range(sims):
        c, t = (RatioStatistic(n, *(float(col[i]) for col in sums[a])) for a in range(2))
        results.append(delta_method_ratio_test(c, t).ci_abs)
    true_diff = rates[1] - rates[0]
    coverage = float(np.mean([ci is not None and ci[0] <= true_diff <= ci[1] for ci in results]))
    assert 0.935 <= coverage <= 0.965, f"delta-method ratio CI coverage {coverage:.4f}"
