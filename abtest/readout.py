"""The experiment readout: every metric, every treatment against control, in one tidy table.

``experiment_readout`` asks ClickHouse for each variant's sufficient statistics
(``abtest.metrics.variant_sums``: n, Σx, Σx², Σxy of the per-user metrics, one row per variant)
and hands them to ``readout_from_sums``, a pure function; each row goes through
``abtest.readout_rows.compare_statistics``, which calls the statistics engine (``abtest.stats``)
on the two arms' sufficient statistics. ``readout_from_metrics`` is the same readout of a per-user
frame (``abtest.metrics.user_metrics``), with each arm's statistics taken from its rows: the
reference the sums path is tested against (equal to 1e-9 relative in every column; counts sum
exactly in both, the float latency up to summation order), and the path of callers that hold
per-user rows anyway. The methods and the conventions (p-values on the scale of the interval
shown, CUPED everywhere or nowhere, a flat prior, τ fixed once for the sequential column) are in
``abtest.readout_rows``.

Each row also carries Holm (FWER) and Benjamini–Hochberg (FDR) adjusted p-values over all
metric × treatment rows. The sample-ratio check compares included users per variant with the
configured weights (an equal split when none are given; ``hymirec readout`` passes the
experiments file's). The sequential states after the look are in ``Readout.sequential``; pass
them as ``previous`` to the next look.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from clickhouse_connect.driver.client import Client

from abtest.clickhouse import analytics_client, query_df
from abtest.metrics import ExperimentMetrics, ExperimentSums, variant_sums
from abtest.readout_format import format_readout
from abtest.readout_rows import (
    COVARIATE,
    READOUT_COLUMNS,
    READOUT_METRICS,
    MetricSpec,
    TestStatistic,
    arm_statistic,
    compare_statistics,
    sums_statistics,
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
from core.settings_groups import ReadoutSettings

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
    "readout_from_sums",
    "readout_table_from_sums",
]

# A row of exposure_users exists exactly for each experiment with a tagged impression (its
# materialised view keeps those with an experiment and a variant); partial rows need no FINAL here.
_EXPERIMENTS_SQL = """
SELECT DISTINCT toString(experiment) AS experiment
FROM exposure_users
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


# The two arms' statistics of one metric: (spec, control, treatment) -> (control's, treatment's).
Statistics = Callable[[MetricSpec, str, str], tuple[TestStatistic, TestStatistic]]


def _rows(
    statistics: Statistics,
    control: str,
    variants: list[str],
    alpha: float,
    prior: NormalPrior | None,
    sequential: SequentialPlan | None,
    previous: Mapping[tuple[str, str], SequentialState],
) -> tuple[list[dict[str, Any]], list[SequentialState]]:
    rows, states = [], []
    for treatment in (v for v in variants if v != control):
        for spec in READOUT_METRICS:
            c, t = statistics(spec, control, treatment)
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


@dataclass(frozen=True)
class _Options:
    """The readout's choices, as ``readout_from_sums`` and ``readout_from_metrics`` take them."""

    control: str | None
    weights: Mapping[str, float] | None
    alpha: float
    notes: str | None
    prior: NormalPrior | None
    sequential: SequentialPlan | None
    previous: Sequence[SequentialState]
    require_control: bool


def _readout(
    experiment: str,
    users: Mapping[str, int],
    excluded_users: int,
    statistics: Statistics,
    options: _Options,
) -> Readout:
    """The readout of the variants in ``users`` (those with included users, sorted)."""
    variants = sorted(users)
    control = options.control
    if options.require_control and control is not None and control not in variants:
        raise DataError(
            f"control variant {control!r} has no exposed users in {experiment!r}; "
            f"variants: {variants}"
        )
    chosen = control if control is not None else (_default_control(variants) if variants else None)
    rows: list[dict[str, Any]] = []
    states: list[SequentialState] = []
    try:
        if chosen is not None and chosen in variants:
            rows, states = _rows(
                statistics,
                chosen,
                variants,
                options.alpha,
                options.prior,
                options.sequential,
                states_by_key(options.previous),
            )
        srm, arms = _srm(users, options.weights)
    except StatsDataError as exc:  # the engine's own error type, translated at this boundary
        raise DataError(f"{experiment!r}: {exc}") from exc
    table = pd.DataFrame(rows, columns=[c for c in READOUT_COLUMNS if c not in ("p_holm", "p_bh")])
    table = _with_adjusted_p(table)[list(READOUT_COLUMNS)]
    return Readout(
        experiment,
        chosen,
        {v: users[v] for v in variants},
        excluded_users,
        table,
        srm,
        arms,
        options.alpha,
        options.notes,
        dict(options.weights) if options.weights else None,
        prior=describe_prior(options.prior),
        sequential=tuple(states),
    )


def readout_from_sums(
    sums: ExperimentSums,
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
    """The readout of per-variant sums (pure: no I/O), as ``experiment_readout`` computes it.

    A ``control`` without exposed users is an error, unless ``require_control`` is False: then
    the table is empty and the SRM check (against ``weights``) still runs. ``previous`` are the
    sequential states of the previous look (``Readout.sequential``); ``sequential=None`` leaves
    the sequential column empty. Sums the engine rejects raise DataError.
    """
    arms = sums.variants
    options = _Options(control, weights, alpha, notes, prior, sequential, previous, require_control)
    return _readout(
        sums.experiment,
        sums.users,
        sums.excluded_users,
        lambda spec, c, t: sums_statistics(spec, arms[c], arms[t]),
        options,
    )


def readout_table_from_sums(sums: ExperimentSums, control: str = "control") -> pd.DataFrame:
    """The readout table (``READOUT_COLUMNS``) of every treatment against ``control``, with the
    default choices (alpha 0.05, flat prior, a first sequential look)."""
    return readout_from_sums(sums, control).table


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
    """The readout of an already-computed per-user frame (pure: no I/O); the arguments as in
    ``readout_from_sums``. Malformed values in the frame (a conversion other than 0 or 1, say)
    raise DataError."""
    frame = metrics.users
    arms = {v: frame[frame["variant"] == v] for v in metrics.variants()}
    options = _Options(control, weights, alpha, notes, prior, sequential, previous, require_control)
    return _readout(
        metrics.experiment,
        {v: len(rows) for v, rows in arms.items()},
        metrics.excluded_users,
        lambda spec, c, t: test_statistics(spec, arms[c], arms[t]),
        options,
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
    client: Client, experiment: str, sums: ExperimentSums, configured: Collection[str] | None
) -> None:
    """An experiment with no exposed users that the config does not define does not exist."""
    if configured is None or sums.variants or experiment in configured:
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
    """Query ``experiment``'s per-variant sums and read it out (see the module docstring).

    ``source`` is an open client or the settings (then a client is opened and closed here, which
    on chdb fails with an AnalyticsError while another process, such as the sink, holds the
    directory). ``pre_days`` defaults to ``settings.readout.cuped_pre_days`` (its default with a
    client).
    Given ``configured`` (the experiments file's names, as ``hymirec readout`` passes them), an
    experiment with no exposed users that is not among them is an ExperimentConfigError naming
    the experiments that exist (configured, and with exposures). With settings and no ``previous``,
    the sequential states come from the experiment's published snapshot, if any (read, never
    written: only the publisher advances them).
    """
    if isinstance(source, Settings):
        days = pre_days if pre_days is not None else source.readout.cuped_pre_days
        if previous is None:
            previous = previous_sequential_states(source.readouts_dir, experiment)
        with analytics_client(source.clickhouse) as client:
            sums = variant_sums(client, experiment, pre_days=days)
            _check_known(client, experiment, sums, configured)
    else:
        default_days = ReadoutSettings.model_fields["cuped_pre_days"].default
        days = pre_days if pre_days is not None else default_days
        sums = variant_sums(source, experiment, pre_days=days)
        _check_known(source, experiment, sums, configured)
    return readout_from_sums(
        sums,
        control,
        weights,
        alpha,
        notes=notes,
        prior=prior,
        sequential=sequential,
        previous=previous or (),
    )
