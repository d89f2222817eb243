"""Per-user metrics of one experiment, computed in ClickHouse: one row per exposed user.

Definitions (the user is the unit of randomisation and of analysis):

- **exposure**: an ``impression`` tagged with the experiment and a variant. ``first_exposure_ms`` is
  the user's earliest one, ``exposures`` the distinct request ids among them, ``impressions`` their
  count. A user whose impressions name more than one variant of the experiment was mis-assigned
  (or mis-logged); such users are left out of every metric and counted in ``excluded_users``.
- **outcomes** are attributed to the user, not to a request (as GrowthBook and Eppo do): the user's
  ``click`` and ``play`` events at or after the first exposure, whether or not they carry the
  experiment's tag. ``converted`` is 1 when the user played at least one item (a proportion), and
  CTR is the ratio metric clicks / impressions (summed over users; analysed by the delta method).
- **diversity**: the number of distinct genres (from the ``items`` dimension) among the items the
  user consumed (click, play or rating) at or after the first exposure.
- **guardrails**: the request latency, ``latency_ms_sum / latency_requests`` over the user's
  distinct exposure requests (each request's latency counted once, not once per impression), and
  the error rate ``errors / requests``, where ``errors`` counts the experiment's ``error`` events
  (failed requests) and ``requests = exposures + errors``.
- **CUPED covariate**: ``pre_positive_events``, the user's click, play and rating events in the
  ``pre_days`` days before the first exposure (Deng et al. 2013 use the same metric measured
  before the experiment).

Every read of ``events`` and ``items`` uses ``FINAL`` (see ``abtest.clickhouse``), so redelivered
events count once even before ClickHouse merges the parts that hold the copies; the per-user and
per-request exposure facts come from ``exposure_users`` and ``exposure_requests`` (minima and
maxima over the impressions, which copies cannot change). The numbers are those of the
seven-scan query this replaced (``tests/abtest/version1.py`` keeps it as the reference): counts
exactly, latency sums up to float summation order.

``variant_sums`` returns the same frame summed per variant (n, Σx, Σx², Σxy), computed where the
data lives, for a readout that needs only the sufficient statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from clickhouse_connect.driver.client import Client

from abtest.clickhouse import query_df
from abtest.stats import (
    ProportionStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
)

__all__ = [
    "SUM_COLUMNS",
    "USER_METRIC_COLUMNS",
    "ExperimentMetrics",
    "ExperimentSums",
    "VariantSums",
    "user_metrics",
    "variant_sums",
    "variant_sums_from_users",
]

MS_PER_DAY = 86_400_000

USER_METRIC_COLUMNS: tuple[str, ...] = (
    "user_id",
    "variant",
    "first_exposure_ms",
    "exposures",
    "impressions",
    "clicks",
    "plays",
    "converted",
    "genres_consumed",
    "latency_ms_sum",
    "latency_requests",
    "errors",
    "requests",
    "pre_positive_events",
)

# Parameters: experiment (String), pre_window_ms (Int64). Nothing else enters the text.
# Every CTE is used once (ClickHouse inlines each use, so a CTE used twice is computed twice), and
# each reads one key range: ``events`` is ordered by (event_type, experiment, user_id, event_id),
# so the experiment's impressions, its errors and the positive events lie in separate ranges, each
# read once. The exposed users, their variants and first exposures come from ``exposure_users`` (a
# row per user; read a second time, first exposures only, for the join that dates the outcomes),
# the distinct requests and each request's latency from ``exposure_requests`` (a row per request:
# a fifth of the impressions, and no GROUP BY over request id strings).
# PREWHERE (not WHERE) on the FINAL reads filters rows before the copies are collapsed, which is
# exact because the copies of an event are identical in every column but ingested_at; it spares
# FINAL from merging the rows that the filter drops.
_USER_ROWS_SQL = """
WITH
    exposure AS (
        SELECT
            user_id,
            min(variant_min) AS exposed_variant,
            max(variant_max) != min(variant_min) AS mixed,
            min(first_ts_ms) AS first_exposure_ms
        FROM exposure_users FINAL
        WHERE experiment = {experiment:String}
        GROUP BY user_id
    ),
    requests AS (
        SELECT
            user_id,
            countIf(request_id IS NOT NULL) AS exposures,
            sum(latency_ms) AS latency_ms_sum,
            count(latency_ms) AS latency_requests
        FROM exposure_requests FINAL
        WHERE experiment = {experiment:String}
        GROUP BY user_id
    ),
    first_exposure AS (
        SELECT user_id, min(first_ts_ms) AS first_exposure_ms
        FROM exposure_users FINAL
        WHERE experiment = {experiment:String}
        GROUP BY user_id
    ),
    shown AS (
        SELECT user_id, count() AS impressions
        FROM events FINAL
        PREWHERE event_type = 'impression'
            AND experiment = {experiment:String}
            AND variant IS NOT NULL
        GROUP BY user_id
    ),
    failures AS (
        SELECT user_id, count() AS errors
        FROM events FINAL
        PREWHERE event_type = 'error' AND experiment = {experiment:String}
        GROUP BY user_id
    ),
    genre_ids AS (
        SELECT genre, toUInt32(row_number() OVER (ORDER BY genre)) AS genre_id
        FROM (SELECT DISTINCT arrayJoin(genres) AS genre FROM items FINAL)
    ),
    item_genres AS (
        SELECT i.item_id AS item_id, groupArray(g.genre_id) AS genre_ids
        FROM (SELECT item_id, arrayJoin(genres) AS genre FROM items FINAL) AS i
        INNER JOIN genre_ids AS g ON i.genre = g.genre
        GROUP BY i.item_id
    ),
    outcome AS (
        SELECT
            p.user_id AS user_id,
            countIf(p.event_type = 'click' AND p.ts_ms >= x.first_exposure_ms) AS clicks,
            countIf(p.event_type = 'play' AND p.ts_ms >= x.first_exposure_ms) AS plays,
            countIf(
                p.ts_ms < x.first_exposure_ms
                AND p.ts_ms >= x.first_exposure_ms - {pre_window_ms:Int64}
            ) AS pre_positive_events,
            uniqExactArrayIf(g.genre_ids, p.ts_ms >= x.first_exposure_ms) AS genres_consumed
        FROM events AS p FINAL
        INNER JOIN first_exposure AS x ON p.user_id = x.user_id
        LEFT JOIN item_genres AS g ON p.item_id = g.item_id
        PREWHERE p.event_type IN ('click', 'play', 'rating')
        GROUP BY p.user_id
    )
SELECT
    x.user_id AS user_id,
    toString(x.exposed_variant) AS variant,
    x.mixed AS mixed,
    toInt64(x.first_exposure_ms) AS first_exposure_ms,
    toInt64(coalesce(r.exposures, 0)) AS exposures,
    toInt64(coalesce(s.impressions, 0)) AS impressions,
    toInt64(coalesce(o.clicks, 0)) AS clicks,
    toInt64(coalesce(o.plays, 0)) AS plays,
    toInt64(coalesce(o.plays, 0) > 0) AS converted,
    toInt64(coalesce(o.genres_consumed, 0)) AS genres_consumed,
    toFloat64(coalesce(r.latency_ms_sum, 0)) AS latency_ms_sum,
    toInt64(coalesce(r.latency_requests, 0)) AS latency_requests,
    toInt64(coalesce(f.errors, 0)) AS errors,
    toInt64(coalesce(r.exposures, 0) + coalesce(f.errors, 0)) AS requests,
    toInt64(coalesce(o.pre_positive_events, 0)) AS pre_positive_events
FROM exposure AS x
LEFT JOIN requests AS r ON x.user_id = r.user_id
LEFT JOIN shown AS s ON x.user_id = s.user_id
LEFT JOIN failures AS f ON x.user_id = f.user_id
LEFT JOIN outcome AS o ON x.user_id = o.user_id
"""

_USER_METRICS_SQL = f"SELECT * FROM ({_USER_ROWS_SQL}) ORDER BY user_id"

SUM_COLUMNS: tuple[str, ...] = USER_METRIC_COLUMNS[3:]
"""The per-user columns that ``variant_sums`` sums: all but user, variant and first exposure."""

_PAIRS: tuple[tuple[str, str], ...] = tuple(combinations(SUM_COLUMNS, 2))
_FLOAT_COLUMNS = frozenset({"latency_ms_sum"})

# Per variant, over the included users: n, and for each column Σx, Σx² and Σxy with every later
# column. The aliases are built from the constant column names above, never from input. Integer
# columns sum as Int64, exactly (numpy's float sums of the same integers are exact too).
_SUMS = ", ".join(
    [f"sumIf({c}, NOT mixed) AS sum__{c}" for c in SUM_COLUMNS]
    + [f"sumIf({c} * {c}, NOT mixed) AS sq__{c}" for c in SUM_COLUMNS]
    + [f"sumIf({a} * {b}, NOT mixed) AS prod__{a}__{b}" for a, b in _PAIRS]
)
_VARIANT_SUMS_SQL = f"""
SELECT variant, countIf(NOT mixed) AS n, countIf(mixed) AS excluded, {_SUMS}
FROM ({_USER_ROWS_SQL})
GROUP BY variant
ORDER BY variant
"""

_DTYPES: dict[str, str] = {
    "user_id": "uint64",
    "variant": "object",
    "latency_ms_sum": "float64",
} | {c: "int64" for c in USER_METRIC_COLUMNS if c not in ("user_id", "variant", "latency_ms_sum")}


@dataclass(frozen=True)
class ExperimentMetrics:
    """The per-user metric frame of one experiment (columns ``USER_METRIC_COLUMNS``, by user_id).

    ``excluded_users`` counts users exposed to more than one variant, who are not in ``users``.
    """

    experiment: str
    users: pd.DataFrame
    excluded_users: int
    pre_days: int

    def variants(self) -> list[str]:
        """The variants with at least one included user, sorted."""
        return sorted(str(v) for v in self.users["variant"].unique())


def user_metrics(client: Client, experiment: str, *, pre_days: int) -> ExperimentMetrics:
    """One row per user exposed to ``experiment``; see the module docstring for the metrics."""
    if pre_days < 0:
        raise ValueError(f"pre_days must be >= 0, got {pre_days}")
    raw = query_df(
        client,
        _USER_METRICS_SQL,
        {"experiment": experiment, "pre_window_ms": pre_days * MS_PER_DAY},
    )
    if raw.empty:
        empty = pd.DataFrame({c: pd.Series(dtype=_DTYPES[c]) for c in USER_METRIC_COLUMNS})
        return ExperimentMetrics(experiment, empty, 0, pre_days)
    mixed = raw["mixed"].astype(bool)
    users = raw.loc[~mixed, list(USER_METRIC_COLUMNS)].astype(_DTYPES).reset_index(drop=True)
    return ExperimentMetrics(experiment, users, int(mixed.sum()), pre_days)


@dataclass(frozen=True)
class VariantSums:
    """Sufficient statistics of one variant's included users, mergeable with ``+``: the count,
    and for each of ``SUM_COLUMNS`` Σx and Σx², and Σxy for each pair (keys in ``SUM_COLUMNS``
    order). The methods give the statistics engine's per-arm inputs (gbstats' design)."""

    n: int
    sums: Mapping[str, float]
    squares: Mapping[str, float]
    products: Mapping[tuple[str, str], float]

    def __add__(self, other: VariantSums) -> VariantSums:
        return VariantSums(
            self.n + other.n,
            {c: self.sums[c] + other.sums[c] for c in SUM_COLUMNS},
            {c: self.squares[c] + other.squares[c] for c in SUM_COLUMNS},
            {p: self.products[p] + other.products[p] for p in _PAIRS},
        )

    def product(self, a: str, b: str) -> float:
        """Σ a·b over the users (either order of the two columns)."""
        if a == b:
            return self.squares[a]
        return self.products[(a, b)] if (a, b) in self.products else self.products[(b, a)]

    def mean(self, column: str) -> SampleMeanStatistic:
        return SampleMeanStatistic(self.n, self.sums[column], self.squares[column])

    def proportion(self, column: str) -> ProportionStatistic:
        return ProportionStatistic(self.n, int(self.sums[column]))

    def ratio(self, numerator: str, denominator: str) -> RatioStatistic:
        return RatioStatistic(
            self.n,
            self.sums[numerator],
            self.squares[numerator],
            self.sums[denominator],
            self.squares[denominator],
            self.product(numerator, denominator),
        )

    def regression(self, post: str, pre: str) -> RegressionAdjustedStatistic:
        """``post`` adjusted by the covariate ``pre`` (CUPED)."""
        return RegressionAdjustedStatistic(
            self.n,
            self.sums[post],
            self.squares[post],
            self.sums[pre],
            self.squares[pre],
            self.product(post, pre),
        )


@dataclass(frozen=True)
class ExperimentSums:
    """Per variant (sorted), the sums of its included users; ``excluded_users`` as in
    :class:`ExperimentMetrics`. A variant whose users were all excluded is not listed."""

    experiment: str
    variants: Mapping[str, VariantSums]
    excluded_users: int
    pre_days: int

    @property
    def users(self) -> dict[str, int]:
        return {v: s.n for v, s in self.variants.items()}


def _number(value: Any, *columns: str) -> float:
    """A sum as float when a float column enters it, else as an exact int."""
    return float(value) if _FLOAT_COLUMNS.intersection(columns) else int(value)


def variant_sums(client: Client, experiment: str, *, pre_days: int) -> ExperimentSums:
    """The sums of ``user_metrics``' columns per variant, computed where the data lives (one row
    per variant comes back, not one per user): ``variant_sums_from_users(user_metrics(...))``."""
    if pre_days < 0:
        raise ValueError(f"pre_days must be >= 0, got {pre_days}")
    raw = query_df(
        client,
        _VARIANT_SUMS_SQL,
        {"experiment": experiment, "pre_window_ms": pre_days * MS_PER_DAY},
    )
    variants: dict[str, VariantSums] = {}
    for row in [] if raw.empty else raw.to_dict("records"):
        if row["n"] > 0:
            variants[str(row["variant"])] = VariantSums(
                int(row["n"]),
                {c: _number(row[f"sum__{c}"], c) for c in SUM_COLUMNS},
                {c: _number(row[f"sq__{c}"], c) for c in SUM_COLUMNS},
                {(a, b): _number(row[f"prod__{a}__{b}"], a, b) for a, b in _PAIRS},
            )
    excluded = 0 if raw.empty else int(raw["excluded"].sum())
    return ExperimentSums(experiment, variants, excluded, pre_days)


def variant_sums_from_users(metrics: ExperimentMetrics) -> ExperimentSums:
    """The same sums from a per-user frame, with numpy (pure; the reference ``variant_sums`` is
    tested against)."""
    variants = {}
    for variant, frame in metrics.users.groupby("variant", sort=True):
        x = {c: frame[c].to_numpy(dtype=np.float64) for c in SUM_COLUMNS}
        variants[str(variant)] = VariantSums(
            len(frame),
            {c: _number(x[c].sum(), c) for c in SUM_COLUMNS},
            {c: _number(np.dot(x[c], x[c]), c) for c in SUM_COLUMNS},
            {(a, b): _number(np.dot(x[a], x[b]), a, b) for a, b in _PAIRS},
        )
    return ExperimentSums(metrics.experiment, variants, metrics.excluded_users, metrics.pre_days)
