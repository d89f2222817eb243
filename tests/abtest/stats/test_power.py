"""Power, MDE and sample size against statsmodels and closed forms."""

from __future__ import annotations

import math

import pytest
from scipy import stats
from statsmodels.stats.power import NormalIndPower, TTestIndPower
from statsmodels.stats.proportion import power_proportions_2indep

from abtest.stats import (
    Distribution,
    minimum_detectable_effect_means,
    minimum_detectable_effect_proportions,
    power_means,
    power_proportions,
    sample_size_means,
    sample_size_proportions,
)

MEAN_CASES = [
    (0.5, 1.0, 64, 0.05),
    (0.1, 2.0, 1000, 0.05),
    (3.0, 10.0, 20, 0.01),
    (-0.2, 1.0, 300, 0.1),
]


@pytest.mark.parametrize(("effect", "sd", "n", "alpha"), MEAN_CASES)
def test_power_means_matches_statsmodels(effect: float, sd: float, n: int, alpha: float) -> None:
    t_ref = TTestIndPower().power(effect_size=effect / sd, nobs1=n, alpha=alpha, ratio=1.0)
    z_ref = NormalIndPower().power(effect_size=effect / sd, nobs1=n, alpha=alpha, ratio=1.0)
    assert power_means(effect, sd, n, alpha=alpha) == pytest.approx(t_ref, rel=1e-7)
    assert power_means(effect, sd, n, alpha=alpha, distribution="normal") == pytest.approx(
        z_ref, rel=1e-9
    )


@pytest.mark.parametrize("distribution", ["t", "normal"])
@pytest.mark.parametrize(("sd", "n", "power"), [(1.0, 50, 0.8), (3.0, 2000, 0.9), (1.0, 8, 0.5)])
def test_mde_and_sample_size_means_invert_power(
    distribution: Distribution, sd: float, n: int, power: float
) -> None:
    solver = TTestIndPower() if distribution == "t" else NormalIndPower()
    mde = minimum_detectable_effect_means(sd, n, power=power, distribution=distribution)
    ref = solver.solve_power(effect_size=None, nobs1=n, alpha=0.05, power=power, ratio=1.0)
    assert mde / sd == pytest.approx(ref, rel=1e-4)  # statsmodels' own root finder is looser
    at_mde = solver.power(effect_size=mde / sd, nobs1=n, alpha=0.05, ratio=1.0)
    assert at_mde == pytest.approx(power, rel=1e-8)

    needed = sample_size_means(mde, sd, power=power, distribution=distribution)
    assert needed == n
    assert power_means(mde, sd, needed, distribution=distribution) >= power - 1e-9
    nobs = solver.solve_power(
        effect_size=0.7 * mde / sd, nobs1=None, alpha=0.05, power=power, ratio=1.0
    )
    smaller = sample_size_means(0.7 * mde, sd, power=power, distribution=distribution)
    assert smaller == math.ceil(nobs)


def test_sample_size_means_closed_form() -> None:
    """n ≈ 2(z₁₋α/₂ + z_power)² σ²/δ², the textbook normal formula."""
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert sample_size_means(0.1, 1.0, distribution="normal") == math.ceil(2 * z**2 / 0.01)
    assert sample_size_means(100.0, 1.0) == 2


PROPORTION_CASES = [
    (0.1, 0.12, 1000, 0.05),
    (0.02, 0.021, 200_000, 0.05),
    (0.5, 0.4, 100, 0.01),
    (0.3, 0.25, 50, 0.1),
]


@pytest.mark.parametrize(("p_c", "p_t", "n", "alpha"), PROPORTION_CASES)
def test_power_proportions_matches_statsmodels(
    p_c: float, p_t: float, n: int, alpha: float
) -> None:
    ref = power_proportions_2indep(p_t - p_c, p_c, n, alpha=alpha, return_results=False)
    assert power_proportions(p_c, p_t, n, alpha=alpha) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize(("p_c", "p_t"), [(0.1, 0.12), (0.02, 0.021), (0.5, 0.45)])
def test_sample_size_proportions_closed_form(p_c: float, p_t: float) -> None:
    """Fleiss' n = (z₁₋α/₂·sqrt(2p̄q̄) + z_power·sqrt(p_c q_c + p_t q_t))² / Δ², one tail ignored."""
    pbar = (p_c + p_t) / 2
    z_a, z_b = stats.norm.ppf(0.975), stats.norm.ppf(0.8)
    term = z_a * math.sqrt(2 * pbar * (1 - pbar)) + z_b * math.sqrt(
        p_c * (1 - p_c) + p_t * (1 - p_t)
    )
    closed = math.ceil(term**2 / (p_t - p_c) ** 2)
    n = sample_size_proportions(p_c, p_t)
    assert n in (closed - 1, closed)  # the far tail adds a sliver of power
    assert power_proportions(p_c, p_t, n) >= 0.8 > power_proportions(p_c, p_t, n - 1)


def test_mde_proportions_inverts_power() -> None:
    mde = minimum_detectable_effect_proportions(0.1, 5000, power=0.8)
    assert power_proportions(0.1, 0.1 + mde, 5000) == pytest.approx(0.8, rel=1e-9)
    assert sample_size_proportions(0.1, 0.1 + mde) == 5000
    with pytest.raises(ValueError, match="detectable"):
        minimum_detectable_effect_proportions(0.5, 2, power=0.99)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: power_means(1.0, 0.0, 10), "sd"),
        (lambda: power_means(1.0, 1.0, 1), "n_per_arm"),
        (lambda: sample_size_means(0.0, 1.0), "non-zero"),
        (lambda: minimum_detectable_effect_means(1.0, 10, power=0.01), "power"),
        (lambda: power_proportions(0.0, 0.1, 100), "p_control"),
        (lambda: sample_size_proportions(0.1, 0.1), "differ"),
    ],
)
def test_invalid_parameters(call: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        call()  # type: ignore[operator]
