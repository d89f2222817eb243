"""The in-process closed loop (``hymirec.closed_loop``): its truths and its per-user frame against
hand computations from the per-request records, on short runs of the grounded ML-100K users.

The arms are ``popular`` (the service's ML-100K prior) and a fixed popularity ranker over seeded
random counts (a model that needs no training and serves other lists than ``popular``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from abtest.splitter import Splitter
from core.errors import ConfigError
from core.movielens import load_ratings
from core.settings import Settings
from hymirec.closed_loop import EXPERIMENT, ClosedLoopResult, closed_loop_config, run_closed_loop
from model.base import CatalogInfo
from model.data import build_catalog
from model.popularity import Config as PopularityConfig
from model.popularity import PopularityRecommender
from serving.models import LoadedModel, movielens_popularity
from simulator.grounded import GroundedPopulation, grounded_population
from tests.conftest import EMBEDDING_CACHE

REQUESTS = 400


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[CatalogInfo, GroundedPopulation]:
    torch.set_num_threads(1)
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("closed-loop"),
        cache_dir=EMBEDDING_CACHE,
        codebook_levels=2,
        codebook_size=8,
    )
    catalog = build_catalog(settings)
    return catalog, grounded_population(load_ratings(), seed=0, cache_dir=EMBEDDING_CACHE)


@pytest.fixture(scope="module")
def arms(world: tuple[CatalogInfo, GroundedPopulation]) -> dict[str, LoadedModel]:
    catalog, _ = world
    counts = np.random.default_rng(7).random(catalog.num_items + 1).astype(np.float32)
    shuffled = PopularityRecommender(catalog, PopularityConfig())
    shuffled.fit(torch.from_numpy(counts))
    return {
        "popular": movielens_popularity(catalog),
        "shuffled": LoadedModel.build("popular", "random-counts", shuffled, 0, source="prior"),
    }


def run(
    world: tuple[CatalogInfo, GroundedPopulation], control: LoadedModel, treatment: LoadedModel
) -> ClosedLoopResult:
    catalog, population = world
    return run_closed_loop(
        population,
        {"control": control, "treatment": treatment},
        catalog=catalog,
        requests=REQUESTS,
        seed=3,
        control="control",
    )


@pytest.fixture(scope="module")
def aa(world, arms) -> ClosedLoopResult:
    return run(world, arms["popular"], arms["popular"])


@pytest.fixture(scope="module")
def ab(world, arms) -> ClosedLoopResult:
    return run(world, arms["popular"], arms["shuffled"])


def test_counterfactual_truth_is_exactly_zero_in_an_aa_test(aa: ClosedLoopResult) -> None:
    assert np.array_equal(aa.expected_ctr[:, 0], aa.expected_ctr[:, 1])
    assert aa.counterfactual_truth("treatment") == 0.0
    assert aa.lifts["treatment"].counterfactual_truth == 0.0


@pytest.mark.parametrize("name", ["aa", "ab"])
def test_truths_equal_hand_computations_from_the_request_records(name, request) -> None:
    result: ClosedLoopResult = request.getfixturevalue(name)
    served = result.expected_ctr[np.arange(REQUESTS), result.variant]
    by_arm = [
        [ctr for ctr, a in zip(served, result.variant, strict=True) if a == b] for b in (0, 1)
    ]
    hand = (sum(by_arm[1]) / len(by_arm[1])) / (sum(by_arm[0]) / len(by_arm[0])) - 1
    lift = result.lifts["treatment"]
    assert lift.served_truth == pytest.approx(hand, rel=1e-12, abs=1e-15)
    everyone = sum(result.expected_ctr[:, 1]) / sum(result.expected_ctr[:, 0]) - 1
    assert lift.counterfactual_truth == pytest.approx(everyone, rel=1e-12, abs=1e-15)


def test_the_fixed_model_serves_other_lists_and_the_truth_sees_it(ab: ClosedLoopResult) -> None:
    # Random counts rank items with no regard to taste: the truth says they lose, clearly.
    assert ab.counterfactual_truth("treatment") < -0.2
    assert ab.served_truth("treatment") < -0.2
    assert set(ab.readout.users) == {"control", "treatment"}


@pytest.mark.parametrize("name", ["aa", "ab"])
def test_per_user_rows_sum_to_the_recorded_totals(name, request) -> None:
    result: ClosedLoopResult = request.getfixturevalue(name)
    users = result.metrics.users
    assert len(result.user) == REQUESTS and (result.impressions == 10).all()
    assert users["user_id"].is_unique
    assert len(users) == len(np.unique(result.user))
    for column, recorded in (
        ("exposures", np.ones(REQUESTS, np.int64)),
        ("impressions", result.impressions),
        ("clicks", result.clicks),
        ("plays", result.plays),
    ):
        assert int(users[column].sum()) == int(recorded.sum())
        for b, variant in enumerate(result.variants):
            in_arm = users["variant"] == variant
            assert int(users.loc[in_arm, column].sum()) == int(recorded[result.variant == b].sum())
    assert (users["converted"] == (users["plays"] > 0)).all()
    assert (users["clicks"] <= users["impressions"]).all() and (
        users["plays"] <= users["clicks"]
    ).all()


@pytest.mark.parametrize("name", ["aa", "ab"])
def test_the_readout_ctr_is_clicks_over_impressions(name, request) -> None:
    result: ClosedLoopResult = request.getfixturevalue(name)
    row = result.readout.table.set_index("metric").loc["ctr"]
    ctr = [
        result.clicks[result.variant == b].sum() / result.impressions[result.variant == b].sum()
        for b in (0, 1)
    ]
    assert row["control_mean"] == pytest.approx(ctr[0], rel=1e-12)
    assert row["treatment_mean"] == pytest.approx(ctr[1], rel=1e-12)
    lift = result.lifts["treatment"]
    assert lift.measured == pytest.approx(ctr[1] / ctr[0] - 1, rel=1e-9)
    assert lift.ci_low < lift.measured < lift.ci_high
    assert lift.significant_holm == bool(row["p_holm"] < 0.05)


def test_a_seed_gives_the_same_run_and_splits_by_the_splitter(world, arms, aa) -> None:
    again = run(world, arms["popular"], arms["popular"])
    pd.testing.assert_frame_equal(again.metrics.users, aa.metrics.users)
    assert np.array_equal(again.expected_ctr, aa.expected_ctr)
    # Every user in the variant the splitter's hash gives them, with this run's salt.
    splitter = Splitter(closed_loop_config(aa.variants, seed=3))
    expected = [splitter.assign(EXPERIMENT, int(u), 0) for u in aa.metrics.users["user_id"]]
    assert aa.metrics.users["variant"].tolist() == expected
    other = Splitter(closed_loop_config(aa.variants, seed=4))
    assert expected != [other.assign(EXPERIMENT, int(u), 0) for u in aa.metrics.users["user_id"]]


def test_bad_arms_are_config_errors(world, arms) -> None:
    catalog, population = world
    with pytest.raises(ConfigError, match="control"):
        run_closed_loop(
            population,
            {"a": arms["popular"], "b": arms["popular"]},
            catalog=catalog,
            requests=1,
            seed=0,
            control="control",
        )
    with pytest.raises(ConfigError, match="at least two"):
        run_closed_loop(
            population,
            {"control": arms["popular"]},
            catalog=catalog,
            requests=1,
            seed=0,
            control="control",
        )
