"""The grounded world (simulator/factorization.py, simulator/grounded.py) against independent
references: ALS half-steps against a dense weighted least-squares solve (scipy), the objective
never increasing; users' interests against their histories counted by hand; the exact click
probabilities against a brute-force enumeration of the click model's paths; drift; bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg
from scipy.special import expit

from core.errors import ConfigError, SimulatorError
from core.movielens import load_ratings
from simulator.factorization import ImplicitALS, fit_implicit_als, implicit_als_objective
from simulator.grounded import GroundedWorld, fit_item_factors, grounded_population
from tests.simulator.test_population import enumerate_dcm


@pytest.fixture(scope="module")
def ratings():
    return load_ratings()


@pytest.fixture(scope="module")
def world(ratings, tmp_path_factory):
    return grounded_population(ratings, seed=0, cache_dir=tmp_path_factory.mktemp("world"))


def _toy(seed=0, users=30, items=40, density=0.15):
    rng = np.random.default_rng(seed)
    observed = rng.random((users, items)) < density
    observed[np.arange(users), rng.integers(items, size=users)] = True
    u, i = np.nonzero(observed)
    return u, i, users, items


def test_als_half_step_is_the_weighted_least_squares_solution():
    u, i, users, items = _toy()
    config = ImplicitALS(factors=4, alpha=5.0, regularization=0.7, iterations=3)
    fitted = fit_implicit_als(u, i, users, items, config, seed=1)
    x, y = fitted.users, fitted.items
    preference = np.zeros((users, items))
    preference[u, i] = 1.0
    weights = np.sqrt(1.0 + config.alpha * preference)
    ridge = np.sqrt(config.regularization) * np.eye(config.factors)
    # The last half-step solved every item given the final user factors: each item's factor is
    # min_y sum_u c_ui (p_ui - x_u.y)^2 + lambda |y|^2, one stacked least-squares problem.
    for item in (0, 13, 39):
        design = np.vstack([weights[:, item][:, None] * x, ridge])
        target = np.concatenate([weights[:, item] * preference[:, item], np.zeros(4)])
        solution = linalg.lstsq(design, target)[0]
        np.testing.assert_allclose(y[item], solution, rtol=1e-8, atol=1e-10)


def test_als_objective_never_increases_and_is_the_dense_formula():
    u, i, users, items = _toy(seed=3)
    config = ImplicitALS(factors=5, iterations=8)
    fitted = fit_implicit_als(u, i, users, items, config, seed=0, track_objective=True)
    assert all(b <= a + 1e-9 for a, b in zip(fitted.objective, fitted.objective[1:], strict=False))
    x, y = fitted.users, fitted.items
    by_hand = sum(
        (1 + config.alpha * p) * (p - x[a] @ y[b]) ** 2
        for a in range(users)
        for b in range(items)
        for p in [float(((u == a) & (i == b)).any())]
    ) + config.regularization * ((x**2).sum() + (y**2).sum())
    assert implicit_als_objective(fitted, u, i, config) == pytest.approx(by_hand, rel=1e-10)
    assert fitted.objective[-1] == pytest.approx(by_hand, rel=1e-10)


def test_bad_factorisation_input_is_named():
    with pytest.raises(ConfigError, match="out of range"):
        fit_implicit_als([0, 5], [0, 1], 3, 3)
    with pytest.raises(ConfigError, match="factors >= 1"):
        ImplicitALS(factors=0)


def test_item_factors_are_cached_per_seed(ratings, tmp_path):
    first = fit_item_factors(ratings, ImplicitALS(iterations=2), seed=4, cache_dir=tmp_path)
    files = list((tmp_path / "world").glob("*.npz"))
    assert len(files) == 1
    again = fit_item_factors(ratings, ImplicitALS(iterations=2), seed=4, cache_dir=tmp_path)
    np.testing.assert_array_equal(first[1], again[1])
    fit_item_factors(ratings, ImplicitALS(iterations=2), seed=5, cache_dir=tmp_path)
    assert len(list((tmp_path / "world").glob("*.npz"))) == 2


def test_interests_are_the_clusters_of_the_whole_history(world, ratings):
    labels = world.clusters.labels
    k = world.clusters.num_clusters
    multi = 0
    for user in (0, 1, 99, 942):
        history = ratings.loc[ratings.user_id == world.user_id(user), "item_id"].to_numpy()
        np.testing.assert_array_equal(world.history_items(user), history)
        shares = np.bincount(labels[history - 1], minlength=k) / len(history)
        found = world.interests(user, 0.0)
        kept = [c for c in np.argsort(-shares, kind="stable")[:5] if shares[c] >= 0.1]
        np.testing.assert_array_equal(found.clusters, kept)
        np.testing.assert_allclose(found.weights, shares[kept] / shares[kept].sum(), atol=1e-12)
        multi += len(kept) > 1
        # Each interest vector: the cluster pulled towards the user's own items in it.
        for z, cluster in enumerate(found.clusters):
            mine = world.embeddings[history[labels[history - 1] == cluster] - 1].mean(axis=0)
            vector = world.clusters.centroids[cluster] + mine / np.linalg.norm(mine)
            np.testing.assert_allclose(found.vectors[z], vector / np.linalg.norm(vector))
    assert 0.5 < world.multi_interest_share < 1.0
    assert world.num_users == 943 and world.user_id(0) == 1 and world.user_index(943) == 942


def test_relevance_and_exact_probabilities_against_enumeration(world):
    user = 42
    items = [*world.oracle_items(user, 3, 0.0), 1, 50]
    found = world.interests(user, 0.0)
    cosines_all = world.embeddings @ found.vectors.T
    q = np.quantile(cosines_all, 0.97, axis=0)
    sd = cosines_all.std(axis=0)
    relevance = expit((world.embeddings[np.array(items) - 1] @ found.vectors.T - q) / (0.25 * sd))
    np.testing.assert_allclose(world.intent_relevance(user, items, 0.0), relevance, atol=1e-9)
    model = world.click_model
    attraction = (
        model.attraction_floor + (model.attraction_max - model.attraction_floor) * relevance
    )
    examine, click, play = enumerate_dcm(found.weights, attraction, relevance, model)
    exact = world.expected(user, items, 0.0)
    np.testing.assert_allclose(exact.examine, examine, atol=1e-12)
    np.testing.assert_allclose(exact.click, click, atol=1e-12)
    np.testing.assert_allclose(exact.play, play, atol=1e-12)


def test_drift_stays_among_the_users_own_interests(ratings, tmp_path):
    drifting = grounded_population(ratings, seed=1, drift_per_hour=1.0, cache_dir=tmp_path)
    start = drifting.interests(7, 0.0)
    later = drifting.interests(7, 3.5 * 3600)
    assert set(later.clusters.tolist()) == set(start.clusters.tolist())
    assert not np.allclose(
        drifting.cluster_weights(7, 0.0), drifting.cluster_weights(7, 3.5 * 3600)
    )
    assert drifting.cluster_weights(7, 3.5 * 3600).sum() == pytest.approx(1.0)


def test_unknown_users_and_bad_worlds_are_named(world):
    with pytest.raises(SimulatorError, match="user id 944 is not one of the 943 users"):
        world.user_index(944)
    with pytest.raises(ConfigError, match="min_share"):
        GroundedWorld(min_share=0.0)
