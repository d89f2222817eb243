"""Sufficient statistics for A/B metrics: frozen, and mergeable with ``+``.

Each statistic holds only counts and sums, so partial statistics (one per day, one per ClickHouse
partition, one per streaming window) merge into the batch answer exactly:
``Stat.from_array(concat(a, b)) == Stat.from_array(a) + Stat.from_array(b)`` up to float rounding.
The design follows gbstats (growthbook/growthbook, ``packages/stats/gbstats/models/statistics.py``).

Variances come from raw sums, ``(Σx² − (Σx)²/n) / (n − 1)``. When the spread is tiny relative to
the mean this subtraction cancels catastrophically; a centred sum of squares below
``ZERO_VARIANCE_RTOL`` times ``Σx²`` is rounding noise and is taken as exactly zero, so constant
data reads as zero variance (and the tests return ``message="zero_variance"``), not as a tiny
positive number. The price: a metric whose sd is below ~1e-5 of its mean (the square root of the
tolerance) also reads as constant; such metrics should be centred before summing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from abtest.stats.errors import StatsDataError

__all__ = [
    "ZERO_VARIANCE_RTOL",
    "ProportionStatistic",
    "RatioStatistic",
    "RegressionAdjustedStatistic",
    "SampleMeanStatistic",
]

ZERO_VARIANCE_RTOL = 1e-10
"""A centred sum of squares at or below this fraction of the raw sum of squares counts as zero."""


def _as_1d(values: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise StatsDataError(
            f"{name} must be one-dimensional per-unit values, got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise StatsDataError(f"{name} contains NaN or infinite values; drop or impute them first")
    return arr


def _check_count(n: int, name: str = "n") -> None:
    if n < 0:
        raise StatsDataError(f"{name} must be a count >= 0, got {n}")


def _centred_squares(n: int, total: float, total_squares: float) -> float:
    """Σ(x − x̄)² = Σx² − (Σx)²/n, with rounding noise (and any negative result) clipped to 0."""
    if n == 0:
        return 0.0
    ss = total_squares - total * total / n
    return 0.0 if ss <= ZERO_VARIANCE_RTOL * abs(total_squares) else ss


def _centred_products(
    n: int, sum_x: float, sum_y: float, sum_xy: float, ss_x: float, ss_y: float
) -> float:
    """Σ(x − x̄)(y − ȳ), clipped to the Cauchy–Schwarz bound so a zero-variance side gives 0."""
    if n == 0:
        return 0.0
    sp = sum_xy - sum_x * sum_y / n
    bound = math.sqrt(ss_x * ss_y)
    return max(-bound, min(bound, sp))


@dataclass(frozen=True)
class SampleMeanStatistic:
    """Count, sum and sum of squares of a per-unit metric (gbstats ``SampleMeanStatistic``)."""

    n: int
    sum: float
    sum_squares: float

    def __post_init__(self) -> None:
        _check_count(self.n)
        if self.sum_squares < 0:
            raise StatsDataError(f"sum_squares must be >= 0, got {self.sum_squares}")

    @classmethod
    def from_array(cls, values: ArrayLike) -> SampleMeanStatistic:
        x = _as_1d(values, "values")
        return cls(n=int(x.size), sum=float(x.sum()), sum_squares=float(np.dot(x, x)))

    def __add__(self, other: SampleMeanStatistic) -> SampleMeanStatistic:
        return SampleMeanStatistic(
            n=self.n + other.n,
            sum=self.sum + other.sum,
            sum_squares=self.sum_squares + other.sum_squares,
        )

    @property
    def mean(self) -> float:
        """x̄; 0.0 for an empty arm (callers check ``n`` first)."""
        return self.sum / self.n if self.n > 0 else 0.0

    @property
    def variance(self) -> float:
        """Sample variance with the n − 1 denominator; 0.0 when n < 2."""
        if self.n < 2:
            return 0.0
        return _centred_squares(self.n, self.sum, self.sum_squares) / (self.n - 1)


@dataclass(frozen=True)
class ProportionStatistic:
    """Units and successes of a 0/1 metric (a conversion); its variance is p(1 − p)."""

    n: int
    sum: int

    def __post_init__(self) -> None:
        _check_count(self.n)
        if not 0 <= self.sum <= self.n:
            raise StatsDataError(f"sum (successes) must lie in [0, n={self.n}], got {self.sum}")

    @classmethod
    def from_array(cls, values: ArrayLike) -> ProportionStatistic:
        x = _as_1d(values, "values")
        if not np.all((x == 0.0) | (x == 1.0)):
            raise StatsDataError(
                "a proportion needs 0/1 values; use SampleMeanStatistic for others"
            )
        return cls(n=int(x.size), sum=int(x.sum()))

    def __add__(self, other: ProportionStatistic) -> ProportionStatistic:
        return ProportionStatistic(n=self.n + other.n, sum=self.sum + other.sum)

    @property
    def mean(self) -> float:
        """p̂ = successes / n; 0.0 for an empty arm."""
        return self.sum / self.n if self.n > 0 else 0.0

    @property
    def variance(self) -> float:
        """Bernoulli variance p̂(1 − p̂) (population form, as in the z-test)."""
        p = self.mean
        return p * (1.0 - p)

    def to_sample_mean(self) -> SampleMeanStatistic:
        """The same data as a SampleMeanStatistic (for 0/1 values Σx² = Σx)."""
        return SampleMeanStatistic(n=self.n, sum=float(self.sum), sum_squares=float(self.sum))


@dataclass(frozen=True)
class RatioStatistic:
    """Per-unit numerator m and denominator d for a ratio metric Σm / Σd (e.g. clicks / views).

    The unit of randomisation (the user) is the unit of the sums, so the delta method gives the
    ratio's variance (Deng, Knoblich, Lu 2018, "Applying the Delta Method in Metric Analytics").
    """

    n: int
    m_sum: float
    m_sum_squares: float
    d_sum: float
    d_sum_squares: float
    m_d_sum_of_products: float

    def __post_init__(self) -> None:
        _check_count(self.n)
        if self.m_sum_squares < 0 or self.d_sum_squares < 0:
            raise StatsDataError("m_sum_squares and d_sum_squares must be >= 0")

    @classmethod
    def from_arrays(cls, numerator: ArrayLike, denominator: ArrayLike) -> RatioStatistic:
        m = _as_1d(numerator, "numerator")
        d = _as_1d(denominator, "denominator")
        if m.shape != d.shape:
            raise StatsDataError(
                f"numerator and denominator differ in length: {m.size} != {d.size}"
            )
        return cls(
            n=int(m.size),
            m_sum=float(m.sum()),
            m_sum_squares=float(np.dot(m, m)),
            d_sum=float(d.sum()),
            d_sum_squares=float(np.dot(d, d)),
            m_d_sum_of_products=float(np.dot(m, d)),
        )

    def __add__(self, other: RatioStatistic) -> RatioStatistic:
        return RatioStatistic(
            n=self.n + other.n,
            m_sum=self.m_sum + other.m_sum,
            m_sum_squares=self.m_sum_squares + other.m_sum_squares,
            d_sum=self.d_sum + other.d_sum,
            d_sum_squares=self.d_sum_squares + other.d_sum_squares,
            m_d_sum_of_products=self.m_d_sum_of_products + other.m_d_sum_of_products,
        )

    @property
    def m_statistic(self) -> SampleMeanStatistic:
        return SampleMeanStatistic(self.n, self.m_sum, self.m_sum_squares)

    @property
    def d_statistic(self) -> SampleMeanStatistic:
        return SampleMeanStatistic(self.n, self.d_sum, self.d_sum_squares)

    @property
    def covariance(self) -> float:
        """Sample covariance of m and d (n − 1 denominator); 0.0 when n < 2."""
        if self.n < 2:
            return 0.0
        ss_m = _centred_squares(self.n, self.m_sum, self.m_sum_squares)
        ss_d = _centred_squares(self.n, self.d_sum, self.d_sum_squares)
        sp = _centred_products(self.n, self.m_sum, self.d_sum, self.m_d_sum_of_products, ss_m, ss_d)
        return sp / (self.n - 1)

    @property
    def mean(self) -> float:
        """The ratio R = Σm / Σd; 0.0 when Σd = 0 (callers check ``d_sum``)."""
        return self.m_sum / self.d_sum if self.d_sum != 0 else 0.0

    @property
    def variance(self) -> float:
        """Per-unit delta-method variance of R, so Var(R̂) ≈ variance / n (Deng et al. 2018):

        (σ²_m − 2 R σ_md + R² σ²_d) / μ_d²  with μ_d = Σd / n and R = Σm / Σd.
        """
        if self.n == 0 or self.d_sum == 0:
            return 0.0
        mu_d = self.d_sum / self.n
        r = self.mean
        num = (
            self.m_statistic.variance - 2 * r * self.covariance + r * r * self.d_statistic.variance
        )
        return max(num, 0.0) / (mu_d * mu_d)


@dataclass(frozen=True)
class RegressionAdjustedStatistic:
    """Post-period metric y and pre-period covariate x per unit, for CUPED (Deng et al. 2013).

    ``theta`` is not stored: the tests estimate it on the pooled arms, which is just ``a + b``.
    """

    n: int
    post_sum: float
    post_sum_squares: float
    pre_sum: float
    pre_sum_squares: float
    post_pre_sum_of_products: float

    def __post_init__(self) -> None:
        _check_count(self.n)
        if self.post_sum_squares < 0 or self.pre_sum_squares < 0:
            raise StatsDataError("post_sum_squares and pre_sum_squares must be >= 0")

    @classmethod
    def from_arrays(cls, post: ArrayLike, pre: ArrayLike) -> RegressionAdjustedStatistic:
        y = _as_1d(post, "post")
        x = _as_1d(pre, "pre")
        if y.shape != x.shape:
            raise StatsDataError(f"post and pre differ in length: {y.size} != {x.size}")
        return cls(
            n=int(y.size),
            post_sum=float(y.sum()),
            post_sum_squares=float(np.dot(y, y)),
            pre_sum=float(x.sum()),
            pre_sum_squares=float(np.dot(x, x)),
            post_pre_sum_of_products=float(np.dot(x, y)),
        )

    def __add__(self, other: RegressionAdjustedStatistic) -> RegressionAdjustedStatistic:
        return RegressionAdjustedStatistic(
            n=self.n + other.n,
            post_sum=self.post_sum + other.post_sum,
            post_sum_squares=self.post_sum_squares + other.post_sum_squares,
            pre_sum=self.pre_sum + other.pre_sum,
            pre_sum_squares=self.pre_sum_squares + other.pre_sum_squares,
            post_pre_sum_of_products=self.post_pre_sum_of_products + other.post_pre_sum_of_products,
        )

    @property
    def mean(self) -> float:
        """The raw post-period mean ȳ (what a readout shows; the effect is CUPED-adjusted)."""
        return self.post.mean

    @property
    def post(self) -> SampleMeanStatistic:
        return SampleMeanStatistic(self.n, self.post_sum, self.post_sum_squares)

    @property
    def pre(self) -> SampleMeanStatistic:
        return SampleMeanStatistic(self.n, self.pre_sum, self.pre_sum_squares)

    @property
    def covariance(self) -> float:
        """Sample covariance of post and pre (n − 1 denominator); 0.0 when n < 2."""
        if self.n < 2:
            return 0.0
        ss_y = _centred_squares(self.n, self.post_sum, self.post_sum_squares)
        ss_x = _centred_squares(self.n, self.pre_sum, self.pre_sum_squares)
        sp = _centred_products(
            self.n, self.post_sum, self.pre_sum, self.post_pre_sum_of_products, ss_y, ss_x
        )
        return sp / (self.n - 1)

    @property
    def theta(self) -> float:
        """OLS slope Cov(y, x) / Var(x), the variance-minimising θ of Deng et al. 2013 (CUPED).

        0.0 when x is constant (nothing to adjust with).
        """
        var_x = self.pre.variance
        return self.covariance / var_x if var_x > 0 else 0.0

    def adjusted_variance(self, theta: float) -> float:
        """Var(y − θx) = σ²_y − 2θσ_xy + θ²σ²_x, the per-unit variance after CUPED.

        Like a centred sum of squares, a result within rounding noise of zero is taken as zero.
        """
        scale = self.post.variance + theta * theta * self.pre.variance
        v = scale - 2 * theta * self.covariance
        return 0.0 if v <= ZERO_VARIANCE_RTOL * scale else v
