"""The shared core of every two-arm test: an effect estimate, its variance, and the relative effect.

Each test reduces its sufficient statistics to a ``Contrast``; the relative effect and its variance
then follow one formula for all of them, the delta method on effect / control_mean (Deng et al.
2018). Keeping this in one place is what makes the relative-effect convention the same for Welch,
proportions, ratio metrics, CUPED, mSPRT and the Bayesian posterior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from abtest.stats.result import Interval, Message, Method, TestResult
from abtest.stats.statistics import RegressionAdjustedStatistic

__all__ = [
    "Contrast",
    "arm_check",
    "check_alpha",
    "cuped_contrast",
    "degenerate_result",
    "zero_variance_result",
]


def check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


@dataclass(frozen=True)
class Contrast:
    """Estimated effect = treatment − control with the (co)variances the delta method needs.

    ``variance`` is Var(effect), ``control_variance`` is Var(control_mean) and
    ``covariance`` is Cov(effect, control_mean); all are variances of estimates (already / n).
    """

    control_mean: float
    treatment_mean: float
    effect: float
    variance: float
    control_variance: float
    covariance: float

    @property
    def se(self) -> float:
        """Standard error of the effect."""
        return math.sqrt(self.variance)

    @classmethod
    def independent(
        cls,
        control_mean: float,
        control_variance: float,
        treatment_mean: float,
        treatment_variance: float,
    ) -> Contrast:
        """Two independent arm estimates: Var(effect) = V_t + V_c, Cov(effect, c) = −V_c."""
        return cls(
            control_mean=control_mean,
            treatment_mean=treatment_mean,
            effect=treatment_mean - control_mean,
            variance=treatment_variance + control_variance,
            control_variance=control_variance,
            covariance=-control_variance,
        )

    def relative(self) -> tuple[float, float] | None:
        """Lift L = effect / c and Var(L) by the delta method, or None when c = 0.

        Var(L) ≈ Var(Δ)/c² − 2Δ·Cov(Δ, c)/c³ + Δ²·Var(c)/c⁴. For independent arms this is
        V_t/c² + t²·V_c/c⁴, GrowthBook's ``frequentist_variance_relative``.
        """
        c = self.control_mean
        if c == 0:
            return None
        d = self.effect
        var = (
            self.variance / c**2
            - 2 * d * self.covariance / c**3
            + d**2 * self.control_variance / c**4
        )
        return d / c, max(var, 0.0)

    def result(
        self,
        method: Method,
        *,
        p_value: float,
        halfwidth_abs: float,
        halfwidth_rel: float | None,
        alpha: float,
        n_control: int,
        n_treatment: int,
        p_value_rel: float | None = None,
        tau: float | None = None,
    ) -> TestResult:
        """A TestResult from this contrast, given the p-values and the interval half-widths."""
        rel = self.relative()
        ci_rel: Interval | None = None
        if rel is not None and halfwidth_rel is not None:
            ci_rel = (rel[0] - halfwidth_rel, rel[0] + halfwidth_rel)
        message: Message = "ok" if rel is not None else "zero_control_mean"
        return TestResult(
            method=method,
            control_mean=self.control_mean,
            treatment_mean=self.treatment_mean,
            effect_abs=self.effect,
            effect_rel=None if rel is None else rel[0],
            ci_abs=(self.effect - halfwidth_abs, self.effect + halfwidth_abs),
            ci_rel=ci_rel,
            p_value=p_value,
            alpha=alpha,
            n_control=n_control,
            n_treatment=n_treatment,
            message=message,
            p_value_rel=None if rel is None else p_value_rel,
            variance_abs=self.variance,
            tau=tau,
        )


def cuped_contrast(
    control: RegressionAdjustedStatistic, treatment: RegressionAdjustedStatistic
) -> tuple[Contrast, float, float]:
    """CUPED's contrast of y − θx (Deng et al. 2013), θ estimated on the pooled arms.

    Returns the contrast and the adjusted variances of the two arm means (V_c, V_t), which the
    Welch–Satterthwaite degrees of freedom need. The effect is (ȳ_t − ȳ_c) − θ(x̄_t − x̄_c); the
    means are the raw ones, and Cov(effect, ȳ_c) = −(σ²_y,c − θσ_xy,c)/n_c for the relative lift.
    Both arms need n ≥ 1.
    """
    nc, nt = control.n, treatment.n
    theta = (control + treatment).theta
    vc, vt = control.adjusted_variance(theta) / nc, treatment.adjusted_variance(theta) / nt
    mean_c, mean_t = control.post.mean, treatment.post.mean
    contrast = Contrast(
        control_mean=mean_c,
        treatment_mean=mean_t,
        effect=(mean_t - mean_c) - theta * (treatment.pre.mean - control.pre.mean),
        variance=vc + vt,
        control_variance=control.post.variance / nc,
        covariance=-(control.post.variance - theta * control.covariance) / nc,
    )
    return contrast, vc, vt


def degenerate_result(
    method: Method,
    message: Message,
    *,
    alpha: float,
    n_control: int,
    n_treatment: int,
    control_mean: float = 0.0,
    treatment_mean: float = 0.0,
    effect_abs: float | None = None,
) -> TestResult:
    """A result for input no test can be run on: no p-value, no intervals, a coded message."""
    effect_rel = None
    if effect_abs is not None and control_mean != 0:
        effect_rel = effect_abs / control_mean
    return TestResult(
        method=method,
        control_mean=control_mean,
        treatment_mean=treatment_mean,
        effect_abs=effect_abs,
        effect_rel=effect_rel,
        ci_abs=None,
        ci_rel=None,
        p_value=None,
        alpha=alpha,
        n_control=n_control,
        n_treatment=n_treatment,
        message=message,
    )


def arm_check(
    method: Method, alpha: float, nc: int, nt: int, mean_c: float, mean_t: float, min_n: int
) -> TestResult | None:
    """The coded result for an empty or too small arm, or None when the test can run."""
    if nc == 0 or nt == 0:
        return degenerate_result(
            method,
            "empty_arm",
            alpha=alpha,
            n_control=nc,
            n_treatment=nt,
            control_mean=mean_c,
            treatment_mean=mean_t,
        )
    if nc < min_n or nt < min_n:
        return degenerate_result(
            method,
            "insufficient_data",
            alpha=alpha,
            n_control=nc,
            n_treatment=nt,
            control_mean=mean_c,
            treatment_mean=mean_t,
            effect_abs=mean_t - mean_c,
        )
    return None


def zero_variance_result(
    method: Method, contrast: Contrast, alpha: float, nc: int, nt: int
) -> TestResult:
    """The coded result when the effect's standard error is zero."""
    return degenerate_result(
        method,
        "zero_variance",
        alpha=alpha,
        n_control=nc,
        n_treatment=nt,
        control_mean=contrast.control_mean,
        treatment_mean=contrast.treatment_mean,
        effect_abs=contrast.effect,
    )
