"""Sample-ratio mismatch (SRM): are the units per arm consistent with the configured weights?

Pearson's chi-square goodness-of-fit test, χ² = Σ (O_i − E_i)² / E_i with E_i = N·w_i/Σw and
k − 1 degrees of freedom. A mismatch at p < 0.001 (the usual threshold, Fabijan et al. 2019,
"Diagnosing Sample Ratio Mismatch in Online Controlled Experiments") means the assignment or the
logging is broken and the experiment's effects should not be trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from scipy import stats

from abtest.stats.errors import StatsDataError

__all__ = ["SRM_THRESHOLD", "SrmResult", "srm_test"]

SRM_THRESHOLD = 0.001

SrmMessage = Literal["ok", "no_units", "unexpected_arm"]


@dataclass(frozen=True)
class SrmResult:
    """The chi-square statistic, its p-value, the expected counts and the mismatch flag.

        ``message`` is ``"no_units"`` when no unit was counted (p-value 1, no mismatch) and
        ``"unexpected_arm"`` when an arm with weight 0 received units (p-value 0, a mismatch; χ² is
    then over the arms with positive weight).
    """

    chi2: float
    df: int
    p_value: float
    observed: tuple[int, ...]
    expected: tuple[float, ...]
    threshold: float
    mismatch: bool
    message: SrmMessage = "ok"


def srm_test(
    observed: Sequence[int], weights: Sequence[float], *, threshold: float = SRM_THRESHOLD
) -> SrmResult:
    """Chi-square test of the observed units per arm against the configured traffic weights."""
    if len(observed) != len(weights) or len(observed) < 2:
        raise StatsDataError(
            f"srm_test needs one count per weight and at least two arms, got {len(observed)} "
            f"counts and {len(weights)} weights"
        )
    if any(o < 0 for o in observed) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise StatsDataError("counts and weights must be >= 0, and some weight must be positive")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    counts = tuple(int(o) for o in observed)
    total = sum(counts)
    expected = tuple(total * w / sum(weights) for w in weights)
    if total == 0:
        return SrmResult(0.0, len(counts) - 1, 1.0, counts, expected, threshold, False, "no_units")
    cells = [(o, e) for o, e in zip(counts, expected, strict=True) if e > 0]
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    if any(e == 0 and o > 0 for o, e in zip(counts, expected, strict=True)):
        return SrmResult(chi2, df, 0.0, counts, expected, threshold, True, "unexpected_arm")
    p_value = float(stats.chi2.sf(chi2, df)) if df > 0 else 1.0
    return SrmResult(chi2, df, p_value, counts, expected, threshold, p_value < threshold)
