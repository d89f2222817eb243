"""Power, minimum detectable effect and sample size for two-arm, two-sided tests (equal arms).

Means: with δ the true difference, σ the per-unit sd and n units per arm, the test statistic has
noncentrality λ = δ / (σ·sqrt(2/n)). ``distribution="t"`` uses the noncentral t with 2n − 2
degrees of freedom (as ``statsmodels.stats.power.TTestIndPower``); ``"normal"`` the z-test (as
``NormalIndPower``). Power counts both rejection tails: P(T > c) + P(T < −c).

Proportions: the pooled two-proportion z-test, whose statistic has sd sqrt(2p̄(1 − p̄)) under H0
and sqrt(p_c(1 − p_c) + p_t(1 − p_t)) under H1 (Fleiss, Levin, Paik 2003, "Statistical Methods
for Rates and Proportions"; as statsmodels ``power_proportions_2indep``):
power = Φ((|Δ|√n − z·sd₀)/sd₁) + Φ((−|Δ|√n − z·sd₀)/sd₁). The engine's ``two_proportion_ztest``
is the unpooled (Wald) test, whose power differs from this by well under a point at the sizes
of online experiments (the seeded calibration test checks it against simulation).

MDE and sample size invert these power functions numerically (Brent's method), so the three
functions of each family agree exactly; sample sizes are rounded up to whole units.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from scipy import optimize, stats

__all__ = [
    "Distribution",
    "minimum_detectable_effect_means",
    "minimum_detectable_effect_proportions",
    "power_means",
    "power_proportions",
    "sample_size_means",
    "sample_size_proportions",
]

Distribution = Literal["t", "normal"]


def _check(alpha: float, power: float | None = None) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if power is not None and not alpha < power < 1.0:
        raise ValueError(f"power must lie in (alpha, 1), got {power}")


def _check_proportion(p: float, name: str) -> None:
    if not 0.0 < p < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {p}")


def _solve(f: Callable[[float], float], target: float, lo: float, hi: float, limit: float) -> float:
    """The x in [lo, limit] where the increasing f crosses target, growing hi until it does."""
    while f(hi) < target:
        if hi >= limit:
            raise ValueError(f"target power {target} is not reachable below {limit}")
        hi = min(2.0 * hi, limit)
    return float(optimize.brentq(lambda x: f(x) - target, lo, hi, xtol=1e-12, rtol=1e-12))


def power_means(
    effect: float,
    sd: float,
    n_per_arm: float,
    *,
    alpha: float = 0.05,
    distribution: Distribution = "t",
) -> float:
    """Two-sided power to detect a difference in means ``effect`` with ``n_per_arm`` per arm."""
    _check(alpha)
    if not sd > 0:
        raise ValueError(f"sd must be > 0, got {sd}")
    if n_per_arm < 2:
        raise ValueError(f"n_per_arm must be >= 2, got {n_per_arm}")
    lam = abs(effect) / (sd * math.sqrt(2.0 / n_per_arm))
    if distribution == "normal":
        crit = float(stats.norm.ppf(1.0 - alpha / 2.0))
        return float(stats.norm.sf(crit - lam) + stats.norm.cdf(-crit - lam))
    df = 2.0 * n_per_arm - 2.0
    crit = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    return float(stats.nct.sf(crit, df, lam) + stats.nct.cdf(-crit, df, lam))


def minimum_detectable_effect_means(
    sd: float,
    n_per_arm: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    distribution: Distribution = "t",
) -> float:
    """The smallest |difference in means| detected with probability ``power``."""
    _check(alpha, power)

    def f(effect: float) -> float:
        return power_means(effect, sd, n_per_arm, alpha=alpha, distribution=distribution)

    guess = 3.0 * sd * math.sqrt(2.0 / n_per_arm)
    return _solve(f, power, 0.0, guess, limit=1e6 * guess)


def sample_size_means(
    effect: float,
    sd: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    distribution: Distribution = "t",
) -> int:
    """Units per arm (rounded up, at least 2) to detect ``effect`` with probability ``power``."""
    _check(alpha, power)
    if effect == 0:
        raise ValueError("effect must be non-zero to have a sample size")

    def f(n: float) -> float:
        return power_means(effect, sd, n, alpha=alpha, distribution=distribution)

    if f(2.0) >= power:
        return 2
    return math.ceil(_solve(f, power, 2.0, 4.0, limit=1e12) - 1e-9)


def power_proportions(
    p_control: float, p_treatment: float, n_per_arm: float, *, alpha: float = 0.05
) -> float:
    """Two-sided power of the pooled z-test for proportions p_control → p_treatment."""
    _check(alpha)
    _check_proportion(p_control, "p_control")
    _check_proportion(p_treatment, "p_treatment")
    if not n_per_arm > 0:
        raise ValueError(f"n_per_arm must be > 0, got {n_per_arm}")
    diff = abs(p_treatment - p_control) * math.sqrt(n_per_arm)
    pooled = (p_control + p_treatment) / 2.0
    sd_null = math.sqrt(2.0 * pooled * (1.0 - pooled))
    sd_alt = math.sqrt(p_control * (1.0 - p_control) + p_treatment * (1.0 - p_treatment))
    crit = float(stats.norm.ppf(1.0 - alpha / 2.0))
    upper = stats.norm.cdf((diff - crit * sd_null) / sd_alt)
    lower = stats.norm.cdf((-diff - crit * sd_null) / sd_alt)
    return float(upper + lower)


def minimum_detectable_effect_proportions(
    p_control: float, n_per_arm: float, *, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest absolute increase p_treatment − p_control detected with ``power``.

    Raises ValueError when even p_treatment → 1 is not detectable with ``n_per_arm`` units.
    """
    _check(alpha, power)
    _check_proportion(p_control, "p_control")
    top = 1.0 - 1e-12
    if power_proportions(p_control, top, n_per_arm, alpha=alpha) < power:
        raise ValueError(f"no increase over p_control={p_control} is detectable with n={n_per_arm}")
    p_t = optimize.brentq(
        lambda p: power_proportions(p_control, p, n_per_arm, alpha=alpha) - power,
        p_control,
        top,
        xtol=1e-14,
    )
    return float(p_t) - p_control


def sample_size_proportions(
    p_control: float, p_treatment: float, *, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Units per arm (rounded up) for the pooled z-test to detect p_control → p_treatment."""
    _check(alpha, power)
    if p_control == p_treatment:
        raise ValueError("p_treatment must differ from p_control to have a sample size")

    def f(n: float) -> float:
        return power_proportions(p_control, p_treatment, n, alpha=alpha)

    if f(1.0) >= power:
        return 1
    return math.ceil(_solve(f, power, 1.0, 2.0, limit=1e15) - 1e-9)
