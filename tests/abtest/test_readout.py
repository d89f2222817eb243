"""The experiment readout against independent computations.

A seeded synthetic experiment goes into chdb (with redelivered copies); the test recomputes every
user's metrics with pandas straight from the raw events, calls ``abtest.stats`` on those arrays,
and checks the readout's numbers against them, the multiple-testing columns against statsmodels,
the SRM check against scipy, and the sequential p-value against the mSPRT formula written out.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest
from clickhouse_connect.driver.client import Client
from scipy import optimize
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from abtest.clickhouse import analytics_client, insert_events, load_item_dimension
from abtest.metrics import USER_METRIC_COLUMNS, ExperimentMetrics
from abtest.readout import (
    READOUT_COLUMNS,
    experiment_readout,
    format_readout,
    readout_from_metrics,
)
from abtest.stats import (
    ProportionStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
    bayesian_normal_test,
    cuped_ttest,
    delta_method_ratio_test,
    two_proportion_ztest,
    welch_ttest,
)
from core.errors import DataError
from core.settings import Settings
from hymirec.cli import main
from streaming.schema import Event

DAY = 86_400_000
T = 200 * DAY
EXP = "ranker"
PRE_DAYS = 7
GENRES = ["Drama", "Comedy", "Sci-Fi", "Romance", "War", "Horror"]


def synthetic_events(seed: int = 7, users: int = 240) -> tuple[list[Event], pd.DataFrame]:
    """A two-arm experiment with a click lift; returns the events and the item dimension."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, 31),
            "title": "",
            "year": 2000,
            "genres": [
                list(rng.choice(GENRES, rng.integers(1, 3), replace=False)) for _ in range(30)
            ],
        }
    )
    events: list[Event] = []

    def add(user: int, kind: str, ts: int, item: int | None = None, **tags: Any) -> None:
        events.append(
            Event(
                event_id=uuid.uuid4(),
                user_id=user,
                item_id=item,
                event_type=kind,
                ts_ms=int(ts),
                **tags,
            )
        )

    for user in range(1, users + 1):
        variant = "treatment" if rng.random() < 0.5 else "control"
        activity = rng.gamma(2.0, 1.0)
        start = T + int(rng.integers(0, 3 * DAY))
        for _ in range(rng.poisson(2 * activity)):  # history, partly outside the 7-day window
            kind = str(rng.choice(["click", "play", "rating"]))
            add(user, kind, start - rng.integers(1, 10 * DAY), int(rng.integers(1, 31)))
        click_p = min(0.6, 0.15 * math.sqrt(activity)) * (1.3 if variant == "treatment" else 1)
        for k in range(1 + rng.poisson(activity)):
            ts, request = start + k * 3_600_000, f"{user}-{k}"
            if rng.random() < 0.05:
                add(user, "error", ts, experiment=EXP, variant=variant, request_id=request)
                continue
            latency = None if rng.random() < 0.1 else float(rng.lognormal(3.5, 0.3))
            for pos in range(3):
                item = int(rng.integers(1, 31))
                add(
                    user,
                    "impression",
                    ts,
                    item,
                    experiment=EXP,
                    variant=variant,
                    request_id=request,
                    position=pos,
                    latency_ms=latency,
                )
                if rng.random() < click_p:
                    add(user, "click", ts + 1000, item)
                    if rng.random() < 0.5:
                        add(user, "play", ts + 2000, item)
                    if rng.random() < 0.3:
                        add(user, "rating", ts + 3000, item, value=4.0)
    return events, items


def reference_user_metrics(events: list[Event], items: pd.DataFrame) -> pd.DataFrame:
    """The per-user metrics recomputed with pandas from the raw events (no SQL)."""
    raw = pd.DataFrame([e.model_dump() for e in events]).drop_duplicates("event_id")
    imps = raw[(raw.event_type == "impression") & (raw.experiment == EXP)]
    by_user = imps.groupby("user_id")
    out = pd.DataFrame(
        {
            "variant": by_user["variant"].first(),
            "first_exposure_ms": by_user["ts_ms"].min(),
            "exposures": by_user["request_id"].nunique(),
            "impressions": by_user.size(),
        }
    )
    request_latency = imps.groupby(["user_id", "request_id"])["latency_ms"].max()
    out["latency_ms_sum"] = request_latency.groupby("user_id").sum()
    out["latency_requests"] = request_latency.groupby("user_id").count()
    failures = raw[(raw.event_type == "error") & (raw.experiment == EXP)]
    out["errors"] = failures.groupby("user_id").size().reindex(out.index, fill_value=0)
    out["requests"] = out["exposures"] + out["errors"]
    pos = raw[raw.event_type.isin(["click", "play", "rating"])].join(
        out["first_exposure_ms"], on="user_id", how="inner"
    )
    after = pos[pos.ts_ms >= pos.first_exposure_ms]
    before = pos[
        (pos.ts_ms < pos.first_exposure_ms) & (pos.ts_ms >= pos.first_exposure_ms - PRE_DAYS * DAY)
    ]
    for kind, column in (("click", "clicks"), ("play", "plays")):
        out[column] = after[after.event_type == kind].groupby("user_id").size()
    out["pre_positive_events"] = before.groupby("user_id").size()
    genres = after.merge(items[["item_id", "genres"]], on="item_id").explode("genres")
    out["genres_consumed"] = genres.groupby("user_id")["genres"].nunique()
    out = out.fillna(0)
    out["converted"] = (out["plays"] > 0).astype(int)
    return out.reset_index()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Experiment]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("readout"), readout_cuped_pre_days=PRE_DAYS
    )
    events, items = synthetic_events()
    with analytics_client(settings.clickhouse) as client:
        load_item_dimension(client, items)
        insert_events(client, events)
        insert_events(client, events[::10])  # redelivered copies
        yield Experiment(settings, client, reference_user_metrics(events, items))


@dataclass(frozen=True)
class Experiment:
    settings: Settings
    client: Client
    ref: pd.DataFrame  # the per-user metrics computed with pandas


def arms(ref: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    c = ref.loc[ref.variant == "control", column].to_numpy(float)
    t = ref.loc[ref.variant == "treatment", column].to_numpy(float)
    return c, t


def test_readout_matches_abtest_stats_on_independently_computed_arrays(
    experiment: Experiment,
) -> None:
    client, ref = experiment.client, experiment.ref
    readout = experiment_readout(client, EXP, pre_days=PRE_DAYS, notes="pooled training")
    table = readout.table.set_index("metric")
    assert list(readout.table.columns) == list(READOUT_COLUMNS)
    assert readout.control == "control" and readout.notes == "pooled training"
    assert dict(readout.users) == ref.variant.value_counts().sort_index().to_dict()

    (yc, yt), (xc, xt) = arms(ref, "clicks"), arms(ref, "pre_positive_events")
    expected = {
        "clicks_per_user": cuped_ttest(
            RegressionAdjustedStatistic.from_arrays(yc, xc),
            RegressionAdjustedStatistic.from_arrays(yt, xt),
        ),
        "plays_per_user": cuped_ttest(
            *(
                RegressionAdjustedStatistic.from_arrays(y, x)
                for y, x in zip(arms(ref, "plays"), (xc, xt), strict=True)
            )
        ),
        "conversion": two_proportion_ztest(
            *(ProportionStatistic.from_array(a) for a in arms(ref, "converted"))
        ),
        "ctr": delta_method_ratio_test(
            *(
                RatioStatistic.from_arrays(m, d)
                for m, d in zip(arms(ref, "clicks"), arms(ref, "impressions"), strict=True)
            )
        ),
        "genres_consumed": welch_ttest(
            *(SampleMeanStatistic.from_array(a) for a in arms(ref, "genres_consumed"))
        ),
        "error_rate": delta_method_ratio_test(
            *(
                RatioStatistic.from_arrays(m, d)
                for m, d in zip(arms(ref, "errors"), arms(ref, "requests"), strict=True)
            )
        ),
    }
    for metric, result in expected.items():
        row = table.loc[metric]
        assert row.method == result.method, metric
        assert (row.n_control, row.n_treatment) == (result.n_control, result.n_treatment)
        for field in ("control_mean", "treatment_mean", "effect_abs", "effect_rel"):
            assert row[field] == pytest.approx(getattr(result, field), rel=1e-9), (metric, field)
        # The table's p tests the lift it shows; the absolute test's p is kept beside it.
        assert row.p_scale == "relative"
        assert row.p_value == pytest.approx(result.p_value_rel, rel=1e-9), metric
        assert row.p_value_abs == pytest.approx(result.p_value, rel=1e-9), metric
        assert (row.ci_abs_low, row.ci_abs_high) == pytest.approx(result.ci_abs, rel=1e-9)
        assert (row.ci_rel_low, row.ci_rel_high) == pytest.approx(result.ci_rel, rel=1e-9)
        assert (row.p_value < 0.05) == (row.ci_rel_low > 0 or row.ci_rel_high < 0), metric

    # Welch's p-value once more, from scipy itself.
    gc, gt = arms(ref, "genres_consumed")
    scipy_p = sps.ttest_ind(gt, gc, equal_var=False).pvalue
    assert table.loc["genres_consumed", "p_value_abs"] == pytest.approx(scipy_p, rel=1e-9)
    # The click lift is real (x1.3 click probability) and CUPED sees it.
    assert table.loc["clicks_per_user", "p_value"] < 0.05


def test_adjusted_p_values_srm_bayes_and_sequential_columns(
    experiment: Experiment,
) -> None:
    client, ref = experiment.client, experiment.ref
    readout = experiment_readout(
        client, EXP, pre_days=PRE_DAYS, weights={"control": 1, "treatment": 1}
    )
    table = readout.table
    p = table["p_value"].to_numpy(float)
    assert np.allclose(table["p_holm"].to_numpy(float), multipletests(p, method="holm")[1])
    assert np.allclose(table["p_bh"].to_numpy(float), multipletests(p, method="fdr_bh")[1])

    counts = ref.variant.value_counts().sort_index()
    chi2, srm_p = sps.chisquare(counts.to_numpy())
    assert readout.srm is not None and readout.srm_arms == ("control", "treatment")
    assert readout.srm.p_value == pytest.approx(srm_p, rel=1e-9)
    assert readout.srm.chi2 == pytest.approx(chi2, rel=1e-9)

    # Bayesian columns, flat prior (GrowthBook's default): the posterior of the lift is
    # N(lift, se²), so chance to win = Φ(lift / se). Higher is better for CTR; lower is better for
    # latency, so its chance to win and loss are flipped.
    by_metric = table.set_index("metric")
    ctr = bayesian_normal_test(
        *(
            RatioStatistic.from_arrays(m, d)
            for m, d in zip(arms(ref, "clicks"), arms(ref, "impressions"), strict=True)
        ),
    )
    assert by_metric.loc["ctr", "chance_to_win"] == pytest.approx(ctr.chance_to_win, rel=1e-9)
    assert by_metric.loc["ctr", "expected_loss"] == pytest.approx(ctr.expected_loss_treatment)
    assert readout.prior.startswith("flat")
    lat = bayesian_normal_test(
        *(
            RatioStatistic.from_arrays(m, d)
            for m, d in zip(arms(ref, "latency_ms_sum"), arms(ref, "latency_requests"), strict=True)
        ),
    )
    assert lat.chance_to_win is not None
    assert by_metric.loc["latency_ms", "chance_to_win"] == pytest.approx(1 - lat.chance_to_win)
    assert by_metric.loc["latency_ms", "expected_loss"] == pytest.approx(lat.expected_loss_control)

    # CUPED everywhere: clicks' Bayesian and sequential columns use the CUPED estimator, written
    # out here (Deng et al. 2013; the lift's variance by the delta method).
    (yc, yt), (xc, xt) = arms(ref, "clicks"), arms(ref, "pre_positive_events")
    cuped = cuped_by_hand(yc, xc, yt, xt)
    assert by_metric.loc["clicks_per_user", "chance_to_win"] == pytest.approx(
        sps.norm.cdf(cuped["lift"] / math.sqrt(cuped["var_lift"])), rel=1e-9
    )
    assert by_metric.loc["clicks_per_user", "variance_abs"] == pytest.approx(cuped["var"], rel=1e-9)

    # mSPRT written out (Johari et al. 2017): p = min(1, 1/Λ) with
    # Λ = sqrt(V/(V+τ²))·exp(Δ²τ²/(2V(V+τ²))), τ fixed at this first look from the planned
    # horizon (10,000 users per arm): τ² = u·V·n/N, u = 2 ln(1/α) + ln(1 + u).
    u = optimize.brentq(lambda u: u - 2 * math.log(20) - math.log1p(u), 1.0, 100.0)
    gc, gt = arms(ref, "genres_consumed")
    welch = (gt.mean() - gc.mean(), gc.var(ddof=1) / gc.size + gt.var(ddof=1) / gt.size)
    for metric, (delta, v) in (
        ("clicks_per_user", (cuped["effect"], cuped["var"])),
        ("genres_consumed", welch),
    ):
        tau = math.sqrt(u * v * (yc.size + yt.size) / 2 / 10_000)
        lam = math.sqrt(v / (v + tau**2)) * math.exp(delta**2 * tau**2 / (2 * v * (v + tau**2)))
        assert by_metric.loc[metric, "p_sequential"] == pytest.approx(min(1.0, 1 / lam), rel=1e-9)
        state = next(s for s in readout.sequential if s.metric == metric)
        assert (state.tau, state.tau_source, state.looks) == (pytest.approx(tau), "horizon", 1)


def cuped_by_hand(
    yc: np.ndarray, xc: np.ndarray, yt: np.ndarray, xt: np.ndarray
) -> dict[str, float]:
    """CUPED's effect, its variance, the lift and the lift's delta-method variance, from numpy."""
    x, y = np.concatenate([xc, xt]), np.concatenate([yc, yt])
    theta = np.cov(y, x)[0, 1] / x.var(ddof=1)
    rc, rt = yc - theta * xc, yt - theta * xt
    effect, c = rt.mean() - rc.mean(), yc.mean()
    var = rc.var(ddof=1) / rc.size + rt.var(ddof=1) / rt.size
    cov_effect_c = -np.cov(rc, yc)[0, 1] / yc.size
    var_c = yc.var(ddof=1) / yc.size
    var_lift = var / c**2 - 2 * effect * cov_effect_c / c**3 + effect**2 * var_c / c**4
    return {"effect": effect, "var": var, "lift": effect / c, "var_lift": var_lift}


def test_readout_through_settings_and_the_cli(
    experiment: Experiment, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client, settings = experiment.client, experiment.settings
    direct = experiment_readout(client, EXP, pre_days=PRE_DAYS)
    via_settings = experiment_readout(settings, EXP)
    pd.testing.assert_frame_equal(via_settings.table, direct.table)

    monkeypatch.setenv("HYMIREC_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("HYMIREC_READOUT_CUPED_PRE_DAYS", str(PRE_DAYS))
    assert main(["readout", EXP, "--notes", "pooled training"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == format_readout(
        experiment_readout(client, EXP, pre_days=PRE_DAYS, notes="pooled training")
    )
    assert "notes: pooled training" in printed and "ctr" in printed and "error_rate*" in printed


def frame_of(rows: list[tuple[str, int, int]]) -> ExperimentMetrics:
    """A per-user frame from (variant, clicks, pre) rows; other columns get simple values."""
    frame = pd.DataFrame(rows, columns=["variant", "clicks", "pre_positive_events"])
    frame["user_id"] = np.arange(len(frame), dtype=np.uint64)
    for column in USER_METRIC_COLUMNS:
        if column not in frame:
            frame[column] = 1
    frame["plays"] = frame["clicks"] % 2
    frame["converted"] = (frame["plays"] > 0).astype(int)
    return ExperimentMetrics("pure", frame[list(USER_METRIC_COLUMNS)], 2, PRE_DAYS)


def test_control_choice_rows_per_treatment_and_srm_mismatch() -> None:
    rows = [(v, (i * 7) % 5, i % 3) for v in ("b", "a", "c") for i in range(30)]
    metrics = frame_of(rows)
    readout = readout_from_metrics(metrics)
    assert readout.control == "a"  # no variant named "control": the first by name
    assert readout.table[["treatment"]].drop_duplicates()["treatment"].tolist() == ["b", "c"]
    assert len(readout.table) == 14 and readout.excluded_users == 2
    assert readout_from_metrics(metrics, control="c").control == "c"
    with pytest.raises(DataError, match="'control' has no exposed users"):
        readout_from_metrics(metrics, control="control")

    skewed = readout_from_metrics(metrics, weights={"a": 0.8, "b": 0.1, "c": 0.1})
    assert skewed.srm is not None and skewed.srm.mismatch
    assert "MISMATCH" in format_readout(skewed)


def test_a_constant_covariate_falls_back_to_welch_and_degenerate_arms_are_coded() -> None:
    rows = [(v, i % 4, 0) for v in ("control", "treatment") for i in range(20)]
    table = readout_from_metrics(frame_of(rows)).table.set_index("metric")
    assert table.loc["clicks_per_user", "method"] == "welch_t"  # no covariate variance
    # Every user has errors = requests = 1 here: the error rate has no variance, hence no test.
    assert table.loc["error_rate", "message"] == "zero_variance"
    assert np.isnan(table.loc["error_rate", "p_value"])
    assert np.isnan(table.loc["error_rate", "p_holm"])
    assert table.loc["clicks_per_user", "p_holm"] >= table.loc["clicks_per_user", "p_value"]


def test_an_experiment_without_users_reads_out_empty() -> None:
    empty = pd.DataFrame({c: pd.Series(dtype="int64") for c in USER_METRIC_COLUMNS})
    readout = readout_from_metrics(ExperimentMetrics("none", empty, 0, PRE_DAYS))
    assert readout.table.empty and readout.srm is None and readout.control is None
    assert "no treatment with exposed users" in format_readout(readout)
