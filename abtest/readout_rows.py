"""One row of the readout: the metrics, the test per metric kind, and ``compare_statistics``.

Methods, one per metric kind:

- per-user counts (clicks, plays, genres consumed): Welch's t-test; the main counts (clicks, plays)
  use CUPED on ``pre_positive_events`` when that covariate has variance (Deng et al. 2013);
- conversion (played at least once): the two-proportion (Wald) z-test;
- ratio metrics (CTR, request latency, error rate): the delta method (Deng et al. 2018), t with
  Welch–Satterthwaite degrees of freedom.

The conventions (README, "The statistics engine's conventions"):

- **One scale for p and its interval.** The table shows the lift (effect / control mean) with its
  delta-method interval, and ``p_value`` tests the lift with the same standard error and critical
  value (GrowthBook's convention), so p < alpha exactly when the lift interval excludes 0
  (``p_scale = "relative"``). Where the lift is undefined (a zero control mean) or has no
  variance, the row tests the absolute difference and shows that interval
  (``p_scale = "absolute"``). ``p_value_abs`` (absolute difference, agrees with ``ci_abs_*``)
  and ``variance_abs`` (the estimator's variance) are kept beside it.
- **CUPED everywhere or nowhere.** Where a metric is CUPED-adjusted, the Bayesian and sequential
  columns use the same adjusted estimator.
- **Bayesian columns**: chance to win and expected loss on the lift, normal approximation, with a
  flat prior by default (GrowthBook's default; ``prior`` passes an informative ``NormalPrior``).
  For metrics where lower is better (latency, errors), "win" means the treatment is lower and the
  expected loss is the expected increase.
- **Sequential column**: the mSPRT always-valid p-value (Johari et al. 2017) of the absolute
  effect, with τ fixed once per metric and treatment and the running minimum carried from look to
  look (``abtest.sequential_looks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from abtest.sequential_looks import SequentialPlan, SequentialState, sequential_step
from abtest.stats import (
    NormalPrior,
    ProportionStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
    TestResult,
    bayesian_normal_test,
    cuped_ttest,
    delta_method_ratio_test,
    two_proportion_ztest,
    welch_ttest,
)

__all__ = [
    "COVARIATE",
    "READOUT_COLUMNS",
    "READOUT_METRICS",
    "ArmStatistic",
    "ArmSums",
    "MetricSpec",
    "TestStatistic",
    "arm_statistic",
    "compare_statistics",
    "sums_statistics",
    "test_statistics",
]

MetricKind = Literal["mean", "proportion", "ratio"]
ArmStatistic = SampleMeanStatistic | ProportionStatistic | RatioStatistic
TestStatistic = ArmStatistic | RegressionAdjustedStatistic

COVARIATE = "pre_positive_events"


@dataclass(frozen=True)
class MetricSpec:
    """A readout metric: its per-user column(s), kind, direction and whether CUPED applies."""

    name: str
    kind: MetricKind
    column: str
    denominator: str | None = None
    higher_is_better: bool = True
    cuped: bool = False
    guardrail: bool = False


READOUT_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("clicks_per_user", "mean", "clicks", cuped=True),
    MetricSpec("plays_per_user", "mean", "plays", cuped=True),
    MetricSpec("conversion", "proportion", "converted"),
    MetricSpec("ctr", "ratio", "clicks", denominator="impressions"),
    MetricSpec("genres_consumed", "mean", "genres_consumed"),
    MetricSpec(
        "latency_ms",
        "ratio",
        "latency_ms_sum",
        denominator="latency_requests",
        higher_is_better=False,
        guardrail=True,
    ),
    MetricSpec(
        "error_rate",
        "ratio",
        "errors",
        denominator="requests",
        higher_is_better=False,
        guardrail=True,
    ),
)

READOUT_COLUMNS: tuple[str, ...] = (
    "metric",
    "guardrail",
    "higher_is_better",
    "method",
    "control",
    "treatment",
    "n_control",
    "n_treatment",
    "control_mean",
    "treatment_mean",
    "effect_abs",
    "effect_rel",
    "ci_abs_low",
    "ci_abs_high",
    "ci_rel_low",
    "ci_rel_high",
    "p_value",
    "p_scale",
    "p_value_abs",
    "variance_abs",
    "p_holm",
    "p_bh",
    "chance_to_win",
    "expected_loss",
    "p_sequential",
    "message",
)


def arm_statistic(spec: MetricSpec, arm: pd.DataFrame) -> ArmStatistic:
    """The sufficient statistic of one arm for ``spec`` (mean, proportion or ratio)."""
    values = arm[spec.column].to_numpy(dtype=np.float64)
    if spec.kind == "proportion":
        return ProportionStatistic.from_array(values)
    if spec.kind == "ratio":
        assert spec.denominator is not None
        return RatioStatistic.from_arrays(values, arm[spec.denominator].to_numpy(np.float64))
    return SampleMeanStatistic.from_array(values)


class ArmSums(Protocol):
    """One arm's per-user sums as the engine's statistics (``abtest.metrics.VariantSums``)."""

    def mean(self, column: str) -> SampleMeanStatistic: ...

    def proportion(self, column: str) -> ProportionStatistic: ...

    def ratio(self, numerator: str, denominator: str) -> RatioStatistic: ...

    def regression(self, post: str, pre: str) -> RegressionAdjustedStatistic: ...


def _sums_arm(spec: MetricSpec, arm: ArmSums) -> ArmStatistic:
    if spec.kind == "proportion":
        return arm.proportion(spec.column)
    if spec.kind == "ratio":
        assert spec.denominator is not None
        return arm.ratio(spec.column, spec.denominator)
    return arm.mean(spec.column)


def sums_statistics(
    spec: MetricSpec, control: ArmSums, treatment: ArmSums
) -> tuple[TestStatistic, TestStatistic]:
    """``test_statistics`` from each arm's sums instead of its per-user rows: the same
    statistics (sums of the same values), and the same CUPED choice."""
    if spec.cuped:
        cuped_c = control.regression(spec.column, COVARIATE)
        cuped_t = treatment.regression(spec.column, COVARIATE)
        if (cuped_c + cuped_t).pre.variance > 0:
            return cuped_c, cuped_t
    return _sums_arm(spec, control), _sums_arm(spec, treatment)


def test_statistics(
    spec: MetricSpec, control: pd.DataFrame, treatment: pd.DataFrame
) -> tuple[TestStatistic, TestStatistic]:
    """The two arms' statistics for ``spec``'s test: CUPED-adjusted when ``spec.cuped`` and the
    covariate has variance, else the plain ones (``arm_statistic``)."""
    if spec.cuped:
        cuped_c = RegressionAdjustedStatistic.from_arrays(control[spec.column], control[COVARIATE])
        cuped_t = RegressionAdjustedStatistic.from_arrays(
            treatment[spec.column], treatment[COVARIATE]
        )
        if (cuped_c + cuped_t).pre.variance > 0:
            return cuped_c, cuped_t
    return arm_statistic(spec, control), arm_statistic(spec, treatment)


def _primary_test(c: TestStatistic, t: TestStatistic, alpha: float) -> TestResult:
    if isinstance(c, RegressionAdjustedStatistic) and isinstance(t, RegressionAdjustedStatistic):
        return cuped_ttest(c, t, alpha=alpha)
    if isinstance(c, ProportionStatistic) and isinstance(t, ProportionStatistic):
        return two_proportion_ztest(c, t, alpha=alpha)
    if isinstance(c, RatioStatistic) and isinstance(t, RatioStatistic):
        return delta_method_ratio_test(c, t, alpha=alpha)
    if isinstance(c, SampleMeanStatistic) and isinstance(t, SampleMeanStatistic):
        return welch_ttest(c, t, alpha=alpha)
    raise TypeError(f"no test for {type(c).__name__} against {type(t).__name__}")


def _shown_p(result: TestResult) -> tuple[float | None, str | None]:
    """The p-value on the scale the table shows: the lift's when defined, else the absolute."""
    if result.p_value_rel is not None:
        return result.p_value_rel, "relative"
    if result.p_value is not None:
        return result.p_value, "absolute"
    return None, None


def compare_statistics(
    spec: MetricSpec,
    control: TestStatistic,
    treatment: TestStatistic,
    *,
    treatment_name: str,
    alpha: float = 0.05,
    prior: NormalPrior | None = None,
    sequential: SequentialPlan | None = None,
    previous: SequentialState | None = None,
) -> tuple[dict[str, Any], SequentialState | None]:
    """One readout row (``READOUT_COLUMNS`` less control, treatment and the adjusted p-values)
    from the two arms' statistics, and the sequential state after this look.

    This is the readout's own path for every row (``readout_from_sums`` calls it on each arm's
    sums, ``readout_from_metrics`` on the statistics of the per-user frame); it also serves
    summary-statistics simulations of the readout look by look (``benchmarks/sequential_fpr.py``).
    ``sequential=None`` skips the sequential column.
    """
    result = _primary_test(control, treatment, alpha)
    bayes = bayesian_normal_test(
        control, treatment, difference="relative", prior=prior, alpha=alpha
    )
    win, loss = bayes.chance_to_win, bayes.expected_loss_treatment
    if not spec.higher_is_better and win is not None:
        win, loss = 1.0 - win, bayes.expected_loss_control
    state = None
    if sequential is not None:
        state = sequential_step(
            spec.name,
            treatment_name,
            result.method,
            result.effect_abs if result.p_value is not None else None,
            result.variance_abs if result.p_value is not None else None,
            result.n_control,
            result.n_treatment,
            plan=sequential,
            alpha=alpha,
            previous=previous,
        )
    p_value, p_scale = _shown_p(result)
    ci_abs = result.ci_abs or (None, None)
    ci_rel = result.ci_rel or (None, None)
    row = {
        "metric": spec.name,
        "guardrail": spec.guardrail,
        "higher_is_better": spec.higher_is_better,
        "method": result.method,
        "n_control": result.n_control,
        "n_treatment": result.n_treatment,
        "control_mean": result.control_mean,
        "treatment_mean": result.treatment_mean,
        "effect_abs": result.effect_abs,
        "effect_rel": result.effect_rel,
        "ci_abs_low": ci_abs[0],
        "ci_abs_high": ci_abs[1],
        "ci_rel_low": ci_rel[0],
        "ci_rel_high": ci_rel[1],
        "p_value": p_value,
        "p_scale": p_scale,
        "p_value_abs": result.p_value,
        "variance_abs": result.variance_abs if result.p_value is not None else None,
        "chance_to_win": win,
        "expected_loss": loss,
        "p_sequential": None if state is None else state.p_value,
        "message": result.message,
    }
    return row, state
