"""Bayesian readout with a normal approximation, as GrowthBook's Bayesian engine does.

The likelihood of the effect is N(Δ̂, V) from the same sufficient statistics as the frequentist
tests (absolute difference, or the relative lift with the delta-method variance of the project's
convention). With a flat prior the posterior is that normal; with a normal prior N(m, s₀²) it is
the conjugate update, precision 1/V + 1/s₀² and mean (Δ̂/V + m/s₀²)/precision. From the posterior
N(μ, s²) of the effect X:

    chance to win = P(X > 0) = Φ(μ/s),
    expected loss of shipping treatment = E[max(0, −X)] = s·φ(μ/s) − μ·Φ(−μ/s),
    expected loss of keeping control   = E[max(0, X)]  = s·φ(μ/s) + μ·Φ(μ/s),

(Stucchio 2015, "Bayesian A/B Testing at VWO", for the loss). Higher is taken as better; for a
metric where lower is better, read chance_to_win as the chance to lose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from abtest.stats._contrast import Contrast, check_alpha
from abtest.stats.result import BayesianResult, DifferenceType, Message
from abtest.stats.statistics import ProportionStatistic, RatioStatistic, SampleMeanStatistic

__all__ = ["NormalPrior", "bayesian_normal_test"]

ArmStatistic = SampleMeanStatistic | ProportionStatistic | RatioStatistic


@dataclass(frozen=True)
class NormalPrior:
    """A normal prior N(mean, sd²) on the effect, in the units of the chosen ``difference``.

    The default, N(0, 0.3²) on the relative lift, is GrowthBook's weakly informative prior: lifts
    beyond ±60 % are a priori unlikely. Pass ``prior=None`` for a flat (improper) prior.
    """

    mean: float = 0.0
    sd: float = 0.3

    def __post_init__(self) -> None:
        if not self.sd > 0 or not math.isfinite(self.sd):
            raise ValueError(f"prior sd must be positive and finite, got {self.sd}")


def _degenerate(
    message: Message,
    difference: DifferenceType,
    alpha: float,
    control: ArmStatistic,
    treatment: ArmStatistic,
) -> BayesianResult:
    return BayesianResult(
        method="bayesian_normal",
        difference=difference,
        control_mean=control.mean,
        treatment_mean=treatment.mean,
        effect=None,
        effect_sd=None,
        credible_interval=None,
        chance_to_win=None,
        expected_loss_treatment=None,
        expected_loss_control=None,
        alpha=alpha,
        n_control=control.n,
        n_treatment=treatment.n,
        message=message,
    )


def bayesian_normal_test(
    control: ArmStatistic,
    treatment: ArmStatistic,
    *,
    difference: DifferenceType = "relative",
    prior: NormalPrior | None = None,
    alpha: float = 0.05,
) -> BayesianResult:
    """Posterior of the treatment effect, chance to win, expected losses and a credible interval.

    The credible interval is the central 1 − alpha interval of the posterior.
    """
    check_alpha(alpha)
    nc, nt = control.n, treatment.n
    if nc == 0 or nt == 0:
        return _degenerate("empty_arm", difference, alpha, control, treatment)
    if nc < 2 or nt < 2:
        return _degenerate("insufficient_data", difference, alpha, control, treatment)
    if isinstance(control, RatioStatistic) or isinstance(treatment, RatioStatistic):
        ratio_arms = [s for s in (control, treatment) if isinstance(s, RatioStatistic)]
        if any(s.d_sum == 0 for s in ratio_arms):
            return _degenerate("zero_denominator", difference, alpha, control, treatment)
    contrast = Contrast.independent(
        control.mean, control.variance / nc, treatment.mean, treatment.variance / nt
    )
    if difference == "absolute":
        estimate, variance = contrast.effect, contrast.variance
    else:
        rel = contrast.relative()
        if rel is None:
            return _degenerate("zero_control_mean", difference, alpha, control, treatment)
        estimate, variance = rel
    if variance == 0:
        return _degenerate("zero_variance", difference, alpha, control, treatment)

    if prior is None:
        mu, sd = estimate, math.sqrt(variance)
    else:
        precision = 1.0 / variance + 1.0 / prior.sd**2
        mu = (estimate / variance + prior.mean / prior.sd**2) / precision
        sd = math.sqrt(1.0 / precision)
    z = mu / sd
    density = float(stats.norm.pdf(z))
    crit = float(stats.norm.ppf(1.0 - alpha / 2.0))
    return BayesianResult(
        method="bayesian_normal",
        difference=difference,
        control_mean=control.mean,
        treatment_mean=treatment.mean,
        effect=mu,
        effect_sd=sd,
        credible_interval=(mu - crit * sd, mu + crit * sd),
        chance_to_win=float(stats.norm.cdf(z)),
        expected_loss_treatment=sd * density - mu * float(stats.norm.cdf(-z)),
        expected_loss_control=sd * density + mu * float(stats.norm.cdf(z)),
        alpha=alpha,
        n_control=nc,
        n_treatment=nt,
    )
