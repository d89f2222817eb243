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
events count once even before ClickHouse merges the parts that hold the copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from clickhouse_connect.driver.client import Client

from abtest.clickhouse import query_df

__all__ = ["USER_METRIC_COLUMNS", "ExperimentMetrics", "user_metrics"]

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
# PREWHERE (not WHERE) on the FINAL reads filters rows before the copies are collapsed, which is
# exact here because the copies of an event are identical in every column but ingested_at; it
# spares FINAL from merging the rows that the filter drops (apply_prewhere_after_final = 0).
_USER_METRICS_SQL = """
WITH
    exposure_rows AS (
        SELECT user_id, variant, request_id, ts_ms, latency_ms
        FROM events FINAL
        PREWHERE event_type = 'impression'
            AND experiment = {experiment:String}
            AND variant IS NOT NULL
    ),
    positive_rows AS (
        SELECT user_id, item_id, event_type, ts_ms
        FROM events FINAL
        PREWHERE event_type IN ('click', 'play', 'rating')
    ),
    exposure AS (
        SELECT
            user_id,
            assumeNotNull(any(variant)) AS exposed_variant,
            uniqExact(variant) AS variant_count,
            min(ts_ms) AS first_exposure_ms,
            uniqExact(request_id) AS exposures,
            count() AS impressions
        FROM exposure_rows
        GROUP BY user_id
    ),
    latency AS (
        SELECT
            user_id,
            sum(request_latency_ms) AS latency_ms_sum,
            count(request_latency_ms) AS latency_requests
        FROM (
            SELECT user_id, request_id, max(latency_ms) AS request_latency_ms
            FROM exposure_rows
            GROUP BY user_id, request_id
        )
        GROUP BY user_id
    ),
    failures AS (
        SELECT user_id, count() AS errors
        FROM events FINAL
        PREWHERE event_type = 'error' AND experiment = {experiment:String}
        GROUP BY user_id
    ),
    outcome AS (
        SELECT
            p.user_id AS user_id,
            countIf(p.event_type = 'click' AND p.ts_ms >= x.first_exposure_ms) AS clicks,
            countIf(p.event_type = 'play' AND p.ts_ms >= x.first_exposure_ms) AS plays,
            countIf(
                p.ts_ms < x.first_exposure_ms
                AND p.ts_ms >= x.first_exposure_ms - {pre_window_ms:Int64}
            ) AS pre_positive_events
        FROM positive_rows AS p
        INNER JOIN exposure AS x ON p.user_id = x.user_id
        GROUP BY p.user_id
    ),
    diversity AS (
        SELECT p.user_id AS user_id, uniqExactArray(i.genres) AS genres_consumed
        FROM positive_rows AS p
        INNER JOIN exposure AS x ON p.user_id = x.user_id
        INNER JOIN items AS i FINAL ON assumeNotNull(p.item_id) = i.item_id
        WHERE p.item_id IS NOT NULL AND p.ts_ms >= x.first_exposure_ms
        GROUP BY p.user_id
    )
SELECT
    x.user_id AS user_id,
    toString(x.exposed_variant) AS variant,
    toUInt64(x.variant_count) AS variant_count,
    toInt64(x.first_exposure_ms) AS first_exposure_ms,
    toInt64(x.exposures) AS exposures,
    toInt64(x.impressions) AS impressions,
    toInt64(coalesce(o.clicks, 0)) AS clicks,
    toInt64(coalesce(o.plays, 0)) AS plays,
    toInt64(coalesce(o.plays, 0) > 0) AS converted,
    toInt64(coalesce(d.genres_consumed, 0)) AS genres_consumed,
    toFloat64(coalesce(l.latency_ms_sum, 0)) AS latency_ms_sum,
    toInt64(coalesce(l.latency_requests, 0)) AS latency_requests,
    toInt64(coalesce(f.errors, 0)) AS errors,
    toInt64(x.exposures + coalesce(f.errors, 0)) AS requests,
    toInt64(coalesce(o.pre_positive_events, 0)) AS pre_positive_events
FROM exposure AS x
LEFT JOIN latency AS l ON x.user_id = l.user_id
LEFT JOIN failures AS f ON x.user_id = f.user_id
LEFT JOIN outcome AS o ON x.user_id = o.user_id
LEFT JOIN diversity AS d ON x.user_id = d.user_id
ORDER BY user_id
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
    mixed = raw["variant_count"] > 1
    users = raw.loc[~mixed, list(USER_METRIC_COLUMNS)].astype(_DTYPES).reset_index(drop=True)
    return ExperimentMetrics(experiment, users, int(mixed.sum()), pre_days)
