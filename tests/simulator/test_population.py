"""The simulator's pure core against independent references.

Relevance against the formula written out with scipy's expit; the exact click probabilities
against a brute-force enumeration of every path of the dependent click model and against seeded
Monte-Carlo draws of ``respond`` (binomial tests); the ground-truth lists against each other on the
real ML-100K catalogue; drift against the interpolation it promises; arrivals against scipy's
exponential and uniform distributions.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.special import expit

from core.errors import ConfigError, SimulatorError
from simulator.clusters import spherical_kmeans
from simulator.population import (
    SIM_USER_ID_BASE,
    ClickModel,
    SimulatedPopulation,
    poisson_arrivals,
)

ML100K_MAX_USER_ID = 943


def binomial_ok(successes: int, trials: int, p: float, alpha: float = 1e-3) -> bool:
    return bool(sps.binomtest(successes, trials, p).pvalue > alpha)


def visits(population, user, items, n, seed):
    """(n, L) arrays of examined, clicked, played over n seeded visits."""
    rng = np.random.default_rng(seed)
    out = np.zeros((3, n, len(items)), dtype=bool)
    for v in range(n):
        for o in population.respond(user, items, 0.0, rng):
            out[:, v, o.position] = (o.examined, o.clicked, o.played)
    return out


def enumerate_dcm(weights, attraction, relevance, model: ClickModel):
    """P(examine), P(click), P(play) per position, summed over every path of the DCM: a path is
    an intent z, the last examined position s and the click bits of positions 0..s."""
    length = attraction.shape[0]
    examine, click, play = np.zeros(length), np.zeros(length), np.zeros(length)
    for z, w in enumerate(weights):
        for s in range(length):
            for bits in itertools.product([0, 1], repeat=s + 1):
                prob = w
                for q, clicked in enumerate(bits):
                    a = attraction[q, z]
                    prob *= a if clicked else 1 - a
                    go_on = model.continue_after_click if clicked else model.continue_after_skip
                    # Went on after every position before s; stopped after s (unless s is last).
                    if q < s:
                        prob *= go_on
                    elif s < length - 1:
                        prob *= 1 - go_on
                for q, clicked in enumerate(bits):
                    examine[q] += prob
                    click[q] += prob * clicked
                    play[q] += prob * clicked * relevance[q, z]
    return examine, click, play


# -- determinism, identities, bad input ------------------------------------------------------


def test_same_seed_same_users_and_responses(catalogue):
    item_ids, embeddings = catalogue
    a = SimulatedPopulation(embeddings, item_ids, num_users=50, seed=7, drift_per_hour=0.1)
    b = SimulatedPopulation(embeddings, item_ids, num_users=50, seed=7, drift_per_hour=0.1)
    c = SimulatedPopulation(embeddings, item_ids, num_users=50, seed=8, drift_per_hour=0.1)
    np.testing.assert_array_equal(a.clusters.labels, b.clusters.labels)
    # Asked in a different order: a user's interests do not depend on who was asked first.
    for user, t_s in [(3, 0.0), (49, 7200.0), (3, 36_000.0)]:
        np.testing.assert_array_equal(a.cluster_weights(user, t_s), b.cluster_weights(user, t_s))
    for user, t_s in [(3, 36_000.0), (3, 0.0)]:
        np.testing.assert_array_equal(
            b.interests(user, t_s).anchors, a.interests(user, t_s).anchors
        )
    items = list(item_ids[:10])
    first = a.respond(3, items, 60.0, np.random.default_rng(1))
    assert first == b.respond(3, items, 60.0, np.random.default_rng(1))
    different = [
        not np.array_equal(a.cluster_weights(u, 0.0), c.cluster_weights(u, 0.0)) for u in range(50)
    ]
    assert sum(different) >= 45


def test_user_ids_never_collide_with_movielens(population):
    assert SIM_USER_ID_BASE > ML100K_MAX_USER_ID
    assert population.user_id(0) == SIM_USER_ID_BASE
    assert population.user_id(199) == SIM_USER_ID_BASE + 199
    assert population.user_index(SIM_USER_ID_BASE + 17) == 17
    with pytest.raises(SimulatorError, match=r"user index 200 is outside 0\.\.199"):
        population.user_id(200)
    with pytest.raises(SimulatorError, match="outside"):
        population.user_index(ML100K_MAX_USER_ID)


def test_bad_input_is_named(catalogue, population):
    item_ids, embeddings = catalogue
    with pytest.raises(SimulatorError, match=r"unknown item ids \[0, 99999\].*ids 1\.\.1682"):
        population.expected_ctr(0, [1, 99999, 0], 0.0)
    with pytest.raises(SimulatorError, match="simulated time must be >= 0"):
        population.interests(0, -1.0)
    with pytest.raises(ConfigError, match="interests_per_user >= 1; got 0"):
        SimulatedPopulation(embeddings, item_ids, num_users=5, interests_per_user=0)
    with pytest.raises(ConfigError, match=r"0 < relevant_share < 1; got 1\.5"):
        SimulatedPopulation(embeddings, item_ids, num_users=5, relevant_share=1.5)
    with pytest.raises(ConfigError, match="zero row"):
        SimulatedPopulation(np.zeros((3, 4)), num_users=1)
    with pytest.raises(ConfigError, match="item_ids must be sorted"):
        SimulatedPopulation(embeddings, item_ids[::-1], num_users=1)
    with pytest.raises(ConfigError, match="interests_per_user=40 needs more"):
        SimulatedPopulation(embeddings, item_ids, num_users=1, interests_per_user=40)
    with pytest.raises(ConfigError, match=r"ClickModel.continue_after_skip must be in \[0, 1\]"):
        ClickModel(continue_after_skip=1.2)


# -- relevance and the click model -----------------------------------------------------------


def test_relevance_is_the_documented_formula(catalogue, population):
    item_ids, embeddings = catalogue
    centred = embeddings.astype(np.float64)
    centred -= centred.mean(axis=0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    user, items = 11, [1, 50, 181, 1000, 1682]
    found = population.interests(user, 0.0)
    labels, centroids = population.clusters.labels, population.clusters.centroids
    expected = np.zeros((len(items), len(found.weights)))
    for z, anchor in enumerate(found.anchors):
        vector = centroids[labels[anchor]] + 0.5 * centred[anchor]
        vector /= np.linalg.norm(vector)
        np.testing.assert_allclose(found.vectors[z], vector, atol=1e-12)
        cosines = centred @ vector
        q, sd = np.quantile(cosines, 0.97), cosines.std()
        expected[:, z] = expit((centred[np.array(items) - 1] @ vector - q) / (0.25 * sd))
    np.testing.assert_allclose(population.intent_relevance(user, items, 0.0), expected, atol=1e-9)
    np.testing.assert_allclose(
        population.relevance(user, items, 0.0), expected @ found.weights, atol=1e-9
    )
    # About relevant_share of the catalogue is relevant (r > 1/2) to each interest.
    everything = population.intent_relevance(user, list(item_ids), 0.0)
    assert np.all(np.abs((everything > 0.5).mean(axis=0) - 0.03) < 0.002)


def test_exact_probabilities_match_path_enumeration(population):
    user = 5
    items = [*population.oracle_items(user, 3, 0.0), 1, 2]
    found = population.interests(user, 0.0)
    relevance = population.intent_relevance(user, items, 0.0)
    model = population.click_model
    attraction = (
        model.attraction_floor + (model.attraction_max - model.attraction_floor) * relevance
    )
    examine, click, play = enumerate_dcm(found.weights, attraction, relevance, model)
    exact = population.expected(user, items, 0.0)
    np.testing.assert_allclose(exact.examine, examine, atol=1e-12)
    np.testing.assert_allclose(exact.click, click, atol=1e-12)
    np.testing.assert_allclose(exact.play, play, atol=1e-12)
    assert exact.ctr == pytest.approx(click.mean())


def test_position_bias_lowers_clicks_down_the_list(population):
    user, n = 3, 6000
    item = int(population.oracle_items(user, 1, 0.0)[0])
    items = [item] * 10  # one item at every position: only the position differs
    exact = population.expected(user, items, 0.0)
    assert np.all(np.diff(exact.click) < 0)
    assert exact.click[9] < 0.5 * exact.click[0]
    # Hand formula: P(C_p) = sum_z w_z a_z c_z^p with c_z = a_z lambda + (1 - a_z) eta.
    found = population.interests(user, 0.0)
    model = population.click_model
    a = model.attraction(population.intent_relevance(user, [item], 0.0)[0])
    c = a * model.continue_after_click + (1 - a) * model.continue_after_skip
    hand = [float(found.weights @ (a * c**p)) for p in range(10)]
    np.testing.assert_allclose(exact.click, hand, rtol=1e-12)
    examined, clicked, _ = visits(population, user, items, n, seed=2)
    counts = clicked.sum(axis=0)
    for p in range(10):
        assert binomial_ok(int(counts[p]), n, exact.click[p]), (p, counts[p], exact.click[p] * n)
        assert binomial_ok(int(examined[:, p].sum()), n, exact.examine[p])
    # And the observed decline is itself significant (first vs last position).
    table = [[counts[0], n - counts[0]], [counts[9], n - counts[9]]]
    assert sps.fisher_exact(table).pvalue < 1e-6


def test_respond_frequencies_match_expected_outcomes(population):
    user, n = 8, 6000
    items = list(population.oracle_items(user, 5, 0.0)) + list(range(100, 105))
    exact = population.expected(user, items, 0.0)
    examined, clicked, played = visits(population, user, items, n, seed=4)
    assert not np.any(played & ~clicked) and not np.any(clicked & ~examined)
    for p in range(len(items)):
        assert binomial_ok(int(clicked[:, p].sum()), n, exact.click[p]), p
        assert binomial_ok(int(played[:, p].sum()), n, exact.play[p]), p
    # CTR: the mean over visits of clicks / 10 against expected_ctr, by a z-test.
    per_visit = clicked.mean(axis=1)
    z = (per_visit.mean() - exact.ctr) / (per_visit.std(ddof=1) / math.sqrt(n))
    assert abs(z) < 3.3
    assert population.expected_ctr(user, items, 0.0) == exact.ctr


# -- ground truth: multi-interest lists win --------------------------------------------------


def dominant_interest_items(population, user, k):
    """Top-k items for the user's strongest interest only (a single-interest recommender)."""
    found = population.interests(user, 0.0)
    top = found.vectors[int(np.argmax(found.weights))]
    return population.item_ids[np.argsort(-(population.embeddings @ top))[:k]]


def test_oracle_beats_random_and_single_interest_lists(population):
    rng = np.random.default_rng(0)
    users = range(120)
    ctr = {name: [] for name in ("oracle", "mean_embedding", "dominant", "random")}
    clusters = {name: [] for name in ctr}
    for user in users:
        lists = {
            "oracle": population.oracle_items(user, 10, 0.0),
            "mean_embedding": population.mean_embedding_items(user, 10, 0.0),
            "dominant": dominant_interest_items(population, user, 10),
            "random": population.random_items(10, rng),
        }
        for name, items in lists.items():
            ctr[name].append(population.expected_ctr(user, list(items), 0.0))
            clusters[name].append(population.consumed_diversity(list(items)).distinct_clusters)
    oracle = np.array(ctr["oracle"])
    for rival in ("mean_embedding", "dominant", "random"):
        other = np.array(ctr[rival])
        assert sps.ttest_rel(oracle, other, alternative="greater").pvalue < 1e-10, rival
        assert np.mean(oracle >= other - 1e-12) > 0.9, rival
    # Effect sizes on the real catalogue (seed 0): the multi-interest list wins by > 8% over the
    # best single-vector list, and random lists are far below.
    assert oracle.mean() > 1.08 * np.mean(ctr["mean_embedding"])
    assert oracle.mean() > 1.15 * np.mean(ctr["dominant"])
    assert oracle.mean() > 3 * np.mean(ctr["random"])
    # The oracle covers more of the user's interests than either single-interest list.
    assert np.mean(clusters["oracle"]) > np.mean(clusters["mean_embedding"]) + 0.5
    assert np.mean(clusters["oracle"]) > np.mean(clusters["dominant"]) + 1.0


def test_oracle_is_greedy_best_at_every_step(population):
    """Swapping any position's item for any other catalogue item never raises the expected
    clicks of the prefix up to it (the greedy choice is the best marginal gain)."""
    user, k = 21, 4
    oracle = list(population.oracle_items(user, k, 0.0))
    candidates = [i for i in range(1, 1683, 7) if i not in oracle]
    for p in range(k):
        best = population.expected(user, oracle[: p + 1], 0.0).click.sum()
        for other in candidates:
            trial = [*oracle[:p], other]
            assert population.expected(user, trial, 0.0).click.sum() <= best + 1e-12


def test_consumed_diversity_by_hand(population):
    items = [1, 2, 50, 2]  # a repeat counts once
    rows = np.array([0, 1, 49])
    vectors = population.embeddings[rows]
    distances = [1 - vectors[i] @ vectors[j] for i, j in itertools.combinations(range(3), 2)]
    found = population.consumed_diversity(items)
    assert found.items == 3
    assert found.distinct_clusters == len(set(population.clusters.labels[rows].tolist()))
    assert found.intra_list_distance == pytest.approx(np.mean(distances), abs=1e-12)
    assert population.consumed_diversity([7]).intra_list_distance == 0.0
    assert population.consumed_diversity([]).items == 0


# -- drift -----------------------------------------------------------------------------------


def test_no_drift_keeps_the_mixture(catalogue):
    item_ids, embeddings = catalogue
    still = SimulatedPopulation(embeddings, item_ids, num_users=20, drift_per_hour=0.0, seed=1)
    for user in range(20):
        start = still.cluster_weights(user, 0.0)
        assert np.count_nonzero(start) == 3 and start.sum() == pytest.approx(1.0)
        for hours in (0.5, 10.0, 1000.0):
            np.testing.assert_array_equal(still.cluster_weights(user, hours * 3600), start)


@pytest.mark.parametrize("drift", [0.05, 0.5])
def test_drift_moves_the_mixture_at_the_configured_rate(catalogue, drift):
    item_ids, embeddings = catalogue
    moving = SimulatedPopulation(embeddings, item_ids, num_users=20, drift_per_hour=drift, seed=1)
    segment_s = 3600.0 / drift  # the mixture reaches a fresh draw after 1/drift hours
    for user in range(20):
        start, fresh = moving.cluster_weights(user, 0.0), moving.cluster_weights(user, segment_s)
        distance = np.abs(fresh - start).sum()
        assert distance > 0  # the fresh draw differs
        for share in (0.1, 0.25, 0.9):
            hours = share / drift
            now = moving.cluster_weights(user, hours * 3600)
            np.testing.assert_allclose(now, (1 - share) * start + share * fresh, atol=1e-12)
            # Total variation moved per hour, as a share of the way: exactly `drift`.
            assert np.abs(now - start).sum() / distance / hours == pytest.approx(drift)
        # Interest vectors follow: after a full segment, only the fresh draw's anchors remain.
        later = moving.interests(user, segment_s)
        assert len(later.anchors) == 3


# -- arrivals and clustering -----------------------------------------------------------------


def test_poisson_arrivals(catalogue):
    rng = np.random.default_rng(3)
    stream = poisson_arrivals(20.0, 50, rng)
    arrivals = [next(stream) for _ in range(20_000)]
    times = np.array([a.t_s for a in arrivals])
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert sps.kstest(gaps, "expon", args=(0, 1 / 20.0)).pvalue > 1e-3
    counts = np.bincount([a.user for a in arrivals], minlength=50)
    assert len(counts) == 50
    assert sps.chisquare(counts).pvalue > 1e-3
    with pytest.raises(ConfigError, match="rate_per_s > 0"):
        next(poisson_arrivals(0.0, 5, rng))


def test_spherical_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:4] * 5
    truth = np.repeat(np.arange(4), 30)
    points = centres[truth] + rng.normal(scale=0.3, size=(120, 8))
    found = spherical_kmeans(points, 4, seed=1)
    # One found label per true cluster, and each true cluster wholly in its own label.
    mapping = {t: set(found.labels[truth == t].tolist()) for t in range(4)}
    assert all(len(labels) == 1 for labels in mapping.values())
    assert len({next(iter(v)) for v in mapping.values()}) == 4
    np.testing.assert_allclose(np.linalg.norm(found.centroids, axis=1), 1.0)
    again = spherical_kmeans(points, 4, seed=1)
    np.testing.assert_array_equal(found.labels, again.labels)
    with pytest.raises(ConfigError, match=r"num_clusters must be in 1\.\.120"):
        spherical_kmeans(points, 121, seed=0)
