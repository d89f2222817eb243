"""The readout benchmark's references: two hand-written queries of the same per-variant sums, and
the readout table computed from per-variant sums.

``HAND_WRITTEN_SQL`` reads the same tables as ``abtest.metrics`` (``events``, ``exposure_users``,
``exposure_requests``, ``items``) in one flat statement, as one would write it by hand (the genre
count over the genre names): the yardstick for the readout's SQL in the same run.
``EVENTS_ONLY_SQL`` uses neither aggregate: it groups the impressions by request id itself and
takes the outcomes from per-user arrays rather than a join, so its agreement with
``variant_sums`` checks the materialised views too; it is what the same numbers cost without the
schema's help. Each CTE is
used once (ClickHouse inlines every use). Both name their columns as ``abtest.metrics``'
variant-sums query does (``n``, ``excluded``, ``sum__c``, ``sq__c``, ``prod__a__b``).

``readout_table_from_sums`` (the readout table of per-variant sums, with the default choices) now
lives in ``abtest.readout``, the path ``experiment_readout`` takes; it is re-exported here for the
benchmarks that import it from this module.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from abtest.metrics import SUM_COLUMNS, ExperimentSums, VariantSums
from abtest.readout import readout_table_from_sums

__all__ = [
    "EVENTS_ONLY_SQL",
    "HAND_WRITTEN_SQL",
    "readout_table_from_sums",
    "sums_frame",
    "sums_from_frame",
]

_PAIRS = [(a, b) for i, a in enumerate(SUM_COLUMNS) for b in SUM_COLUMNS[i + 1 :]]
_SUMS = ", ".join(
    [f"sumIf({c}, NOT mixed) AS sum__{c}" for c in SUM_COLUMNS]
    + [f"sumIf({c} * {c}, NOT mixed) AS sq__{c}" for c in SUM_COLUMNS]
    + [f"sumIf({a} * {b}, NOT mixed) AS prod__{a}__{b}" for a, b in _PAIRS]
)

# Parameters (both): experiment (String), pre_window_ms (Int64).
EVENTS_ONLY_SQL = f"""
WITH
    requests AS (
        SELECT user_id, request_id, min(ts_ms) AS ts, min(variant) AS v_min, max(variant) AS v_max,
            count() AS shown, max(latency_ms) AS latency
        FROM events FINAL
        PREWHERE event_type = 'impression' AND experiment = {{experiment:String}}
            AND variant IS NOT NULL
        GROUP BY user_id, request_id
    ),
    activity AS (
        SELECT user_id,
            countIf(event_type = 'error') AS errors,
            groupArrayIf(ts_ms, event_type = 'click') AS click_ts,
            groupArrayIf(ts_ms, event_type = 'play') AS play_ts,
            groupArrayIf(ts_ms, event_type != 'error') AS positive_ts,
            groupArrayIf(assumeNotNull(item_id), event_type != 'error' AND item_id IS NOT NULL)
                AS item_ids,
            groupArrayIf(ts_ms, event_type != 'error' AND item_id IS NOT NULL) AS item_ts
        FROM events FINAL
        PREWHERE event_type IN ('click', 'play', 'rating')
            OR (event_type = 'error' AND experiment = {{experiment:String}})
        GROUP BY user_id
    ),
    exposure AS (
        SELECT
            user_id,
            min(v_min) AS variant,
            max(v_max) != min(v_min) AS mixed,
            min(ts) AS first_ms,
            countIf(request_id IS NOT NULL) AS exposures,
            sum(shown) AS impressions,
            sum(latency) AS latency_ms_sum,
            count(latency) AS latency_requests
        FROM requests
        GROUP BY user_id
    ),
    per_user AS (
        SELECT
            x.*,
            a.errors AS errors,
            arrayCount(t -> t >= x.first_ms, a.click_ts) AS clicks,
            arrayCount(t -> t >= x.first_ms, a.play_ts) AS plays,
            arrayCount(
                t -> t < x.first_ms AND t >= x.first_ms - {{pre_window_ms:Int64}}, a.positive_ts
            ) AS pre_positive_events,
            arrayDistinct(arrayFilter((i, t) -> t >= x.first_ms, a.item_ids, a.item_ts))
                AS consumed
        FROM exposure AS x
        LEFT JOIN activity AS a ON x.user_id = a.user_id
    ),
    with_genres AS (
        SELECT
            u.user_id AS user_id,
            any(u.variant) AS variant,
            any(u.mixed) AS mixed,
            any(u.exposures) AS exposures,
            any(u.impressions) AS impressions,
            any(u.clicks) AS clicks,
            any(u.plays) AS plays,
            toInt64(any(u.plays) > 0) AS converted,
            uniqExactArray(i.genres) AS genres_consumed,
            any(u.latency_ms_sum) AS latency_ms_sum,
            any(u.latency_requests) AS latency_requests,
            any(u.errors) AS errors,
            any(u.exposures) + any(u.errors) AS requests,
            any(u.pre_positive_events) AS pre_positive_events
        FROM per_user AS u
        LEFT ARRAY JOIN u.consumed AS consumed_item
        LEFT JOIN (SELECT item_id, genres FROM items FINAL) AS i ON consumed_item = i.item_id
        GROUP BY u.user_id
    )
SELECT toString(variant) AS variant, countIf(NOT mixed) AS n, countIf(mixed) AS excluded, {_SUMS}
FROM with_genres
GROUP BY variant
ORDER BY variant
"""

HAND_WRITTEN_SQL = f"""
SELECT toString(variant) AS variant, countIf(NOT mixed) AS n, countIf(mixed) AS excluded, {_SUMS}
FROM (
    SELECT
        x.user_id AS user_id, x.variant AS variant, x.mixed AS mixed,
        q.exposures AS exposures, s.impressions AS impressions,
        o.clicks AS clicks, o.plays AS plays, toInt64(o.plays > 0) AS converted,
        o.genres_consumed AS genres_consumed,
        q.latency_ms_sum AS latency_ms_sum, q.latency_requests AS latency_requests,
        f.errors AS errors, q.exposures + f.errors AS requests,
        o.pre_positive_events AS pre_positive_events
    FROM (
        SELECT user_id, min(variant_min) AS variant, max(variant_max) != min(variant_min) AS mixed
        FROM exposure_users FINAL WHERE experiment = {{experiment:String}} GROUP BY user_id
    ) AS x
    INNER JOIN (
        SELECT user_id, countIf(request_id IS NOT NULL) AS exposures,
            sum(latency_ms) AS latency_ms_sum, count(latency_ms) AS latency_requests
        FROM exposure_requests FINAL WHERE experiment = {{experiment:String}} GROUP BY user_id
    ) AS q ON q.user_id = x.user_id
    LEFT JOIN (
        SELECT user_id, count() AS impressions FROM events FINAL
        PREWHERE event_type = 'impression' AND experiment = {{experiment:String}}
            AND variant IS NOT NULL
        GROUP BY user_id
    ) AS s ON s.user_id = x.user_id
    LEFT JOIN (
        SELECT user_id, count() AS errors FROM events FINAL
        PREWHERE event_type = 'error' AND experiment = {{experiment:String}} GROUP BY user_id
    ) AS f ON f.user_id = x.user_id
    LEFT JOIN (
        SELECT p.user_id AS user_id,
            countIf(p.event_type = 'click' AND p.ts_ms >= e.first_ms) AS clicks,
            countIf(p.event_type = 'play' AND p.ts_ms >= e.first_ms) AS plays,
            countIf(p.ts_ms < e.first_ms AND p.ts_ms >= e.first_ms - {{pre_window_ms:Int64}})
                AS pre_positive_events,
            uniqExactArrayIf(i.genre_set, p.ts_ms >= e.first_ms) AS genres_consumed
        FROM events AS p FINAL
        INNER JOIN (
            SELECT user_id, min(first_ts_ms) AS first_ms FROM exposure_users FINAL
            WHERE experiment = {{experiment:String}} GROUP BY user_id
        ) AS e ON p.user_id = e.user_id
        LEFT JOIN (
            SELECT item_id, arrayMap(g -> toString(g), genres) AS genre_set FROM items FINAL
        ) AS i ON p.item_id = i.item_id
        PREWHERE p.event_type IN ('click', 'play', 'rating')
        GROUP BY p.user_id
    ) AS o ON o.user_id = x.user_id
)
GROUP BY variant
ORDER BY variant
"""


def sums_frame(sums: ExperimentSums) -> pd.DataFrame:
    """``sums`` as the reference query's columns, one row per variant (the excluded users are
    reported per experiment, so ``excluded`` is the total on every row)."""
    rows = []
    for variant, s in sums.variants.items():
        row: dict[str, object] = {"variant": variant, "n": s.n}
        row |= {f"sum__{c}": s.sums[c] for c in SUM_COLUMNS}
        row |= {f"sq__{c}": s.squares[c] for c in SUM_COLUMNS}
        row |= {f"prod__{a}__{b}": s.product(a, b) for a, b in _PAIRS}
        rows.append(row)
    return pd.DataFrame(rows)


def sums_from_frame(frame: pd.DataFrame, experiment: str, pre_days: int) -> ExperimentSums:
    """A reference query's rows (``sums_frame``'s columns, with ``excluded``) as the sums
    ``variant_sums`` returns (integer sums as int, those with the latency as float)."""

    def number(value: Any, *columns: str) -> float:
        return float(value) if "latency_ms_sum" in columns else int(value)

    variants = {
        str(row["variant"]): VariantSums(
            int(row["n"]),
            {c: number(row[f"sum__{c}"], c) for c in SUM_COLUMNS},
            {c: number(row[f"sq__{c}"], c) for c in SUM_COLUMNS},
            {(a, b): number(row[f"prod__{a}__{b}"], a, b) for a, b in _PAIRS},
        )
        for row in frame.to_dict("records")
        if row["n"] > 0
    }
    return ExperimentSums(experiment, variants, int(frame["excluded"].sum()), pre_days)
