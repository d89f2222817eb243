"""Holm and Benjamini–Hochberg against statsmodels.multipletests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from statsmodels.stats.multitest import multipletests

from abtest.stats import adjust_p_values, benjamini_hochberg, holm
from abtest.stats.errors import StatsDataError

p_lists = st.lists(
    st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.01, 0.04, 0.05, 1.0])),
    min_size=1,
    max_size=40,
)


@settings(max_examples=20, deadline=None)  # statsmodels' holm runs gc.collect() on every call
@given(p_lists)
def test_holm_matches_statsmodels(p: list[float]) -> None:
    np.testing.assert_allclose(holm(p), multipletests(p, method="holm")[1], rtol=1e-12, atol=1e-15)


@given(p_lists)
def test_benjamini_hochberg_matches_statsmodels(p: list[float]) -> None:
    ref = multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(benjamini_hochberg(p), ref, rtol=1e-12, atol=1e-15)


def holm_rejects(p: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's procedure by its definition: reject in order while p₍ₖ₎ <= α / (m − k + 1)."""
    order = np.argsort(p, kind="stable")
    rejected = np.zeros(p.size, dtype=bool)
    for k, i in enumerate(order):
        if p[i] > alpha / (p.size - k):
            break
        rejected[i] = True
    return rejected


@given(p_lists, st.floats(0.001, 0.5))
def test_holm_adjusted_p_below_alpha_iff_procedure_rejects(p: list[float], alpha: float) -> None:
    arr = np.asarray(p)
    adjusted = holm(arr)
    rejected = holm_rejects(arr, alpha)
    clear = np.abs(adjusted - alpha) > 1e-12  # leave exact ties at the boundary alone
    assert np.array_equal((adjusted <= alpha)[clear], rejected[clear])


def test_known_values_and_dispatch() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert adjust_p_values(p, "holm") == pytest.approx(holm(p))
    assert adjust_p_values(p, "benjamini_hochberg") == pytest.approx(benjamini_hochberg(p))
    assert holm([]).size == 0
    with pytest.raises(ValueError, match="method"):
        adjust_p_values(p, "bonferroni")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [[0.5, 1.2], [float("nan")], [[0.1, 0.2]]])
def test_rejects_invalid_p_values(bad: list[float]) -> None:
    with pytest.raises(StatsDataError, match="p_values"):
        holm(bad)
