"""Fixed-horizon frequentist tests of treatment versus control.

Relative effects, the project's one convention
----------------------------------------------
Every test reports ``effect_rel = effect_abs / control_mean`` and its interval from the delta
method on that ratio, ``effect_rel ± crit · sqrt(Var(lift))`` with

    Var(lift) ≈ Var(Δ)/c² − 2Δ·Cov(Δ, c)/c³ + Δ²·Var(c)/c⁴,

which for two independent arms is V_t/c² + t²·V_c/c⁴ (Deng, Knoblich, Lu 2018, "Applying the Delta
Method in Metric Analytics"). This is GrowthBook's convention (gbstats
``frequentist_variance_relative``), chosen over tea-tasting's log scale so that the absolute and
relative readouts share one critical value and one linearisation. The interval is symmetric and
can cross −100 %; it is accurate when the control mean is many standard errors from zero.
Each scale has its own p-value, computed with the interval of that scale: ``p_value`` tests
effect_abs = 0 with ``ci_abs``'s standard error, ``p_value_rel`` tests lift = 0 with ``ci_rel``'s
delta-method standard error and the same critical value (GrowthBook's ``TwoSidedTTest``, which
tests the lift). The two linearisations can disagree near the boundary, so a readout shows each
p-value beside its own interval: ``abtest.readout`` shows the lift, ``ci_rel`` and ``p_value_rel``.

Means and ratios use Student's t with Welch–Satterthwaite degrees of freedom on the two arms'
variances (the delta-method variance for a ratio, as GrowthBook's ``TTest.dof``), so small
experiments are not liberal; proportions use the normal (z) test.
"""

from __future__ import annotations

import math

from scipy import special

from abtest.stats._contrast import (
    Contrast,
    arm_check,
    check_alpha,
    cuped_contrast,
    degenerate_result,
    zero_variance_result,
)
from abtest.stats.result import Method, TestResult
from abtest.stats.statistics import (
    ProportionStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
)

__all__ = ["cuped_ttest", "delta_method_ratio_test", "two_proportion_ztest", "welch_ttest"]


def welch_satterthwaite_df(
    var_control: float, n_control: int, var_treatment: float, n_treatment: int
) -> float:
    """Welch–Satterthwaite degrees of freedom from the variances of the two arm means."""
    num = (var_control + var_treatment) ** 2
    den = var_control**2 / (n_control - 1) + var_treatment**2 / (n_treatment - 1)
    return num / den


def _t_sf(x: float, df: float | None) -> float:
    """P(T > x) for Student's t with ``df`` degrees of freedom, or the normal when None.

    ``scipy.special``'s kernels are what ``scipy.stats.t.sf``/``norm.sf`` evaluate, without the
    distribution objects' per-call overhead (the readout runs these once per row and look).
    """
    return float(special.ndtr(-x) if df is None else special.stdtr(df, -x))


def _t_result(
    contrast: Contrast, method: Method, df: float, alpha: float, nc: int, nt: int
) -> TestResult:
    crit = float(special.stdtrit(df, 1.0 - alpha / 2.0))
    p_value = 2.0 * _t_sf(abs(contrast.effect) / contrast.se, df)
    return _with_intervals(contrast, method, p_value, crit, alpha, nc, nt, df=df)


def _z_result(
    contrast: Contrast, method: Method, z: float, alpha: float, nc: int, nt: int
) -> TestResult:
    crit = float(special.ndtri(1.0 - alpha / 2.0))
    p_value = 2.0 * _t_sf(abs(z), None)
    return _with_intervals(contrast, method, p_value, crit, alpha, nc, nt, df=None)


def _with_intervals(
    contrast: Contrast,
    method: Method,
    p_value: float,
    crit: float,
    alpha: float,
    nc: int,
    nt: int,
    *,
    df: float | None,
) -> TestResult:
    """The result with both intervals, and the lift's p-value from the lift's own interval:
    2·P(T > |lift| / se(lift)) with T ~ t(df), or normal when ``df`` is None."""
    rel = contrast.relative()
    halfwidth_rel = p_value_rel = None
    if rel is not None:
        se_rel = math.sqrt(rel[1])
        halfwidth_rel = crit * se_rel
        if se_rel > 0:
            z_rel = abs(rel[0]) / se_rel
            p_value_rel = 2.0 * _t_sf(z_rel, df)
    return contrast.result(
        method,
        p_value=p_value,
        halfwidth_abs=crit * contrast.se,
        halfwidth_rel=halfwidth_rel,
        alpha=alpha,
        n_control=nc,
        n_treatment=nt,
        p_value_rel=p_value_rel,
    )


def welch_ttest(
    control: SampleMeanStatistic, treatment: SampleMeanStatistic, *, alpha: float = 0.05
) -> TestResult:
    """Welch's unequal-variance t-test on the difference in means (Welch 1947).

    t = (x̄_t − x̄_c) / sqrt(s²_t/n_t + s²_c/n_c) with Welch–Satterthwaite degrees of freedom;
    matches ``scipy.stats.ttest_ind(equal_var=False)`` and its confidence interval.
    """
    check_alpha(alpha)
    nc, nt = control.n, treatment.n
    early = arm_check("welch_t", alpha, nc, nt, control.mean, treatment.mean, min_n=2)
    if early is not None:
        return early
    vc, vt = control.variance / nc, treatment.variance / nt
    contrast = Contrast.independent(control.mean, vc, treatment.mean, vt)
    if contrast.variance == 0:
        return zero_variance_result("welch_t", contrast, alpha, nc, nt)
    return _t_result(contrast, "welch_t", welch_satterthwaite_df(vc, nc, vt, nt), alpha, nc, nt)


def two_proportion_ztest(
    control: ProportionStatistic, treatment: ProportionStatistic, *, alpha: float = 0.05
) -> TestResult:
    """Two-sample Wald z-test for a difference in proportions.

    z = (p̂_t − p̂_c) / sqrt(p̂_t(1 − p̂_t)/n_t + p̂_c(1 − p̂_c)/n_c): the unpooled standard error, as
    GrowthBook uses and as ``statsmodels.stats.proportion.test_proportions_2indep(method="wald")``.
    The p-value and both intervals share that one standard error, so each p-value agrees with its
    interval (the textbook pooled z-test's p-value does not agree with the Wald interval at the
    boundary). ``abtest.stats.power``'s proportion functions describe the pooled test, whose power
    is within a point of this one's at the sizes of online experiments.
    """
    check_alpha(alpha)
    nc, nt = control.n, treatment.n
    early = arm_check("two_proportion_z", alpha, nc, nt, control.mean, treatment.mean, min_n=1)
    if early is not None:
        return early
    contrast = Contrast.independent(
        control.mean, control.variance / nc, treatment.mean, treatment.variance / nt
    )
    if contrast.variance == 0:
        return zero_variance_result("two_proportion_z", contrast, alpha, nc, nt)
    return _z_result(contrast, "two_proportion_z", contrast.effect / contrast.se, alpha, nc, nt)


def delta_method_ratio_test(
    control: RatioStatistic, treatment: RatioStatistic, *, alpha: float = 0.05
) -> TestResult:
    """t-test on the difference of two ratio metrics R = Σm / Σd (e.g. clicks per impression).

    Each arm's Var(R̂) is the delta-method variance of a ratio of means (Deng, Knoblich, Lu 2018):
    (σ²_m − 2Rσ_md + R²σ²_d) / (n μ_d²). The arms are independent, so Var(R̂_t − R̂_c) is the sum.
    The reference distribution is t with Welch–Satterthwaite degrees of freedom on the two arms'
    Var(R̂), as for the other mean tests (GrowthBook's ``TTest.dof``); with d ≡ 1 this is exactly
    Welch's test on m.
    """
    check_alpha(alpha)
    nc, nt = control.n, treatment.n
    early = arm_check("delta_ratio", alpha, nc, nt, control.mean, treatment.mean, min_n=2)
    if early is not None:
        return early
    if control.d_sum == 0 or treatment.d_sum == 0:
        return degenerate_result(
            "delta_ratio", "zero_denominator", alpha=alpha, n_control=nc, n_treatment=nt
        )
    vc, vt = control.variance / nc, treatment.variance / nt
    contrast = Contrast.independent(control.mean, vc, treatment.mean, vt)
    if contrast.variance == 0:
        return zero_variance_result("delta_ratio", contrast, alpha, nc, nt)
    return _t_result(contrast, "delta_ratio", welch_satterthwaite_df(vc, nc, vt, nt), alpha, nc, nt)


def cuped_ttest(
    control: RegressionAdjustedStatistic,
    treatment: RegressionAdjustedStatistic,
    *,
    alpha: float = 0.05,
) -> TestResult:
    """CUPED: Welch's t-test on y − θx, with θ = Cov(y, x)/Var(x) estimated on the pooled arms.

    Deng, Xu, Kohavi, Walker 2013, "Improving the Sensitivity of Online Controlled Experiments by
    Utilizing Pre-Experiment Data". The effect is (ȳ_t − ȳ_c) − θ(x̄_t − x̄_c); θ is treated as
    known, which is the paper's (and GrowthBook's) large-sample approximation. This equals a Welch
    test on the residuals of a pooled OLS fit of y on x. The reported means are the raw ones; the
    relative effect is effect_abs / ȳ_c with Cov(effect, ȳ_c) = −(σ²_y,c − θσ_xy,c)/n_c.
    """
    check_alpha(alpha)
    nc, nt = control.n, treatment.n
    early = arm_check("cuped_t", alpha, nc, nt, control.post.mean, treatment.post.mean, min_n=2)
    if early is not None:
        return early
    contrast, vc, vt = cuped_contrast(control, treatment)
    if contrast.variance == 0:
        return zero_variance_result("cuped_t", contrast, alpha, nc, nt)
    return _t_result(contrast, "cuped_t", welch_satterthwaite_df(vc, nc, vt, nt), alpha, nc, nt)
