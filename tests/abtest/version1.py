"""The analytics as they were at schema version 1: the tables and the per-user query.

References for the tests: ``VERSION_1_SCHEMA`` builds a data directory as the version-1 code left
it (``events`` ordered by ``(user_id, event_id)``, no ``exposure_requests``), for the migration
tests; ``version_1_user_metrics`` runs the version-1 query (seven reads of ``events``, the
exposures grouped by request id strings), which the faster query must match number for number.
Kept verbatim from ``abtest/metrics.py`` and ``abtest/clickhouse.py`` before commit b892a27.
"""

from __future__ import annotations

import pandas as pd
from clickhouse_connect.driver.client import Client

from abtest.clickhouse import query_df
from abtest.metrics import MS_PER_DAY, USER_METRIC_COLUMNS

VERSION_1_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS events (
        event_id UUID,
        user_id UInt64,
        item_id Nullable(UInt64),
        event_type LowCardinality(String),
        ts_ms Int64,
        experiment LowCardinality(Nullable(String)),
        variant LowCardinality(Nullable(String)),
        request_id Nullable(String),
        model_version LowCardinality(Nullable(String)),
        position Nullable(UInt16),
        value Nullable(Float64),
        latency_ms Nullable(Float64),
        schema_version UInt8,
        ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
    )
    ENGINE = ReplacingMergeTree(ingested_at)
    ORDER BY (user_id, event_id)
    """,
    """
    CREATE TABLE IF NOT EXISTS items (
        item_id UInt64,
        title String,
        year UInt16,
        genres Array(LowCardinality(String)),
        loaded_at DateTime64(3, 'UTC') DEFAULT now64(3)
    )
    ENGINE = ReplacingMergeTree(loaded_at)
    ORDER BY item_id
    """,
)

# Parameters: experiment (String), pre_window_ms (Int64).
VERSION_1_USER_METRICS_SQL = """
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


def version_1_user_metrics(
    client: Client, experiment: str, *, pre_days: int
) -> tuple[pd.DataFrame, int]:
    """The version-1 per-user frame (``USER_METRIC_COLUMNS``, by user) and the excluded users."""
    raw = query_df(
        client,
        VERSION_1_USER_METRICS_SQL,
        {"experiment": experiment, "pre_window_ms": pre_days * MS_PER_DAY},
    )
    mixed = raw["variant_count"] > 1
    users = raw.loc[~mixed, list(USER_METRIC_COLUMNS)].reset_index(drop=True)
    return users, int(mixed.sum())
