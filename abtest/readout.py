"""The experiment readout: every metric, every treatment against control, in one tidy table.

``experiment_readout`` queries the per-user metrics (``abtest.metrics``) and hands them to
``readout_from_metrics``, a pure function over the frame; each row goes through
``abtest.readout_rows.compare_statistics``, which calls the statistics engine (``abtest.stats``)
on the two arms' sufficient statistics. The methods and the conventions (p-values on the scale
of the interval shown, CUPED everywhere or nowhere, a flat prior, τ fixed once for the sequential
column) are in ``abtest.readout_rows``.

Each row also carries Holm (FWER) and Benjamini–Hochberg (FDR) adjusted p-values over all
metric × treatment rows. The sample-ratio check compares included users per variant with the
configured weights (an equal split when none are given; ``hymirec readout`` passes the
experiments file's). The sequential states after the look are in ``Readout.sequential``; pass
them as ``previous`` to the next look.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from clickhouse_connect.driver.client import Client

from abtest.clickhouse import analytics_client, query_df
from abtest.metrics import ExperimentMetrics, user_metrics
from abtest.readout_format import format_readout
from abtest.readout_rows import (
    COVARIATE,
    READOUT_COLUMNS,
    READOUT_METRICS,
    MetricSpec,
    arm_statistic,
    compare_statistics,
    test_statistics,
)
from abtest.sequential_looks import SequentialPlan, SequentialState, states_by_key
from abtest.snapshot import previous_sequential_states
from abtest.stats import (
    NormalPrior,
    SrmResult,
    StatsDataError,
    benjamini_hochberg,
    describe_prior,
    holm,
    srm_test,
)
from core.errors import DataError, ExperimentConfigError
from core.settings import Settings

__all__ = [
    "COVARIATE",
    "READOUT_COLUMNS",
    "READOUT_METRICS",
    "MetricSpec",
    "Readout",
    "arm_statistic",
    "compare_statistics",
    "experiment_names",
    "experiment_readout",
    "format_readout",
    "readout_from_metrics",
]

_EXPERIMENTS_SQL = """
SELECT DISTINCT toString(assumeNotNull(experiment)) AS experiment
FROM events FINAL
PREWHERE event_type = 'impression' AND experiment IS NOT NULL AND variant IS NOT NULL
ORDER BY experiment
"""


@dataclass(frozen=True)
class Readout:
    """An experiment's readout: the tidy table (``READOUT_COLUMNS``), the SRM check, the prior
    of the Bayesian columns and the sequential states after this look."""

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
    prior: str = describe_prior(None)
    sequential: tuple[SequentialState, ...] = ()


def experiment_names(client: Client) -> list[str]:
    """Experiments with at least one tagged impression, sorted (none on an empty database)."""
    frame = query_df(client, _EXPERIMENTS_SQL)
    # clickhouse-connect returns an empty result as a frame without columns.
    return [] if frame.empty else [str(e) for e in frame["experiment"]]


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


_DEFAULT_PLAN = SequentialPlan()


def _rows(
    frame: pd.DataFrame,
    control: str,
    variants: list[str],
    alpha: float,
    prior: NormalPrior | None,
    sequential: SequentialPlan | None,
    previous: Mapping[tuple[str, str], SequentialState],
) -> tuple[list[dict[str, Any]], list[SequentialState]]:
    rows, states = [], []
    control_frame = frame[frame["variant"] == control]
    for treatment in (v for v in variants if v != control):
        treatment_frame = frame[frame["variant"] == treatment]
        for spec in READOUT_METRICS:
            c, t = test_statistics(spec, control_frame, treatment_frame)
            row, state = compare_statistics(
                spec,
                c,
                t,
                treatment_name=treatment,
                alpha=alpha,
                prior=prior,
                sequential=sequential,
                previous=previous.get((spec.name, treatment)),
            )
            rows.append(row | {"control": control, "treatment": treatment})
            if state is not None:
                states.append(state)
    return rows, states


def readout_from_metrics(
    metrics: ExperimentMetrics,
    control: str | None = None,
    weights: Mapping[str, float] | None = None,
    alpha: float = 0.05,
    *,
    notes: str | None = None,
    prior: NormalPrior | None = None,
    sequential: SequentialPlan | None = _DEFAULT_PLAN,
    previous: Sequence[SequentialState] = (),
    require_control: bool = True,
) -> Readout:
    """The readout of an already-computed per-user frame (pure: no I/O).

    A ``control`` without exposed users is an error, unless ``require_control`` is False: then
    the table is empty and the SRM check (against ``weights``) still runs. ``previous`` are the
    sequential states of the previous look (``Readout.sequential``); ``sequential=None`` leaves
    the sequential column empty. Malformed values in the frame raise DataError.
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
    rows: list[dict[str, Any]] = []
    states: list[SequentialState] = []
    try:
        if chosen is not None and chosen in variants:
            rows, states = _rows(
                frame, chosen, variants, alpha, prior, sequential, states_by_key(previous)
            )
        srm, arms = _srm(users, weights)
    except StatsDataError as exc:  # the engine's own error type, translated at this boundary
        raise DataError(f"{metrics.experiment!r}: {exc}") from exc
    table = pd.DataFrame(rows, columns=[c for c in READOUT_COLUMNS if c not in ("p_holm", "p_bh")])
    table = _with_adjusted_p(table)[list(READOUT_COLUMNS)]
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
        prior=describe_prior(prior),
        sequential=tuple(states),
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


def _check_known(
    client: Client, experiment: str, metrics: ExperimentMetrics, configured: Collection[str] | None
) -> None:
    """An experiment with no exposed users that the config does not define does not exist."""
    if configured is None or not metrics.users.empty or experiment in configured:
        return
    with_traffic = experiment_names(client)
    raise ExperimentConfigError(
        f"unknown experiment {experiment!r:.80}: it is not in the experiments file and has no "
        f"exposures. Configured: {', '.join(sorted(configured)) or 'none'}; with exposures: "
        f"{', '.join(with_traffic) or 'none'}"
    )


def experiment_readout(
    source: Client | Settings,
    experiment: str,
    control: str | None = None,
    weights: Mapping[str, float] | None = None,
    alpha: float = 0.05,
    *,
    notes: str | None = None,
    pre_days: int | None = None,
    prior: NormalPrior | None = None,
    sequential: SequentialPlan | None = _DEFAULT_PLAN,
    previous: Sequence[SequentialState] | None = None,
    configured: Collection[str] | None = None,
) -> Readout:
    """Query ``experiment``'s per-user metrics and read it out (see the module docstring).

    ``source`` is an open client or the settings (then a client is opened and closed here, which
    on chdb fails with an AnalyticsError while another process, such as the sink, holds the
    directory). ``pre_days`` defaults to ``settings.cuped_pre_days`` (its default with a client).
    Given ``configured`` (the experiments file's names, as ``hymirec readout`` passes them), an
    experiment with no exposed users that is not among them is an ExperimentConfigError naming
    the experiments that exist (configured, and with exposures). With settings and no ``previous``,
    the sequential states come from the experiment's published snapshot, if any (read, never
    written: only the publisher advances them).
    """
    if isinstance(source, Settings):
        days = pre_days if pre_days is not None else source.cuped_pre_days
        if previous is None:
            previous = previous_sequential_states(source.readouts_dir, experiment)
        with analytics_client(source) as client:
            metrics = user_metrics(client, experiment, pre_days=days)
            _check_known(client, experiment, metrics, configured)
    else:
        default_days = Settings.model_fields["cuped_pre_days"].default
        days = pre_days if pre_days is not None else default_days
        metrics = user_metrics(source, experiment, pre_days=days)
        _check_known(source, experiment, metrics, configured)
    return readout_from_metrics(
        metrics,
        control,
        weights,
        alpha,
        notes=notes,
        prior=prior,
        sequential=sequential,
        previous=previous or (),
    )
