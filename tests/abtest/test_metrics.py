"""Per-user experiment metrics on chdb, against numbers worked out by hand and against the
version-1 query.

The event set below is small enough to compute every user's row on paper; the comments say why
each event counts (or does not). The same events inserted twice give the same metrics before any
merge, and experiment names that try SQL injection find nothing and change nothing. Random event
sets with the awkward cases (mixed variants, a request's impressions with different or missing
latencies, missing request ids, copies redelivered in separate inserts) give the numbers of the
version-1 query (``tests/abtest/version1.py``), per user and summed per variant.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
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
from abtest.metrics import (
    SUM_COLUMNS,
    USER_METRIC_COLUMNS,
    ExperimentSums,
    user_metrics,
    variant_sums,
    variant_sums_from_users,
)
from abtest.stats import (
    ProportionStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
)
from core.settings import Settings
from streaming.schema import Event
from tests.abtest.version1 import version_1_user_metrics

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
    with analytics_client(Settings(data_dir=tmp_path / "data").clickhouse) as opened:
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


def test_variant_sums_are_the_sums_of_the_hand_computed_rows(client: Client) -> None:
    insert_events(client, HAND_MADE_EVENTS)
    sums = variant_sums(client, EXP, pre_days=PRE_DAYS)
    assert sums.users == {"control": 1, "treatment": 2}
    assert sums.excluded_users == 1
    treatment = sums.variants["treatment"]  # users 2 and 3, by hand
    assert treatment.sums["impressions"] == 3 and treatment.squares["impressions"] == 5
    assert treatment.product("clicks", "impressions") == 1 * 2 + 0 * 1
    assert treatment.product("impressions", "clicks") == 2
    assert treatment.sums["latency_ms_sum"] == 50.0 and treatment.squares["genres_consumed"] == 9
    assert_sums_equal(sums, variant_sums_from_users(user_metrics(client, EXP, pre_days=PRE_DAYS)))


def test_variant_sums_give_the_statistics_of_the_per_user_arrays(client: Client) -> None:
    events = random_events(np.random.default_rng(7), users=60)
    insert_events(client, events)
    users = user_metrics(client, EXP, pre_days=PRE_DAYS).users
    sums = variant_sums(client, EXP, pre_days=PRE_DAYS)
    for variant, arm in sums.variants.items():
        frame = users[users["variant"] == variant]
        assert arm.mean("clicks") == SampleMeanStatistic.from_array(frame["clicks"])
        assert arm.proportion("converted") == ProportionStatistic.from_array(frame["converted"])
        assert arm.ratio("errors", "requests") == RatioStatistic.from_arrays(
            frame["errors"], frame["requests"]
        )
        assert arm.regression("plays", "pre_positive_events") == (
            RegressionAdjustedStatistic.from_arrays(frame["plays"], frame["pre_positive_events"])
        )
        latency = arm.ratio("latency_ms_sum", "latency_requests")
        expected = RatioStatistic.from_arrays(frame["latency_ms_sum"], frame["latency_requests"])
        for field in ("m_sum", "m_sum_squares", "m_d_sum_of_products"):  # float sums: any order
            assert getattr(latency, field) == pytest.approx(getattr(expected, field), rel=1e-12)


# Items of the random event sets: 1..24 in the items table (some with no genre), 25..30 not.
RANDOM_GENRES = ["Drama", "Comedy", "Sci-Fi", "Romance", "Horror", "Western"]


def random_items(rng: np.random.Generator) -> pd.DataFrame:
    genres = [list(rng.choice(RANDOM_GENRES, rng.integers(0, 4), replace=False)) for _ in range(24)]
    return pd.DataFrame({"item_id": range(1, 25), "title": "", "year": 2000, "genres": genres})


def random_events(rng: np.random.Generator, users: int, first_user: int = 1) -> list[Event]:
    """Events of ``users`` users with every awkward case the metrics define an answer for (an
    exposed user's first exposure is ``start``, so outcomes land on the window's edges too)."""
    events: list[Event] = []
    for user in range(first_user, first_user + users):
        arm = str(rng.choice(["control", "treatment"]))
        start = T + int(rng.integers(0, 3 * DAY))
        for r in range(int(rng.integers(0, 4))):  # 0..3 requests: some users are never exposed
            ts = start + r * 3_600_000
            request = None if rng.random() < 0.1 else f"u{user}-r{r}"  # a missing request id
            variant = arm if rng.random() > 0.05 else "treatment"  # sometimes mixed
            latency = float(rng.integers(20, 200))
            for position in range(int(rng.integers(1, 5))):
                own = rng.random()  # mostly the request's latency; sometimes another, or none
                lat = latency if own < 0.7 else None if own < 0.85 else float(rng.integers(300))
                tags = {
                    "variant": variant,
                    "request_id": request,
                    "latency_ms": lat,
                    "position": position,
                }
                item = int(rng.integers(1, 31))
                events.append(ev(user, "impression", ts, item, experiment=EXP, **tags))
            if rng.random() < 0.2:  # the same list shown in another experiment
                events.append(ev(user, "impression", ts, 1, experiment="other", variant="b"))
            if rng.random() < 0.1:  # tagged with the experiment but no variant: not an exposure
                events.append(ev(user, "impression", ts, 2, experiment=EXP))
        for e in range(int(rng.integers(0, 3))):  # failed requests, some with no variant
            tags = {"variant": None if rng.random() < 0.3 else arm, "request_id": f"u{user}-e{e}"}
            ts = start + int(rng.integers(-DAY, DAY))
            events.append(ev(user, "error", ts, experiment=EXP, **tags))
        edges = [0, -1, -PRE_DAYS * DAY, -PRE_DAYS * DAY - 1, -30 * DAY]  # window boundaries
        offsets = [int(o) for o in rng.integers(-20 * DAY, 5 * DAY, rng.integers(0, 12))]
        for offset in offsets + [e for e in edges if rng.random() < 0.3]:
            kind = str(rng.choice(["click", "play", "rating"]))
            events.append(ev(user, kind, start + offset, int(rng.integers(1, 31))))
    return events


def insert_with_redeliveries(client: Client, rng: np.random.Generator, events: list[Event]) -> None:
    """Four inserts, then a fifth of the events again in two more (some a third time)."""
    order = rng.permutation(len(events))
    for block in np.array_split(order, 4):
        insert_events(client, [events[i] for i in block])
    for _ in range(2):
        again = rng.choice(len(events), size=len(events) // 5, replace=False)
        insert_events(client, [events[i] for i in again])


def assert_sums_equal(ours: ExperimentSums, reference: ExperimentSums) -> None:
    """Integer sums exactly; sums with the float latency up to summation order."""
    assert ours.users == reference.users
    assert ours.excluded_users == reference.excluded_users
    for variant, arm in ours.variants.items():
        other = reference.variants[variant]
        for column in SUM_COLUMNS:
            for a, b in [(column, column)] + [(column, c) for c in SUM_COLUMNS if c != column]:
                value, expected = arm.product(a, b), other.product(a, b)
                if "latency_ms_sum" in (a, b):
                    assert value == pytest.approx(expected, rel=1e-12), (variant, a, b)
                else:
                    assert value == expected and isinstance(value, int), (variant, a, b)
            assert arm.sums[column] == pytest.approx(other.sums[column], rel=1e-12)
            if column != "latency_ms_sum":
                assert arm.sums[column] == other.sums[column]


def assert_frame_matches_version_1(users: pd.DataFrame, reference: pd.DataFrame) -> None:
    """Counts exactly; each user's latency sum up to float summation order."""
    reference = reference.astype(users.dtypes.to_dict())
    exact = [c for c in USER_METRIC_COLUMNS if c != "latency_ms_sum"]
    pd.testing.assert_frame_equal(users[exact], reference[exact], check_exact=True)
    np.testing.assert_allclose(users["latency_ms_sum"], reference["latency_ms_sum"], rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_the_version_1_query_on_redelivered_events(client: Client, seed: int) -> None:
    rng = np.random.default_rng(seed)
    load_item_dimension(client, random_items(rng))
    insert_with_redeliveries(client, rng, random_events(rng, users=150))
    parts = query_df(client, "SELECT count() FROM system.parts WHERE table='events' AND active")
    assert int(parts.iloc[0, 0]) == 6  # unmerged: FINAL has copies in other parts to collapse
    for pre_days in (PRE_DAYS, 0, 30):
        reference, excluded = version_1_user_metrics(client, EXP, pre_days=pre_days)
        assert len(reference) > 50 and excluded > 0  # the awkward cases did occur
        metrics = user_metrics(client, EXP, pre_days=pre_days)
        assert metrics.excluded_users == excluded
        assert_frame_matches_version_1(metrics.users, reference)
        sums = variant_sums(client, EXP, pre_days=pre_days)
        assert_sums_equal(sums, variant_sums_from_users(metrics))
    command(client, "SYSTEM START MERGES events")
    command(client, "OPTIMIZE TABLE events FINAL")
    command(client, "OPTIMIZE TABLE exposure_requests FINAL")
    merged = user_metrics(client, EXP, pre_days=PRE_DAYS)
    assert_frame_matches_version_1(
        merged.users, version_1_user_metrics(client, EXP, pre_days=PRE_DAYS)[0]
    )
