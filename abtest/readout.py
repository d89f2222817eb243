"""The experiment readout: every metric, every treatment against control, in one tidy table.

``experiment_readout`` queries the per-user metrics (``abtest.metrics``) and hands them to
``readout_from_metrics``, a pure function over the frame that calls the statistics engine
(``abtest.stats``). Methods, one per metric kind:

- per-user counts (clicks, plays, genres consumed): Welch's t-test; the main counts (clicks, plays)
  use CUPED on ``pre_positive_events`` when that covariate has variance (Deng et al. 2013);
- conversion (played at least once): the two-proportion z-test;
- ratio metrics (CTR, request latency, error rate): the delta method (Deng et al. 2018).

Each row also carries Holm (FWER) and Benjamini–Hochberg (FDR) adjusted p-values over all
metric × treatment rows, the Bayesian chance to win and expected loss (relative lift, normal
approximation with GrowthBook's N(0, 0.3²) prior), and the mSPRT always-valid p-value (Johari et
al. 2017). The Bayesian and sequential columns use the unadjusted means (no CUPED). For metrics
where lower is better (latency, errors), "win" means the treatment is lower and the expected loss
is the expected increase. mSPRT's τ is tuned (``msprt_tau``) to ``sequential_n_per_arm`` users per
arm, by default the current count, and to the pooled standard deviation. Relative effects follow
the engine's one convention: effect / control mean, delta-method interval. The sample-ratio check
compares included users per variant with the configured weights (an equal split when none are
given; ``hymirec readout`` passes the experiments file's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from clickhouse_connect.driver.client import Client

from abtest.clickhouse import analytics_client
from abtest.metrics import ExperimentMetrics, user_metrics
from abtest.stats import (
    NormalPrior,
    ProportionStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
    SrmResult,
    TestResult,
    always_valid_p_values,
    bayesian_normal_test,
    benjamini_hochberg,
    cuped_ttest,
    delta_method_ratio_test,
    holm,
    msprt_tau,
    msprt_test,
    srm_test,
    two_proportion_ztest,
    welch_ttest,
)
from hymirec.errors import DataError
from hymirec.settings import Settings

__all__ = [
    "COVARIATE",
    "READOUT_COLUMNS",
    "READOUT_METRICS",
    "MetricSpec",
    "Readout",
    "experiment_readout",
    "format_readout",
    "readout_from_metrics",
]

MetricKind = Literal["mean", "proportion", "ratio"]
ArmStatistic = SampleMeanStatistic | ProportionStatistic | RatioStatistic

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
    "p_holm",
    "p_bh",
    "chance_to_win",
    "expected_loss",
    "p_sequential",
    "message",
)


@dataclass(frozen=True)
class Readout:
    """An experiment's readout: the tidy table (``READOUT_COLUMNS``) and the SRM check."""

    experiment: str
    control: str | None
    users: Mapping[str, int]
    excluded_users: int
    table: pd.DataFrame
    srm: SrmResult | None
    srm_arms: tuple[str, ...]
    alpha: float
    notes: str | None = None
    weights: Mapping[str, float] | None = None  # the SRM check's; None means an equal split


def arm_statistic(spec: MetricSpec, arm: pd.DataFrame) -> ArmStatistic:
    """The sufficient statistic of one arm for ``spec`` (mean, proportion or ratio)."""
    values = arm[spec.column].to_numpy(dtype=np.float64)
    if spec.kind == "proportion":
        return ProportionStatistic.from_array(values)
    if spec.kind == "ratio":
        assert spec.denominator is not None
        return RatioStatistic.from_arrays(values, arm[spec.denominator].to_numpy(np.float64))
    return SampleMeanStatistic.from_array(values)


def _primary_test(
    spec: MetricSpec, control: pd.DataFrame, treatment: pd.DataFrame, alpha: float
) -> TestResult:
    if spec.cuped:
        cuped_c = RegressionAdjustedStatistic.from_arrays(control[spec.column], control[COVARIATE])
        cuped_t = RegressionAdjustedStatistic.from_arrays(
            treatment[spec.column], treatment[COVARIATE]
        )
        if (cuped_c + cuped_t).pre.variance > 0:
            return cuped_ttest(cuped_c, cuped_t, alpha=alpha)
    c, t = arm_statistic(spec, control), arm_statistic(spec, treatment)
    if isinstance(c, ProportionStatistic) and isinstance(t, ProportionStatistic):
        return two_proportion_ztest(c, t, alpha=alpha)
    if isinstance(c, RatioStatistic) and isinstance(t, RatioStatistic):
        return delta_method_ratio_test(c, t, alpha=alpha)
    assert isinstance(c, SampleMeanStatistic) and isinstance(t, SampleMeanStatistic)
    return welch_ttest(c, t, alpha=alpha)


def _sequential_p(
    c: ArmStatistic, t: ArmStatistic, alpha: float, n_per_arm: float | None
) -> float | None:
    """mSPRT always-valid p-value of the unadjusted difference; None when it is undefined."""
    if c.n < 2 or t.n < 2:
        return None
    sd = math.sqrt((c.variance + t.variance) / 2.0)
    if sd == 0:
        return None
    tau = msprt_tau(sd, n_per_arm or (c.n + t.n) / 2.0, alpha=alpha)
    if isinstance(c, RatioStatistic) or isinstance(t, RatioStatistic):
        variance = c.variance / c.n + t.variance / t.n
        if variance == 0 or (isinstance(c, RatioStatistic) and c.d_sum == 0):
            return None
        if isinstance(t, RatioStatistic) and t.d_sum == 0:
            return None
        return float(always_valid_p_values([t.mean - c.mean], [variance], tau)[-1])
    return msprt_test(c, t, tau=tau, alpha=alpha).p_value


def _compare(
    spec: MetricSpec,
    control: pd.DataFrame,
    treatment: pd.DataFrame,
    alpha: float,
    prior: NormalPrior | None,
    n_per_arm: float | None,
) -> dict[str, Any]:
    result = _primary_test(spec, control, treatment, alpha)
    c, t = arm_statistic(spec, control), arm_statistic(spec, treatment)
    bayes = bayesian_normal_test(c, t, difference="relative", prior=prior, alpha=alpha)
    win, loss = bayes.chance_to_win, bayes.expected_loss_treatment
    if not spec.higher_is_better and win is not None:
        win, loss = 1.0 - win, bayes.expected_loss_control
    ci_abs = result.ci_abs or (None, None)
    ci_rel = result.ci_rel or (None, None)
    return {
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
        "p_value": result.p_value,
        "chance_to_win": win,
        "expected_loss": loss,
        "p_sequential": _sequential_p(c, t, alpha, n_per_arm),
        "message": result.message,
    }


def _default_control(variants: list[str]) -> str:
    return "control" if "control" in variants else variants[0]


def _srm(
    users: Mapping[str, int], weights: Mapping[str, float] | None
) -> tuple[SrmResult | None, tuple[str, ...]]:
    arms = sorted(set(users) | set(weights or {}))
    if len(arms) < 2:
        return None, tuple(arms)
    w = [float((weights or {}).get(a, 0.0)) if weights else 1.0 for a in arms]
    return srm_test([users.get(a, 0) for a in arms], w), tuple(arms)


def readout_from_metrics(
    metrics: ExperimentMetrics,
    control: str | None = None,
    weights: Mapping[str, float] | None = None,
    alpha: float = 0.05,
    *,
    notes: str | None = None,
    prior: NormalPrior | None = NormalPrior(),  # noqa: B008 - frozen, so a safe default
    sequential_n_per_arm: float | None = None,
    require_control: bool = True,
) -> Readout:
    """The readout of an already-computed per-user frame (pure: no I/O).

    A ``control`` without exposed users is an error, unless ``require_control`` is False: then
    the table is empty and the SRM check (against ``weights``) still runs.
    """
    frame = metrics.users
    variants = metrics.variants()
    users = {v: int((frame["variant"] == v).sum()) for v in variants}
    if require_control and control is not None and control not in variants:
        raise DataError(
            f"control variant {control!r} has no exposed users in {metrics.experiment!r}; "
            f"variants: {variants}"
        )
    chosen = control if control is not None else (_default_control(variants) if variants else None)
    rows = []
    if chosen is not None and chosen in variants:
        control_frame = frame[frame["variant"] == chosen]
        for treatment in (v for v in variants if v != chosen):
            treatment_frame = frame[frame["variant"] == treatment]
            for spec in READOUT_METRICS:
                row = _compare(
                    spec, control_frame, treatment_frame, alpha, prior, sequential_n_per_arm
                )
                rows.append(row | {"control": chosen, "treatment": treatment})
    table = pd.DataFrame(rows, columns=[c for c in READOUT_COLUMNS if c not in ("p_holm", "p_bh")])
    table = _with_adjusted_p(table)[list(READOUT_COLUMNS)]
    srm, arms = _srm(users, weights)
    return Readout(
        metrics.experiment,
        chosen,
        users,
        metrics.excluded_users,
        table,
        srm,
        arms,
        alpha,
        notes,
        dict(weights) if weights else None,
    )


def _with_adjusted_p(table: pd.DataFrame) -> pd.DataFrame:
    """Holm and BH over every row with a p-value; rows without one get NaN."""
    table = table.copy()
    table["p_holm"] = np.nan
    table["p_bh"] = np.nan
    defined = table["p_value"].notna()
    if defined.any():
        p = table.loc[defined, "p_value"].to_numpy(dtype=np.float64)
        table.loc[defined, "p_holm"] = holm(p)
        table.loc[defined, "p_bh"] = benjamini_hochberg(p)
    return table


def experiment_readout(
    source: Client | Settings,
    experiment: str,
    control: str | None = None,
    weights: Mapping[str, float] | None = None,
    alpha: float = 0.05,
    *,
    notes: str | None = None,
    pre_days: int | None = None,
    prior: NormalPrior | None = NormalPrior(),  # noqa: B008 - frozen, so a safe default
    sequential_n_per_arm: float | None = None,
) -> Readout:
    """Query ``experiment``'s per-user metrics and read it out (see the module docstring).

    ``source`` is an open client or the settings (then a client is opened and closed here, which
    on chdb fails with an AnalyticsError while another process, such as the sink, holds the
    directory). ``pre_days`` defaults to ``settings.cuped_pre_days`` (its default with a client).
    """
    if isinstance(source, Settings):
        days = pre_days if pre_days is not None else source.cuped_pre_days
        with analytics_client(source) as client:
            metrics = user_metrics(client, experiment, pre_days=days)
    else:
        default_days = Settings.model_fields["cuped_pre_days"].default
        days = pre_days if pre_days is not None else default_days
        metrics = user_metrics(source, experiment, pre_days=days)
    return readout_from_metrics(
        metrics,
        control,
        weights,
        alpha,
        notes=notes,
        prior=prior,
        sequential_n_per_arm=sequential_n_per_arm,
    )


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _interval(low: Any, high: Any, spec: str) -> str:
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return "-"
    return f"[{format(low, spec)}, {format(high, spec)}]"


def format_readout(readout: Readout) -> str:
    """A console table: one line per metric × treatment, with the SRM verdict above it."""
    lines = [f"experiment {readout.experiment!r}: control {readout.control!r}"]
    lines.append(
        "users: "
        + ", ".join(f"{v}={n}" for v, n in readout.users.items())
        + f"; excluded (exposed to several variants): {readout.excluded_users}"
    )
    if readout.srm is not None:
        verdict = "MISMATCH: do not trust the effects" if readout.srm.mismatch else "ok"
        total = sum(readout.srm.expected) or 1.0
        expected = "/".join(f"{e / total:.1%}" for e in readout.srm.expected)
        basis = "configured weights" if readout.weights else "an equal split"
        lines.append(
            f"sample ratio ({'/'.join(readout.srm_arms)}) against {basis} ({expected}): "
            f"chi2={readout.srm.chi2:.3f} p={readout.srm.p_value:.4g} -> {verdict}"
        )
    if readout.notes:
        lines.append(f"notes: {readout.notes}")
    if readout.table.empty:
        lines.append("no treatment with exposed users to compare")
        return "\n".join(lines)
    header = (
        f"{'metric':<16} {'treatment':<12} {'method':<16} {'control':>10} {'treat':>10} "
        f"{'lift':>8} {'lift CI':>20} {'p':>8} {'p_holm':>8} {'p_bh':>8} {'P(win)':>7} "
        f"{'risk':>8} {'p_seq':>8}"
    )
    lines += [header, "-" * len(header)]
    for r in readout.table.itertuples(index=False):
        name = f"{r.metric}{'*' if r.guardrail else ''}"
        lines.append(
            f"{name:<16} {r.treatment:<12} {r.method:<16} {_num(r.control_mean, '10.4g')} "
            f"{_num(r.treatment_mean, '10.4g')} {_num(r.effect_rel, '+8.2%')} "
            f"{_interval(r.ci_rel_low, r.ci_rel_high, '+.1%'):>20} {_num(r.p_value, '8.4f')} "
            f"{_num(r.p_holm, '8.4f')} {_num(r.p_bh, '8.4f')} {_num(r.chance_to_win, '7.1%')} "
            f"{_num(r.expected_loss, '8.4f')} {_num(r.p_sequential, '8.4f')}"
            + ("" if r.message == "ok" else f"  ({r.message})")
        )
    lines.append(
        f"* guardrail (lower is better). lift = effect / control mean; CIs at "
        f"{1 - readout.alpha:.0%}; risk = expected relative loss of shipping the treatment."
    )
    return "\n".join(lines)
