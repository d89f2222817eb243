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
``p_value`` always tests effect_abs = 0, so it agrees with ``ci_abs``; ``ci_rel`` is a different
linearisation and can disagree with it at the boundary.
"""

from __future__ import annotations

import math

from scipy import stats

from abtest.stats._contrast import (
    Contrast,
    arm_check,
    check_alpha,
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


def _t_result(
    contrast: Contrast, method: Method, df: float, alpha: float, nc: int, nt: int
) -> TestResult:
    crit = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    p_value = float(2.0 * stats.t.sf(abs(contrast.effect) / contrast.se, df))
    return _with_intervals(contrast, method, p_value, crit, alpha, nc, nt)


def _z_result(
    contrast: Contrast, method: Method, z: float, alpha: float, nc: int, nt: int
) -> TestResult:
    crit = float(stats.norm.ppf(1.0 - alpha / 2.0))
    p_value = float(2.0 * stats.norm.sf(abs(z)))
    return _with_intervals(contrast, method, p_value, crit, alpha, nc, nt)


def _with_intervals(
    contrast: Contrast, method: Method, p_value: float, crit: float, alpha: float, nc: int, nt: int
) -> TestResult:
    rel = contrast.relative()
    return contrast.result(
        method,
        p_value=p_value,
        halfwidth_abs=crit * contrast.se,
        halfwidth_rel=None if rel is None else crit * math.sqrt(rel[1]),
        alpha=alpha,
        n_control=nc,
        n_treatment=nt,
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
    """Two-sample z-test for a difference in proportions.

    The p-value uses the pooled standard error under H0, sqrt(p̄(1 − p̄)(1/n_c + 1/n_t)), as
    ``statsmodels.stats.proportion.proportions_ztest`` does; the intervals use the unpooled (Wald)
    standard error sqrt(p_t(1 − p_t)/n_t + p_c(1 − p_c)/n_c), which does not assume H0.
    """
    check_alpha(alpha)
    nc, nt = control.n, treatment.n
    early = arm_check("two_proportion_z", alpha, nc, nt, control.mean, treatment.mean, min_n=1)
    if early is not None:
        return early
    contrast = Contrast.independent(
        control.mean, control.variance / nc, treatment.mean, treatment.variance / nt
    )
    pooled = (control.sum + treatment.sum) / (nc + nt)
    se_null = math.sqrt(pooled * (1.0 - pooled) * (1.0 / nc + 1.0 / nt))
    if se_null == 0:
        return zero_variance_result("two_proportion_z", contrast, alpha, nc, nt)
    return _z_result(contrast, "two_proportion_z", contrast.effect / se_null, alpha, nc, nt)


def delta_method_ratio_test(
    control: RatioStatistic, treatment: RatioStatistic, *, alpha: float = 0.05
) -> TestResult:
    """z-test on the difference of two ratio metrics R = Σm / Σd (e.g. clicks per impression).

    Each arm's Var(R̂) is the delta-method variance of a ratio of means (Deng, Knoblich, Lu 2018):
    (σ²_m − 2Rσ_md + R²σ²_d) / (n μ_d²). The arms are independent, so Var(R̂_t − R̂_c) is the sum.
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
    contrast = Contrast.independent(
        control.mean, control.variance / nc, treatment.mean, treatment.variance / nt
    )
    if contrast.variance == 0:
        return zero_variance_result("delta_ratio", contrast, alpha, nc, nt)
    return _z_result(contrast, "delta_ratio", contrast.effect / contrast.se, alpha, nc, nt)


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
    mean_c, mean_t = control.post.mean, treatment.post.mean
    early = arm_check("cuped_t", alpha, nc, nt, mean_c, mean_t, min_n=2)
    if early is not None:
        return early
    theta = (control + treatment).theta
    vc, vt = control.adjusted_variance(theta) / nc, treatment.adjusted_variance(theta) / nt
    contrast = Contrast(
        control_mean=mean_c,
        treatment_mean=mean_t,
        effect=(mean_t - mean_c) - theta * (treatment.pre.mean - control.pre.mean),
        variance=vc + vt,
        control_variance=control.post.variance / nc,
        covariance=-(control.post.variance - theta * control.covariance) / nc,
    )
    if contrast.variance == 0:
        return zero_variance_result("cuped_t", contrast, alpha, nc, nt)
    return _t_result(contrast, "cuped_t", welch_satterthwaite_df(vc, nc, vt, nt), alpha, nc, nt)
