"""Freshness per minute: the worst lag and the oldest served model in each minute of a window."""

from __future__ import annotations

import pytest

from abtest.freshness import FreshnessMinute, freshness_by_minute
from abtest.snapshot import FreshnessPoint, ModelFreshness

START_MS = 1_700_000_000_000


def point(offset_s: float, lag: int | None, **ages_s: float) -> FreshnessPoint:
    models = [
        ModelFreshness(
            model=name,
            version="v000001",
            published_at_ms=None,
            newest_event_age_ms=int(age * 1000),
            freshness_p99_ms=None,
        )
        for name, age in ages_s.items()
    ]
    return FreshnessPoint(ts_ms=START_MS + int(offset_s * 1000), training_lag=lag, models=models)


def test_each_minute_keeps_its_worst_lag_and_oldest_model() -> None:
    series = [
        point(-5, 5_000, sasrec=900),  # before the window: the warm start, left out
        point(10, 40, sasrec=12, hymirec=3),
        point(50, 900, sasrec=8, hymirec=31),
        point(70, 10, sasrec=2, hymirec=1),
        point(130, 2_000, sasrec=70, hymirec=4),
        point(200, 0, sasrec=1),  # after the window
    ]
    minutes = freshness_by_minute(series, START_MS, START_MS + 150_000)
    assert minutes == [
        FreshnessMinute(START_MS, 2, 900, 31_000, "hymirec"),
        FreshnessMinute(START_MS + 60_000, 1, 10, 2_000, "sasrec"),
        FreshnessMinute(START_MS + 120_000, 1, 2_000, 70_000, "sasrec"),
    ]
    assert [m.kept_up(1_000, 60_000) for m in minutes] == [True, True, False]
    # the lag alone decides when the ages are within their limit
    assert not FreshnessMinute(START_MS, 1, 1_000, 1, "sasrec").kept_up(1_000, 60_000)


def test_served_models_only_and_unknowns_do_not_pass() -> None:
    series = [
        point(1, 5, sasrec=4, hymirec=99),
        point(61, None, sasrec=1, hymirec=1),  # the broker did not answer: lag unknown
        point(121, 3, sasrec=2),  # hymirec has no version yet: its age is unknown
    ]
    minutes = freshness_by_minute(series, START_MS, START_MS + 180_000, models={"sasrec"})
    assert [(m.max_training_lag, m.max_event_age_ms) for m in minutes] == [
        (5, 4_000),
        (None, 1_000),
        (3, 2_000),
    ]
    both = freshness_by_minute(series, START_MS, START_MS + 180_000, {"sasrec", "hymirec"})
    assert [m.max_event_age_ms for m in both] == [99_000, 1_000, None]
    assert [m.kept_up(1_000, 60_000) for m in both] == [False, False, False]


def test_a_window_that_ends_before_it_starts_is_refused() -> None:
    with pytest.raises(ValueError, match="before it starts"):
        freshness_by_minute([], START_MS, START_MS - 1)
