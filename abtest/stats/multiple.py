"""Adjusted p-values for many metrics or arms read out together.

Holm 1979 ("A Simple Sequentially Rejective Multiple Test Procedure") controls the family-wise
error rate; Benjamini & Hochberg 1995 ("Controlling the False Discovery Rate") controls the false
discovery rate under independence or positive dependence. Both return adjusted p-values in the
input order, so "adjusted p < α" is the procedure's rejection at level α.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from abtest.stats.errors import StatsDataError

__all__ = ["AdjustmentMethod", "adjust_p_values", "benjamini_hochberg", "holm"]

AdjustmentMethod = Literal["holm", "benjamini_hochberg"]


def _p_array(p_values: ArrayLike) -> NDArray[np.float64]:
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise StatsDataError(f"p_values must be one-dimensional, got shape {p.shape}")
    if not np.all((p >= 0.0) & (p <= 1.0)):
        raise StatsDataError("p_values must lie in [0, 1] (and not be NaN)")
    return p


def holm(p_values: ArrayLike) -> NDArray[np.float64]:
    """Holm step-down: for sorted p₍ᵢ₎, adj₍ᵢ₎ = max_{j ≤ i} min(1, (m − j + 1)·p₍ⱼ₎)."""
    p = _p_array(p_values)
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def benjamini_hochberg(p_values: ArrayLike) -> NDArray[np.float64]:
    """BH step-up: for sorted p₍ᵢ₎, adj₍ᵢ₎ = min_{j ≥ i} min(1, m·p₍ⱼ₎ / j)."""
    p = _p_array(p_values)
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, m * p[order] / np.arange(1, m + 1))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum.accumulate(scaled[::-1])[::-1]
    return adjusted


def adjust_p_values(p_values: ArrayLike, method: AdjustmentMethod) -> NDArray[np.float64]:
    """Adjusted p-values by ``method``."""
    if method == "holm":
        return holm(p_values)
    if method == "benjamini_hochberg":
        return benjamini_hochberg(p_values)
    raise ValueError(f"method must be 'holm' or 'benjamini_hochberg', got {method!r}")
