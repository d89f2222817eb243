"""Sample-ratio mismatch against scipy's chi-square goodness of fit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from abtest.stats import SRM_THRESHOLD, srm_test
from abtest.stats.errors import StatsDataError


@given(
    st.lists(st.integers(1, 10**6), min_size=2, max_size=6).flatmap(
        lambda counts: st.tuples(
            st.just(counts),
            st.lists(st.floats(0.05, 10.0), min_size=len(counts), max_size=len(counts)),
        )
    )
)
def test_srm_matches_scipy_chisquare(case: tuple[list[int], list[float]]) -> None:
    counts, weights = case
    r = srm_test(counts, weights)
    expected = [sum(counts) * w / sum(weights) for w in weights]
    ref = stats.chisquare(counts, expected)
    assert r.chi2 == pytest.approx(ref.statistic, rel=1e-9, abs=1e-9)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-300)
    assert r.mismatch == (ref.pvalue < SRM_THRESHOLD)
    assert r.df == len(counts) - 1


@pytest.mark.parametrize(
    ("counts", "weights", "mismatch"),
    [
        ([50_000, 50_000], [0.5, 0.5], False),
        ([50_000, 50_900], [0.5, 0.5], False),  # p ≈ 0.005: suspicious, below the SRM bar
        ([50_000, 51_200], [0.5, 0.5], True),  # p ≈ 2e-4
        ([10_120, 9_880], [1, 1], False),
        ([8_000, 2_000, 10_000], [0.4, 0.1, 0.5], False),
        ([8_000, 2_500, 10_000], [0.4, 0.1, 0.5], True),
    ],
)
def test_srm_flag(counts: list[int], weights: list[float], mismatch: bool) -> None:
    r = srm_test(counts, weights)
    assert r.mismatch == mismatch
    assert r.mismatch == (r.p_value < 0.001)


def test_srm_degenerate_cases() -> None:
    empty = srm_test([0, 0], [1, 1])
    assert (empty.message, empty.mismatch, empty.p_value) == ("no_units", False, 1.0)
    stray = srm_test([100, 100, 3], [1, 1, 0])
    assert (stray.message, stray.mismatch, stray.p_value) == ("unexpected_arm", True, 0.0)
    idle = srm_test([100, 110, 0], [1, 1, 0])  # an arm switched off, as configured
    assert idle.message == "ok" and idle.df == 1


@pytest.mark.parametrize(
    ("counts", "weights", "fragment"),
    [
        ([1, 2], [1.0], "one count per weight"),
        ([5], [1.0], "at least two"),
        ([-1, 2], [1, 1], ">= 0"),
    ],
)
def test_srm_rejects_malformed_input(
    counts: list[int], weights: list[float], fragment: str
) -> None:
    with pytest.raises(StatsDataError, match=fragment):
        srm_test(counts, weights)
