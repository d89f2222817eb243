"""The readout from per-variant sums (``experiment_readout``) against the per-user path.

The per-user path (``readout_from_metrics`` of ``user_metrics``) is itself checked against pandas,
scipy and statsmodels in ``test_readout.py``; here the sums path must give its numbers in every
column the readout shows (p-values, intervals, Bayesian and sequential columns, the adjusted
p-values) to 1e-9 relative, with the same users, exclusions, SRM check and sequential states. The
data: the readout's two-arm experiment with a click lift, its CUPED covariate and both guardrails,
and the metrics tests' awkward event sets (mixed variants, missing latencies and request ids),
each inserted in blocks with copies redelivered in separate inserts and merges stopped, so
``FINAL`` has copies in other parts to collapse. A second look carries the sequential states.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from clickhouse_connect.driver.client import Client
from hypothesis import given, settings
from hypothesis import strategies as st

from abtest.clickhouse import (
    analytics_client,
    command,
    insert_events,
    load_item_dimension,
    query_df,
)
from abtest.metrics import (
    USER_METRIC_COLUMNS,
    ExperimentMetrics,
    user_metrics,
    variant_sums,
    variant_sums_from_users,
)
from abtest.readout import (
    READOUT_COLUMNS,
    Readout,
    experiment_names,
    experiment_readout,
    readout_from_metrics,
    readout_from_sums,
    readout_table_from_sums,
)
from abtest.sequential_looks import SequentialPlan
from core.settings import Settings
from streaming.schema import Event
from tests.abtest import test_metrics, test_readout

PRE_DAYS = 7
RTOL = 1e-9

# The listing the readout used before it read exposure_users: tagged impressions in events.
EXPERIMENTS_FROM_EVENTS_SQL = """
SELECT DISTINCT toString(assumeNotNull(experiment)) AS experiment
FROM events FINAL
PREWHERE event_type = 'impression' AND experiment IS NOT NULL AND variant IS NOT NULL
ORDER BY experiment
"""


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    with analytics_client(Settings(data_dir=tmp_path / "data").clickhouse) as opened:
        command(opened, "SYSTEM STOP MERGES events")
        yield opened


def insert_in_blocks(client: Client, events: list[Event], seed: int) -> None:
    """Four inserts, then a fifth of the events again in two separate inserts."""
    test_metrics.insert_with_redeliveries(client, np.random.default_rng(seed), events)
    parts = query_df(client, "SELECT count() FROM system.parts WHERE table='events' AND active")
    assert int(parts.iloc[0, 0]) >= 6


def is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def assert_same_readout(ours: Readout, reference: Readout) -> None:
    """Every column of the table to ``RTOL`` (text, flags and counts exactly), and the rest."""
    assert list(ours.table.columns) == list(READOUT_COLUMNS)
    assert len(ours.table) == len(reference.table) > 0
    rows = zip(ours.table.to_dict("records"), reference.table.to_dict("records"), strict=True)
    for got, expected in rows:
        for column in READOUT_COLUMNS:
            a, b = got[column], expected[column]
            where = (expected["metric"], expected["treatment"], column)
            if is_missing(b):
                assert is_missing(a), where
            elif isinstance(b, float):
                assert a == pytest.approx(b, rel=RTOL, abs=1e-300), where
            else:
                assert a == b, where
    assert (ours.control, dict(ours.users)) == (reference.control, dict(reference.users))
    assert ours.excluded_users == reference.excluded_users
    assert ours.srm == reference.srm and ours.srm_arms == reference.srm_arms
    assert len(ours.sequential) == len(reference.sequential)
    for s, r in zip(ours.sequential, reference.sequential, strict=True):
        assert (s.metric, s.treatment, s.looks, s.method) == (
            r.metric,
            r.treatment,
            r.looks,
            r.method,
        )
        for field in ("tau", "p_value", "cs_low", "cs_high"):
            a, b = getattr(s, field), getattr(r, field)
            assert (a is None) == (b is None), (s.metric, field)
            if a is not None:
                assert a == pytest.approx(b, rel=RTOL), (s.metric, field)


def test_the_sums_path_gives_the_per_user_readout_on_redelivered_events(client: Client) -> None:
    events, items = test_readout.synthetic_events(seed=11, users=400)
    load_item_dimension(client, items)
    exp, weights = test_readout.EXP, {"control": 0.5, "treatment": 0.5}
    plan = SequentialPlan(horizon_users_per_arm=1000, min_users_per_arm=40)  # τ at the first look
    options = {"weights": weights, "sequential": plan}
    early = [e for e in events if e.ts_ms < test_readout.T + test_readout.DAY]
    insert_in_blocks(client, early, seed=1)
    first = experiment_readout(client, exp, pre_days=PRE_DAYS, **options)
    first_ref = readout_from_metrics(user_metrics(client, exp, pre_days=PRE_DAYS), **options)
    assert_same_readout(first, first_ref)
    assert {s.looks for s in first.sequential} == {1}

    later = [e for e in events if e.ts_ms >= test_readout.T + test_readout.DAY]
    insert_in_blocks(client, later, seed=2)
    insert_events(client, early[::7])  # old events redelivered once more
    second = experiment_readout(
        client, exp, pre_days=PRE_DAYS, previous=first.sequential, **options
    )
    metrics = user_metrics(client, exp, pre_days=PRE_DAYS)
    second_ref = readout_from_metrics(metrics, previous=first_ref.sequential, **options)
    assert_same_readout(second, second_ref)

    table = second.table.set_index("metric")
    assert table.loc["clicks_per_user", "method"].startswith("cuped")  # the covariate is used
    assert table.loc[["latency_ms", "error_rate"], "guardrail"].all()
    assert table["p_value"].notna().all() and table["p_sequential"].notna().all()
    assert {s.looks for s in second.sequential} == {2}
    assert sum(second.users.values()) == len(metrics.users) > 300
    # The benchmarks' name for the table, with the default choices.
    pd.testing.assert_frame_equal(
        readout_table_from_sums(variant_sums(client, exp, pre_days=PRE_DAYS)),
        readout_from_metrics(metrics).table,
        check_exact=False,
        rtol=RTOL,
    )


@pytest.mark.parametrize("seed", [0, 3])
def test_the_sums_path_gives_the_per_user_readout_on_awkward_events(
    client: Client, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    load_item_dimension(client, test_metrics.random_items(rng))
    insert_in_blocks(client, test_metrics.random_events(rng, users=200), seed=seed)
    exp = test_metrics.EXP
    for pre_days in (PRE_DAYS, 30):
        metrics = user_metrics(client, exp, pre_days=pre_days)
        assert metrics.excluded_users > 0  # mixed users occurred and are left out of both
        reference = readout_from_metrics(metrics)
        assert_same_readout(experiment_readout(client, exp, pre_days=pre_days), reference)


def test_experiment_names_from_exposure_users_equal_the_scan_of_events(client: Client) -> None:
    assert experiment_names(client) == []
    rng = np.random.default_rng(5)
    events = test_metrics.random_events(rng, users=60)
    events.append(test_metrics.ev(900, "error", 0, experiment="errors-only", variant="a"))
    events.append(test_metrics.ev(901, "impression", 0, 1, experiment="no-variant"))
    insert_in_blocks(client, events, seed=5)
    names = experiment_names(client)
    assert names == ["other", test_metrics.EXP]
    assert names == query_df(client, EXPERIMENTS_FROM_EVENTS_SQL)["experiment"].tolist()


users_column = st.integers(min_value=0, max_value=6)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "control"]),
            users_column,
            users_column,
            users_column,
            st.floats(min_value=0.0, max_value=500.0, allow_nan=False),
        ),
        min_size=4,
        max_size=60,
    ),
    sequential=st.booleans(),
)
def test_readout_from_sums_equals_readout_from_metrics_on_any_frame(
    rows: list[tuple[str, int, int, int, float]], sequential: bool
) -> None:
    """Degenerate arms included (one user, no variance, a constant covariate): the same rows,
    messages and methods from the sums as from the per-user frame."""
    frame = pd.DataFrame(rows, columns=["variant", "clicks", "plays", "pre", "latency"])
    out = pd.DataFrame({"user_id": np.arange(len(frame), dtype=np.uint64)})
    out["variant"] = frame["variant"]
    out["first_exposure_ms"] = 0
    out["exposures"] = 1 + frame["pre"] % 3
    out["impressions"] = out["exposures"] * 2
    out["clicks"], out["plays"] = frame["clicks"], frame["plays"]
    out["converted"] = (frame["plays"] > 0).astype(int)
    out["genres_consumed"] = frame["clicks"] // 2
    out["latency_ms_sum"] = frame["latency"]
    out["latency_requests"] = (frame["latency"] > 100).astype(int) * out["exposures"]
    out["errors"] = frame["plays"] % 2
    out["requests"] = out["exposures"] + out["errors"]
    out["pre_positive_events"] = frame["pre"]
    metrics = ExperimentMetrics("any", out[list(USER_METRIC_COLUMNS)], 1, PRE_DAYS)
    if len(metrics.variants()) < 2:
        return
    plan = SequentialPlan() if sequential else None
    reference = readout_from_metrics(metrics, sequential=plan)
    ours = readout_from_sums(variant_sums_from_users(metrics), sequential=plan)
    assert_same_readout(ours, reference)
