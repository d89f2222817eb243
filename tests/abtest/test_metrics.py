"""Per-user experiment metrics on chdb, against numbers worked out by hand.

The event set below is small enough to compute every user's row on paper; the comments say why
each event counts (or does not). The same events inserted twice give the same metrics before any
merge, and experiment names that try SQL injection find nothing and change nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from clickhouse_connect.driver.client import Client

from abtest.clickhouse import (
    analytics_client,
    command,
    insert_events,
    load_item_dimension,
    query_df,
)
from abtest.metrics import USER_METRIC_COLUMNS, user_metrics
from hymirec.settings import Settings
from streaming.schema import Event

DAY = 86_400_000
T = 100 * DAY  # the experiment's first exposures
EXP = "rec-v2"
PRE_DAYS = 7

ITEMS = pd.DataFrame(
    {
        "item_id": [1, 2, 3, 4],
        "title": ["a", "b", "c", "d"],
        "year": [1995, 1996, 1997, 1998],
        "genres": [["Drama", "Comedy"], ["Drama"], ["Sci-Fi"], ["Comedy", "Romance"]],
    }
)


def ev(user: int, kind: str, ts: int, item: int | None = None, **tags: Any) -> Event:
    return Event(
        event_id=uuid.uuid4(), user_id=user, item_id=item, event_type=kind, ts_ms=ts, **tags
    )


def imp(user: int, ts: int, item: int, request: str, variant: str, **extra: Any) -> Event:
    return ev(
        user,
        "impression",
        ts,
        item,
        experiment=EXP,
        variant=variant,
        request_id=request,
        model_version=f"{variant}-1",
        **extra,
    )


HAND_MADE_EVENTS = [
    # user 1, control
    ev(1, "rating", T - 2 * DAY, 3),  # pre-period, inside the 7-day window: covariate 1
    ev(1, "click", T - 10 * DAY, 1),  # pre-period, outside the window: not counted
    imp(1, T, 1, "r1", "control", position=0, latency_ms=100.0),
    imp(1, T, 2, "r1", "control", position=1, latency_ms=100.0),  # same request: latency once
    imp(1, T + 3_600_000, 3, "r2", "control", position=0, latency_ms=300.0),
    ev(1, "click", T + 60_000, 1),  # untagged clicks count: attribution is per user
    ev(1, "play", T + 120_000, 1),
    ev(1, "click", T + 3_610_000, 3),
    ev(1, "play", T + 3 * 3_600_000, 99),  # an item missing from `items`: a play, no genres
    ev(1, "error", T + 2 * 3_600_000, experiment=EXP, variant="control", request_id="r3"),
    # user 2, treatment: first exposure a day later
    imp(2, T + DAY, 2, "r4", "treatment", latency_ms=50.0),
    imp(2, T + DAY, 4, "r4", "treatment", latency_ms=50.0),
    ev(2, "click", T, 4),  # before the first exposure (inside the window): covariate, not click
    ev(2, "click", T + DAY + 5_000, 2),
    ev(2, "rating", T + DAY + 10_000, 4),  # consumed (genres) but neither click nor play
    # user 3, treatment: exposed once, no latency logged, no outcome
    imp(3, T, 1, "r5", "treatment"),
    ev(3, "impression", T - DAY, 2, experiment="other", variant="b", request_id="o1"),
    # user 4 saw both variants: excluded and counted
    imp(4, T, 1, "r6", "control"),
    imp(4, T + 1, 2, "r7", "treatment"),
    ev(4, "click", T + 5, 1),
    # user 5: a failed request but never exposed; user 6: only another experiment
    ev(5, "error", T, experiment=EXP, variant="control", request_id="r8"),
    ev(6, "impression", T, 1, experiment="other", variant="a", request_id="o2"),
    ev(6, "click", T + 1, 1),
]

EXPECTED = pd.DataFrame(
    [
        # user, variant, first, exp, imp, clk, ply, conv, genres, lat_sum, lat_n, err, req, pre
        (1, "control", T, 2, 3, 2, 2, 1, 3, 400.0, 2, 1, 3, 1),
        (2, "treatment", T + DAY, 1, 2, 1, 0, 0, 3, 50.0, 1, 0, 1, 1),
        (3, "treatment", T, 1, 1, 0, 0, 0, 0, 0.0, 0, 0, 1, 0),
    ],
    columns=list(USER_METRIC_COLUMNS),
).astype({"user_id": "uint64"})


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    with analytics_client(Settings(data_dir=tmp_path / "data")) as opened:
        command(opened, "SYSTEM STOP MERGES events")  # every check below runs on unmerged parts
        load_item_dimension(opened, ITEMS)
        yield opened


def test_user_metrics_match_the_hand_computed_rows(client: Client) -> None:
    insert_events(client, HAND_MADE_EVENTS)
    metrics = user_metrics(client, EXP, pre_days=PRE_DAYS)
    pd.testing.assert_frame_equal(metrics.users, EXPECTED)
    assert metrics.excluded_users == 1
    assert metrics.variants() == ["control", "treatment"]


def test_the_pre_period_window_follows_pre_days(client: Client) -> None:
    insert_events(client, HAND_MADE_EVENTS)
    wide = user_metrics(client, EXP, pre_days=30).users  # now user 1's old click counts too
    assert wide["pre_positive_events"].tolist() == [2, 1, 0]


def test_events_inserted_twice_give_identical_metrics_before_any_merge(client: Client) -> None:
    insert_events(client, HAND_MADE_EVENTS)
    once = user_metrics(client, EXP, pre_days=PRE_DAYS)
    insert_events(client, HAND_MADE_EVENTS)  # every event redelivered
    insert_events(client, HAND_MADE_EVENTS[::3])  # and some a third time
    twice = user_metrics(client, EXP, pre_days=PRE_DAYS)
    parts = query_df(client, "SELECT count() FROM system.parts WHERE table='events' AND active")
    assert int(parts.iloc[0, 0]) == 3  # nothing merged: FINAL did the deduplication
    pd.testing.assert_frame_equal(twice.users, once.users)
    pd.testing.assert_frame_equal(twice.users, EXPECTED)
    assert twice.excluded_users == once.excluded_users == 1


INJECTIONS = [
    "x' OR 1=1 --",
    "x'; DROP TABLE events; --",
    f"{EXP}' OR '1'='1",
    f"{EXP}' --",
    "{experiment:String}",
    "' UNION SELECT 1 --",
    "\\' OR 1=1 --",
]


def test_injection_attempts_in_experiment_names_find_nothing_and_change_nothing(
    client: Client,
) -> None:
    insert_events(client, HAND_MADE_EVENTS)
    for name in INJECTIONS:  # one engine for all names: starting chdb costs ~1 s
        metrics = user_metrics(client, name, pre_days=PRE_DAYS)
        assert metrics.users.empty, name
        assert list(metrics.users.columns) == list(USER_METRIC_COLUMNS)
        assert metrics.excluded_users == 0, name
        counts = query_df(
            client, "SELECT (SELECT count() FROM events) AS e, (SELECT count() FROM items) AS i"
        )
        assert counts.to_dict("records") == [{"e": len(HAND_MADE_EVENTS), "i": len(ITEMS)}], name
    # The real experiment still reads out in full afterwards.
    pd.testing.assert_frame_equal(user_metrics(client, EXP, pre_days=PRE_DAYS).users, EXPECTED)


def test_a_name_with_quotes_is_matched_literally(client: Client) -> None:
    odd = "o'brien; -- test"
    insert_events(
        client,
        [ev(7, "impression", T, 1, experiment=odd, variant="a", request_id="q1", latency_ms=9.0)],
    )
    users = user_metrics(client, odd, pre_days=PRE_DAYS).users
    assert users[["user_id", "variant", "impressions"]].values.tolist() == [[7, "a", 1]]
