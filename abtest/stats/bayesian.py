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

The default prior is flat (improper), GrowthBook's default: the posterior is then the likelihood
itself and chance to win = Φ(lift / se(lift)), one minus the one-sided p-value of the frequentist
lift test. ``NormalPrior`` is an optional informative prior. CUPED-adjusted arms
(``RegressionAdjustedStatistic``) give the posterior of the CUPED effect, the same estimator as
``cuped_ttest``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import special

from abtest.stats._contrast import Contrast, check_alpha, cuped_contrast
from abtest.stats.result import BayesianResult, DifferenceType, Message
from abtest.stats.statistics import (
    ProportionStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
)

__all__ = ["FLAT_PRIOR", "NormalPrior", "bayesian_normal_test", "describe_prior"]

ArmStatistic = (
    SampleMeanStatistic | ProportionStatistic | RatioStatistic | RegressionAdjustedStatistic
)

FLAT_PRIOR = "flat (improper) prior, GrowthBook's default: the posterior is the likelihood"


@dataclass(frozen=True)
class NormalPrior:
    """An informative normal prior N(mean, sd²) on the effect, in the units of ``difference``.

    Not the default: GrowthBook's default prior is flat (``prior=None`` here). N(0, 0.3²) on the
    relative lift is what GrowthBook offers when its proper prior is switched on; it says lifts
    beyond ±60 % are a priori unlikely and shrinks small, noisy experiments towards no effect.
    """

    mean: float = 0.0
    sd: float = 0.3

    def __post_init__(self) -> None:
        if not self.sd > 0 or not math.isfinite(self.sd):
            raise ValueError(f"prior sd must be positive and finite, got {self.sd}")


def describe_prior(prior: NormalPrior | None, difference: DifferenceType = "relative") -> str:
    """A sentence naming the prior, for readouts and the dashboard."""
    if prior is None:
        return FLAT_PRIOR
    on = "the relative lift" if difference == "relative" else "the absolute effect"
    return f"normal prior N({prior.mean:g}, {prior.sd:g}²) on {on} (informative; not flat)"


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


def _contrast(control: ArmStatistic, treatment: ArmStatistic) -> Contrast:
    if isinstance(control, RegressionAdjustedStatistic) or isinstance(
        treatment, RegressionAdjustedStatistic
    ):
        if not (
            isinstance(control, RegressionAdjustedStatistic)
            and isinstance(treatment, RegressionAdjustedStatistic)
        ):
            raise TypeError("CUPED needs a RegressionAdjustedStatistic for both arms")
        return cuped_contrast(control, treatment)[0]
    return Contrast.independent(
        control.mean, control.variance / control.n, treatment.mean, treatment.variance / treatment.n
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

    The credible interval is the central 1 − alpha interval of the posterior. ``prior=None`` (the
    default) is the flat prior; the result's ``prior`` field names the one used.
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
    contrast = _contrast(control, treatment)
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
    density = math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)  # φ(z)
    crit = float(special.ndtri(1.0 - alpha / 2.0))
    cdf = float(special.ndtr(z))
    return BayesianResult(
        method="bayesian_normal",
        difference=difference,
        control_mean=control.mean,
        treatment_mean=treatment.mean,
        effect=mu,
        effect_sd=sd,
        credible_interval=(mu - crit * sd, mu + crit * sd),
        chance_to_win=cdf,
        expected_loss_treatment=sd * density - mu * float(special.ndtr(-z)),
        expected_loss_control=sd * density + mu * cdf,
        alpha=alpha,
        n_control=nc,
        n_treatment=nt,
        prior=describe_prior(prior, difference),
    )
