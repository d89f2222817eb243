"""Always-valid inference for a difference in means: the mixture SPRT (mSPRT).

Johari, Koomen, Pekelis, Walsh 2017, "Peeking at A/B Tests: Why it matters, and what to do about
it" (KDD). With Δ̂ the estimated difference and V = s²_t/n_t + s²_c/n_c its variance, a normal
mixture N(0, τ²) over the effect gives the likelihood ratio against H0: Δ = 0

    Λ = sqrt(V / (V + τ²)) · exp(Δ̂² τ² / (2V(V + τ²))),

the always-valid p-value p_n = min(1, min_{k ≤ n} 1/Λ_k), and the confidence sequence
{Δ : Λ(Δ̂ − Δ) < 1/α}, i.e. Δ̂ ± sqrt(V(V + τ²)/τ² · (ln((V + τ²)/V) + 2 ln(1/α))).
Type-I error stays ≤ α however often one looks (the variance is a plug-in estimate, so this holds
asymptotically, as in the paper).

The tuning parameter τ (``tau``, in the metric's absolute units) sets where the sequence is
tightest: the half-width at variance V is smallest when τ² = u·V with u = 2 ln(1/α) + ln(1 + u).
**τ must be fixed before the looks it covers** and stay fixed: the running minimum of 1/Λ is a
valid p-value for one τ only. Re-tuning τ to the current sample at every look turns the test into
a fixed |z| threshold (≈ 3 at α = 0.05) whose false-positive rate grows without bound with the
number of looks. ``msprt_tau`` returns τ for a planned horizon (sd and units per arm);
``msprt_tau_at_horizon`` the same from the estimator's variance at an early look (V ∝ 1/n);
``msprt_look`` carries the running minimum and refuses a τ that differs from the previous look's,
as does ``msprt_test(previous=...)``. Too small a τ wastes power on late looks, too large a τ on
early ones, but power is flat over a wide range around the optimum. With τ² = ρ²σ² and V = σ²/t
this boundary is exactly the asymptotic confidence sequence of Waudby-Smith et al. 2023 (Howard et
al. 2021's normal mixture) that Eppo uses, so one implementation serves both.

Relative effects follow the project convention (delta method on effect / control mean) with the
same boundary at τ_rel = τ/|c| — an approximation, as in GrowthBook's sequential readouts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from abtest.stats._contrast import Contrast, arm_check, check_alpha, zero_variance_result
from abtest.stats.result import Interval, TestResult
from abtest.stats.statistics import ProportionStatistic, SampleMeanStatistic

__all__ = [
    "SequentialLook",
    "always_valid_p_values",
    "confidence_sequence_halfwidth",
    "log_mixture_likelihood_ratio",
    "msprt_look",
    "msprt_tau",
    "msprt_tau_at_horizon",
    "msprt_test",
]


def _check_tau(tau: float) -> None:
    if not tau > 0 or not math.isfinite(tau):
        raise ValueError(f"tau must be a positive, finite effect size, got {tau}")


def log_mixture_likelihood_ratio(
    effect: ArrayLike, variance: ArrayLike, tau: float
) -> NDArray[np.float64]:
    """ln Λ for the normal mixture N(0, τ²), elementwise; ``variance`` must be > 0."""
    _check_tau(tau)
    d = np.asarray(effect, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    t2 = tau * tau
    out: NDArray[np.float64] = 0.5 * np.log(v / (v + t2)) + d * d * t2 / (2.0 * v * (v + t2))
    return out


def always_valid_p_values(
    effects: ArrayLike, variances: ArrayLike, tau: float
) -> NDArray[np.float64]:
    """mSPRT p-values at successive looks: min(1, running min of 1/Λ) along the last axis.

    Rows are experiments, columns looks with cumulative data (a 1-D input is one experiment).
    """
    log_lr = log_mixture_likelihood_ratio(effects, variances, tau)
    p = np.exp(-np.maximum(log_lr, 0.0))
    out: NDArray[np.float64] = np.minimum.accumulate(p, axis=-1)
    return out


def confidence_sequence_halfwidth(
    variance: ArrayLike, tau: float, alpha: float = 0.05
) -> NDArray[np.float64]:
    """Half-width sqrt(V(V + τ²)/τ² · (ln((V + τ²)/V) + 2 ln(1/α))) of the mSPRT sequence."""
    _check_tau(tau)
    check_alpha(alpha)
    v = np.asarray(variance, dtype=np.float64)
    t2 = tau * tau
    out: NDArray[np.float64] = np.sqrt(
        v * (v + t2) / t2 * (np.log((v + t2) / v) - 2 * np.log(alpha))
    )
    return out


def _optimal_u(alpha: float) -> float:
    """The fixed point of u = 2 ln(1/α) + ln(1 + u) (a contraction: ln(1 + u) has slope < 1)."""
    two_log = -2.0 * math.log(alpha)
    u = two_log
    for _ in range(100):
        u_next = two_log + math.log1p(u)
        if abs(u_next - u) < 1e-12:
            break
        u = u_next
    return u


def msprt_tau(sd: float, n_per_arm: float, *, alpha: float = 0.05) -> float:
    """τ that makes the confidence sequence tightest when each arm has ``n_per_arm`` units.

    V* = 2sd²/n; τ² = u·V* with u the fixed point of u = 2 ln(1/α) + ln(1 + u). (Howard et al.
    2021's closed form ρ² ∝ −2 ln α + ln(1 − 2 ln α) is the first iterate of this fixed point.)
    Call it once, with the planned horizon, not at every look (see the module docstring).
    """
    check_alpha(alpha)
    if not sd > 0 or not n_per_arm > 0:
        raise ValueError(f"sd and n_per_arm must be > 0, got sd={sd}, n_per_arm={n_per_arm}")
    return math.sqrt(_optimal_u(alpha) * 2.0 * sd * sd / n_per_arm)


def msprt_tau_at_horizon(
    variance: float, n_per_arm: float, horizon_per_arm: float, *, alpha: float = 0.05
) -> float:
    """τ tightest at ``horizon_per_arm`` units per arm, from the estimator's variance now.

    The variance of a difference of means falls as 1/n, so at the horizon it is
    V_h = V·n/N_h and τ² = u·V_h (as ``msprt_tau``). ``variance`` is Var(effect) at this look with
    ``n_per_arm`` units per arm (the mean of the two arms' counts).
    """
    check_alpha(alpha)
    if not variance > 0 or not math.isfinite(variance):
        raise ValueError(f"variance must be positive and finite, got {variance}")
    if not n_per_arm > 0 or not horizon_per_arm > 0:
        raise ValueError(
            f"n_per_arm and horizon_per_arm must be > 0, got {n_per_arm} and {horizon_per_arm}"
        )
    return math.sqrt(_optimal_u(alpha) * variance * n_per_arm / horizon_per_arm)


@dataclass(frozen=True)
class SequentialLook:
    """An mSPRT after ``looks`` looks at one τ: the running minimum of 1/Λ (the always-valid
    p-value) and the running intersection of the confidence sequences, in absolute units."""

    tau: float
    alpha: float
    looks: int
    p_value: float
    cs: Interval


def _same_tau(previous_tau: float | None, tau: float) -> None:
    if previous_tau is None or not math.isclose(previous_tau, tau, rel_tol=1e-12, abs_tol=0.0):
        raise ValueError(
            f"tau changed between looks (previous {previous_tau!r}, now {tau!r}): the running "
            "minimum is an always-valid p-value for one fixed tau only; keep the experiment's "
            "tau, or start a new experiment"
        )


def msprt_look(
    effect: float,
    variance: float,
    *,
    tau: float,
    alpha: float = 0.05,
    previous: SequentialLook | None = None,
) -> SequentialLook:
    """One more look at cumulative data: ``effect`` and its ``variance`` (> 0) now.

    The p-value is min(previous, 1/Λ) and the sequence the intersection with this look's
    effect ± halfwidth (an empty intersection, an α-probability event, keeps this look's).
    A ``previous`` look with another τ or α is refused with ValueError.
    """
    _check_tau(tau)
    check_alpha(alpha)
    if previous is not None:
        _same_tau(previous.tau, tau)
        if previous.alpha != alpha:
            raise ValueError(f"alpha changed between looks ({previous.alpha} -> {alpha})")
    if not variance > 0 or not math.isfinite(variance) or not math.isfinite(effect):
        raise ValueError(f"a look needs a finite effect and a positive variance, got {variance}")
    log_lr = float(log_mixture_likelihood_ratio(effect, variance, tau))
    p_value = math.exp(-max(log_lr, 0.0))
    half = float(confidence_sequence_halfwidth(variance, tau, alpha))
    cs: Interval = (effect - half, effect + half)
    if previous is None:
        return SequentialLook(tau, alpha, 1, p_value, cs)
    return SequentialLook(
        tau,
        alpha,
        previous.looks + 1,
        min(p_value, previous.p_value),
        _intersect(previous.cs, cs),
    )


def _intersect(a: Interval | None, b: Interval) -> Interval:
    """Running intersection of a confidence sequence; an empty one (an α-probability event under
    the model) falls back to the current look's interval."""
    if a is None:
        return b
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo <= hi else b


def msprt_test(
    control: SampleMeanStatistic | ProportionStatistic,
    treatment: SampleMeanStatistic | ProportionStatistic,
    *,
    tau: float,
    alpha: float = 0.05,
    previous: TestResult | None = None,
) -> TestResult:
    """One look of the mSPRT on cumulative statistics (Johari et al. 2017).

    Pass the result of the previous look as ``previous`` to carry the running minimum of the
    p-value and the running intersection of the confidence sequences; without it the result is
    valid for this look alone. Looks may be taken as often as wanted, all with the same ``tau``:
    a ``previous`` result with another τ (or α) is refused with ValueError.
    """
    _check_tau(tau)
    check_alpha(alpha)
    if previous is not None and (previous.method != "msprt" or previous.alpha != alpha):
        raise ValueError("previous must be an msprt_test result with the same alpha")
    if previous is not None:
        _same_tau(previous.tau, tau)
    nc, nt = control.n, treatment.n
    early = arm_check("msprt", alpha, nc, nt, control.mean, treatment.mean, min_n=2)
    if early is not None:
        return dataclasses.replace(early, tau=tau)
    contrast = Contrast.independent(
        control.mean, control.variance / nc, treatment.mean, treatment.variance / nt
    )
    if contrast.variance == 0:
        return dataclasses.replace(zero_variance_result("msprt", contrast, alpha, nc, nt), tau=tau)

    log_lr = float(log_mixture_likelihood_ratio(contrast.effect, contrast.variance, tau))
    p_value = math.exp(-max(log_lr, 0.0))
    halfwidth = float(confidence_sequence_halfwidth(contrast.variance, tau, alpha))
    rel = contrast.relative()
    halfwidth_rel = None
    if rel is not None and rel[1] > 0:
        tau_rel = tau / abs(contrast.control_mean)
        halfwidth_rel = float(confidence_sequence_halfwidth(rel[1], tau_rel, alpha))
    result = contrast.result(
        "msprt",
        p_value=p_value,
        halfwidth_abs=halfwidth,
        halfwidth_rel=halfwidth_rel,
        alpha=alpha,
        n_control=nc,
        n_treatment=nt,
        tau=tau,
    )
    if previous is None or result.ci_abs is None:
        return result
    ci_rel = result.ci_rel
    if ci_rel is not None and previous.ci_rel is not None:
        ci_rel = _intersect(previous.ci_rel, ci_rel)
    previous_p = 1.0 if previous.p_value is None else previous.p_value
    return dataclasses.replace(
        result,
        ci_abs=_intersect(previous.ci_abs, result.ci_abs),
        ci_rel=ci_rel,
        p_value=min(p_value, previous_p),
    )
