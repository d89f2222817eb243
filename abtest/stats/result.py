"""Result objects of the statistics engine: frozen, plain data, one ``message`` code each.

Degenerate input (an empty arm, zero variance, a zero control mean) never raises and never yields
NaN: the result carries a ``message`` code and ``None`` in the fields that are undefined for that
input (a p-value without variance, a relative effect over a zero control mean). A result whose
``p_value`` is ``None`` is never significant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BayesianResult",
    "DifferenceType",
    "Interval",
    "Message",
    "Method",
    "TestResult",
]

Interval = tuple[float, float]

Method = Literal["welch_t", "two_proportion_z", "delta_ratio", "cuped_t", "msprt"]
"""The frequentist or sequential test that produced a TestResult."""

Message = Literal[
    "ok",
    "empty_arm",  # an arm has no units
    "insufficient_data",  # too few units for the method (Welch needs n >= 2 per arm)
    "zero_variance",  # the effect's standard error is 0: no test is possible
    "zero_control_mean",  # the relative effect is undefined; absolute results are still given
    "zero_denominator",  # a ratio metric's denominator sums to 0 in an arm
]

DifferenceType = Literal["absolute", "relative"]


@dataclass(frozen=True)
class TestResult:
    """Treatment versus control for one metric.

    ``effect_abs`` is treatment − control (for CUPED, the variance-reduced difference, while the two
    means are the raw ones) and ``variance_abs`` its estimated variance. ``effect_rel`` is
    effect_abs / control_mean and ``ci_rel`` its interval by the delta method on that ratio, the
    project's one convention for relative effects (see ``abtest.stats.frequentist``).

    Each p-value agrees with the interval on its own scale: ``p_value`` tests effect_abs = 0 and
    is below alpha exactly when ``ci_abs`` excludes 0; ``p_value_rel`` tests effect_rel = 0 with
    the same delta-method standard error and critical value as ``ci_rel`` (GrowthBook's test on
    the lift), so it is below alpha exactly when ``ci_rel`` excludes 0. ``tau`` is the mSPRT
    mixing parameter of a sequential result (None for fixed-horizon tests).
    """

    __test__ = False  # not a pytest test class, despite the name

    method: Method
    control_mean: float
    treatment_mean: float
    effect_abs: float | None
    effect_rel: float | None
    ci_abs: Interval | None
    ci_rel: Interval | None
    p_value: float | None
    alpha: float
    n_control: int
    n_treatment: int
    message: Message = "ok"
    metric: str | None = None
    control_name: str | None = None
    treatment_name: str | None = None
    p_value_rel: float | None = None
    variance_abs: float | None = None
    tau: float | None = None

    @property
    def significant(self) -> bool:
        """p_value < alpha; False whenever the p-value is undefined."""
        return self.p_value is not None and self.p_value < self.alpha

    @property
    def significant_rel(self) -> bool:
        """p_value_rel < alpha (``ci_rel`` excludes 0); False when it is undefined."""
        return self.p_value_rel is not None and self.p_value_rel < self.alpha

    def with_labels(
        self,
        metric: str | None = None,
        control_name: str | None = None,
        treatment_name: str | None = None,
    ) -> TestResult:
        """A copy naming the metric and the arms (the tests themselves are name-free)."""
        return dataclasses.replace(
            self, metric=metric, control_name=control_name, treatment_name=treatment_name
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready fields (intervals as two-element lists) plus the significance flags."""
        return _plain(self) | {
            "significant": self.significant,
            "significant_rel": self.significant_rel,
        }


@dataclass(frozen=True)
class BayesianResult:
    """Normal-approximation posterior of the effect of treatment over control.

    ``effect`` is the posterior mean of the absolute or relative difference (``difference``),
    ``credible_interval`` its central 1 − alpha interval, ``chance_to_win`` P(effect > 0), and the
    expected losses E[max(0, −effect)] for shipping treatment and E[max(0, effect)] for keeping
    control, in the units of ``difference``. ``prior`` names the prior the posterior used.
    """

    method: Literal["bayesian_normal"]
    difference: DifferenceType
    control_mean: float
    treatment_mean: float
    effect: float | None
    effect_sd: float | None
    credible_interval: Interval | None
    chance_to_win: float | None
    expected_loss_treatment: float | None
    expected_loss_control: float | None
    alpha: float
    n_control: int
    n_treatment: int
    message: Message = "ok"
    metric: str | None = None
    control_name: str | None = None
    treatment_name: str | None = None
    prior: str | None = None

    def with_labels(
        self,
        metric: str | None = None,
        control_name: str | None = None,
        treatment_name: str | None = None,
    ) -> BayesianResult:
        """A copy naming the metric and the arms."""
        return dataclasses.replace(
            self, metric=metric, control_name=control_name, treatment_name=treatment_name
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready fields (intervals as two-element lists)."""
        return _plain(self)


def _plain(result: TestResult | BayesianResult) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out
