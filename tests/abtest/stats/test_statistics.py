"""Sufficient statistics: values against numpy, mergeability, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abtest.stats import (
    ProportionStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
)
from abtest.stats.errors import StatsDataError

values = st.lists(
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False),
    min_size=0,
    max_size=60,
)
pairs = st.lists(
    st.tuples(
        st.floats(min_value=-1e3, max_value=1e3, allow_nan=False),
        st.floats(min_value=-1e3, max_value=1e3, allow_nan=False),
    ),
    max_size=60,
)


def assert_fields_close(merged: object, whole: object) -> None:
    for name, a in vars(whole).items():
        b = getattr(merged, name)
        scale = max(1.0, abs(a), abs(b))
        assert b == pytest.approx(a, rel=1e-9, abs=1e-9 * scale), name


@given(values, st.data())
def test_sample_mean_merges(xs: list[float], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(xs)))
    whole = SampleMeanStatistic.from_array(xs)
    merged = SampleMeanStatistic.from_array(xs[:cut]) + SampleMeanStatistic.from_array(xs[cut:])
    assert merged.n == whole.n
    assert_fields_close(merged, whole)


@given(st.lists(st.integers(0, 1), max_size=80), st.data())
def test_proportion_merges_exactly(xs: list[int], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(xs)))
    merged = ProportionStatistic.from_array(xs[:cut]) + ProportionStatistic.from_array(xs[cut:])
    assert merged == ProportionStatistic.from_array(xs)


@given(pairs, st.data())
def test_ratio_and_regression_merge(rows: list[tuple[float, float]], data: st.DataObject) -> None:
    a = np.array([r[0] for r in rows], dtype=float)
    b = np.array([r[1] for r in rows], dtype=float)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(rows)), min_size=2, max_size=2)))
    chunks = [slice(0, cuts[0]), slice(cuts[0], cuts[1]), slice(cuts[1], None)]
    ratio = sum(
        (RatioStatistic.from_arrays(a[c], b[c]) for c in chunks[1:]),
        RatioStatistic.from_arrays(a[chunks[0]], b[chunks[0]]),
    )
    assert_fields_close(ratio, RatioStatistic.from_arrays(a, b))
    cuped = sum(
        (RegressionAdjustedStatistic.from_arrays(a[c], b[c]) for c in chunks[1:]),
        RegressionAdjustedStatistic.from_arrays(a[chunks[0]], b[chunks[0]]),
    )
    assert_fields_close(cuped, RegressionAdjustedStatistic.from_arrays(a, b))


@pytest.mark.parametrize("n", [2, 3, 17, 1000])
def test_sample_mean_moments_match_numpy(n: int) -> None:
    x = np.random.default_rng(n).lognormal(1.0, 1.0, n)
    s = SampleMeanStatistic.from_array(x)
    assert s.mean == pytest.approx(x.mean(), rel=1e-12)
    assert s.variance == pytest.approx(x.var(ddof=1), rel=1e-9)


def test_ratio_and_regression_moments_match_numpy() -> None:
    rng = np.random.default_rng(1)
    d = rng.poisson(5.0, 500).astype(float) + 1
    m = rng.binomial(d.astype(int), 0.3).astype(float)
    r = RatioStatistic.from_arrays(m, d)
    cov = np.cov(m, d)
    assert r.m_statistic.variance == pytest.approx(cov[0, 0], rel=1e-9)
    assert r.d_statistic.variance == pytest.approx(cov[1, 1], rel=1e-9)
    assert r.covariance == pytest.approx(cov[0, 1], rel=1e-9)
    assert r.mean == pytest.approx(m.sum() / d.sum(), rel=1e-12)

    y, x = m + rng.normal(size=500), d
    reg = RegressionAdjustedStatistic.from_arrays(y, x)
    design = np.column_stack([np.ones_like(x), x])
    slope = np.linalg.lstsq(design, y, rcond=None)[0][1]
    assert reg.theta == pytest.approx(slope, rel=1e-9)
    assert reg.adjusted_variance(slope) == pytest.approx(np.var(y - slope * x, ddof=1), rel=1e-9)


@pytest.mark.parametrize("value", [0.1, 1e6 + 0.3, -7.0])
def test_constant_data_has_exactly_zero_variance(value: float) -> None:
    x = np.full(10_001, value)
    assert SampleMeanStatistic.from_array(x).variance == 0.0
    ratio = RatioStatistic.from_arrays(x, np.full_like(x, 2.0))
    assert ratio.covariance == 0.0
    assert ratio.variance == 0.0


def test_empty_and_single_unit_statistics() -> None:
    empty = SampleMeanStatistic.from_array([])
    assert (empty.n, empty.mean, empty.variance) == (0, 0.0, 0.0)
    one = SampleMeanStatistic.from_array([3.0])
    assert (one.mean, one.variance) == (3.0, 0.0)
    assert ProportionStatistic(0, 0).mean == 0.0
    assert RatioStatistic.from_arrays([1.0], [0.0]).mean == 0.0


def test_proportion_as_sample_mean() -> None:
    x = np.array([1, 0, 0, 1, 1, 0, 1.0])
    p = ProportionStatistic.from_array(x)
    assert p.variance == pytest.approx(x.var(ddof=0))
    assert p.to_sample_mean() == SampleMeanStatistic.from_array(x)


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: SampleMeanStatistic.from_array([1.0, float("nan")]), "NaN"),
        (lambda: SampleMeanStatistic.from_array([[1.0, 2.0]]), "one-dimensional"),
        (lambda: SampleMeanStatistic(-1, 0.0, 0.0), "n must be a count"),
        (lambda: ProportionStatistic.from_array([0, 1, 2]), "0/1 values"),
        (lambda: ProportionStatistic(3, 4), "successes"),
        (lambda: RatioStatistic.from_arrays([1.0, 2.0], [1.0]), "differ in length"),
        (lambda: RegressionAdjustedStatistic.from_arrays([1.0], [1.0, 2.0]), "differ in length"),
    ],
)
def test_malformed_input_raises_data_error(build: object, fragment: str) -> None:
    with pytest.raises(StatsDataError, match=fragment):
        build()  # type: ignore[operator]


@settings(max_examples=25)
@given(st.integers(2, 10**7), st.floats(-1e3, 1e3), st.floats(1.0, 1e3))
def test_summary_statistics_round_trip(n: int, mean: float, sd: float) -> None:
    """Statistics built from (n, mean, sd) recover them, as SQL aggregates would give.

    Raw sums resolve a coefficient of variation down to ~1e-5 (ZERO_VARIANCE_RTOL); here >= 1e-3.
    """
    s = SampleMeanStatistic(n, n * mean, (n - 1) * sd**2 + n * mean**2)
    assert s.mean == pytest.approx(mean, rel=1e-9, abs=1e-9)
    assert s.variance == pytest.approx(sd**2, rel=1e-5)
