"""The controlled multi-interest generator keeps its promises, checked against closed forms.

Statistical checks use fixed seeds (so they are deterministic) and tolerances of about 4.5
standard deviations of the exact sampling law, or a scipy test at p > 1e-4.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats

from core.errors import ConfigError, DataError
from model import zoo
from model.data import training_batches
from model.synthetic_interests import (
    InterestWorld,
    InterestWorldConfig,
    generate_interest_world,
    next_item_probabilities,
)

FAST = {"codebook_levels": 1, "codebook_size": 8, "text_dim": 8}  # a cheap catalogue


def world(**fields: object) -> InterestWorld:
    return generate_interest_world(InterestWorldConfig(**{**FAST, **fields}))  # type: ignore[arg-type]


def slot_counts(w: InterestWorld) -> np.ndarray:
    """(U, K) how many of each user's items came from each interest."""
    k = w.config.interests
    return np.stack([np.bincount(s, minlength=k) for s in w.interest_slots])


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_every_user_visits_exactly_k_distinct_clusters(k: int) -> None:
    # 200 items at stay 0.5: a slot unused by one user has probability < 1e-7 even at K = 8.
    w = world(interests=k, num_users=60, num_clusters=12, items_per_cluster=200, length=200)
    for user in range(w.data.num_users):
        clusters = w.item_cluster[w.data.items[user]]
        assert len(set(w.user_clusters[user].tolist())) == k
        assert set(clusters.tolist()) == set(w.user_clusters[user].tolist())
        # the recorded latent slots name the cluster each item came from
        np.testing.assert_array_equal(clusters, w.user_clusters[user][w.interest_slots[user]])


def test_sequences_never_repeat_an_item_and_time_moves_forward() -> None:
    w = world(interests=2, num_users=50, num_clusters=4, items_per_cluster=30, length=30)
    for items, stamps in zip(w.data.items, w.data.timestamps_s, strict=True):
        assert len(np.unique(items)) == len(items) == 30
        assert np.all(np.diff(stamps) > 0)
    assert w.data.num_items == w.catalog.num_items == 120
    assert w.item_cluster[0] == -1 and (np.bincount(w.item_cluster[1:]) == 30).all()


def sticky_count_variance(weight: np.ndarray, stay: float, length: int) -> np.ndarray:
    """Var of an interest's count over ``length`` steps of the stationary sticky chain:
    Cov(1[z_t = k], 1[z_{t+s} = k]) = stay**s * w (1 - w)."""
    lags = np.arange(1, length)
    inflation = 1.0 + 2.0 * np.sum((1.0 - lags / length) * stay**lags)
    return length * weight * (1.0 - weight) * inflation


@pytest.mark.parametrize("concentration", [None, 1.0])
def test_each_interest_takes_its_share_of_the_sequence(concentration: float | None) -> None:
    length, stay = 50, 0.6
    w = world(
        interests=4,
        num_users=400,
        num_clusters=8,
        items_per_cluster=50,
        length=length,
        stay=stay,
        concentration=concentration,
    )
    np.testing.assert_allclose(w.user_weights.sum(axis=1), 1.0)
    if concentration is None:
        np.testing.assert_array_equal(w.user_weights, 0.25)
    observed = slot_counts(w).sum(axis=0)
    expected = length * w.user_weights.sum(axis=0)
    variance = sticky_count_variance(w.user_weights, stay, length).sum(axis=0)
    z = (observed - expected) / np.sqrt(variance)
    assert np.all(np.abs(z) < 4.5), z


@pytest.mark.parametrize(("k", "stay"), [(2, 0.0), (4, 0.5), (8, 0.9)])
def test_the_interest_switches_at_the_promised_rate(k: int, stay: float) -> None:
    # Equal shares: each step switches with probability (1 - stay)(1 - 1/K) whatever the past,
    # so the number of switches is exactly binomial.
    w = world(
        interests=k, num_users=200, num_clusters=8, items_per_cluster=40, length=40, stay=stay
    )
    switches = sum(int(np.count_nonzero(np.diff(s))) for s in w.interest_slots)
    trials = w.data.num_users * 39
    assert stats.binomtest(switches, trials, (1.0 - stay) * (1.0 - 1.0 / k)).pvalue > 1e-4


def test_first_draw_from_an_interest_follows_popularity_inside_its_cluster() -> None:
    per_cluster, exponent = 20, 1.0
    w = world(
        interests=4,
        num_users=500,
        num_clusters=8,
        items_per_cluster=per_cluster,
        length=20,
        popularity_exponent=exponent,
    )
    ranks = []
    for items, slots in zip(w.data.items, w.interest_slots, strict=True):
        _, first = np.unique(slots, return_index=True)
        ranks += list(np.rint(w.popularity[items[first]] ** (-1.0 / exponent) - 1.0).astype(int))
    zipf = (np.arange(per_cluster) + 1.0) ** -exponent
    expected = len(ranks) * zipf / zipf.sum()
    observed = np.bincount(ranks, minlength=per_cluster)
    assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_next_item_probabilities_match_a_hand_computation() -> None:
    w = world(interests=2, num_users=5, num_clusters=3, items_per_cluster=6, length=5, stay=0.3)
    user, position = 3, 3
    items = w.data.items[user]
    law = next_item_probabilities(w, user, position)
    clusters = list(w.user_clusters[user])
    last = clusters.index(w.item_cluster[items[position - 1]])
    for item in range(1, w.data.num_items + 1):
        cluster = w.item_cluster[item]
        if cluster not in clusters or item in items[:position]:
            assert law[item] == 0.0
            continue
        slot = clusters.index(cluster)
        slot_p = 0.7 * w.user_weights[user, slot] + (0.3 if slot == last else 0.0)
        mates = [
            j
            for j in range(1, w.data.num_items + 1)
            if w.item_cluster[j] == cluster and j not in items[:position]
        ]
        expected = slot_p * w.popularity[item] / sum(w.popularity[j] for j in mates)
        assert law[item] == pytest.approx(expected, rel=1e-12)
    assert law[0] == 0.0 and law.sum() == pytest.approx(1.0)
    first = next_item_probabilities(w, user, 0)
    for slot, cluster in enumerate(clusters):
        assert first[w.item_cluster == cluster].sum() == pytest.approx(w.user_weights[user, slot])


def test_next_item_law_predicts_how_often_the_interest_is_kept() -> None:
    """Sum over users of the law's mass on the last item's cluster = expected number of users
    whose next item stays in that cluster; the data must agree within 4.5 sd."""
    w = world(interests=4, num_users=400, num_clusters=8, items_per_cluster=30, length=30, stay=0.4)
    position, masses, kept = 20, [], 0
    for user in range(w.data.num_users):
        items = w.data.items[user]
        same = w.item_cluster == w.item_cluster[items[position - 1]]
        masses.append(next_item_probabilities(w, user, position)[same].sum())
        kept += int(same[items[position]])
    p = np.asarray(masses)
    assert abs(kept - p.sum()) < 4.5 * np.sqrt(np.sum(p * (1 - p)))


def test_the_same_config_gives_the_same_world_and_another_seed_another() -> None:
    config = InterestWorldConfig(interests=4, num_users=30, length=20, **FAST)  # type: ignore[arg-type]
    a, b = generate_interest_world(config), generate_interest_world(config)
    c = generate_interest_world(dataclasses.replace(config, seed=1))
    for x, y in zip(a.data.items, b.data.items, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.user_weights, b.user_weights)
    assert torch.equal(a.catalog.text_embeddings, b.catalog.text_embeddings)
    assert torch.equal(a.catalog.codes, b.catalog.codes)
    assert any(not np.array_equal(x, y) for x, y in zip(a.data.items, c.data.items, strict=True))


def test_catalog_groups_items_by_cluster_and_trains_models() -> None:
    w = world(interests=2, num_users=20, num_clusters=4, items_per_cluster=25, length=25)
    text = w.catalog.text_embeddings[1:].double()
    torch.testing.assert_close(text.norm(dim=1), torch.ones(100, dtype=torch.float64))
    same = torch.from_numpy(w.item_cluster[1:, None] == w.item_cluster[None, 1:])
    cosine = text @ text.T
    assert cosine[same].mean() > cosine[~same].mean() + 0.5
    assert w.catalog.codes.shape == (101, 1) and int(w.catalog.codes[0, 0]) == 8  # UNKNOWN
    assert w.catalog.genres[1] == frozenset({f"c{w.item_cluster[1]:02d}"})
    batch = next(training_batches(w.data, 30, 8, np.random.default_rng(0), target_window=5))
    torch.manual_seed(0)
    for model in (zoo.build("sasrec", w.catalog, max_len=30), zoo.build("hymirec", w.catalog)):
        assert torch.isfinite(model.loss(batch))
        assert model.score_all(batch).shape == (8, 101)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"interests": 0}, "interests"),
        ({"interests": 20, "num_clusters": 16}, "interests"),
        ({"num_users": True}, "num_users"),
        ({"length": 2}, "length"),
        ({"items_per_cluster": 10, "length": 20}, "items_per_cluster"),
        ({"stay": 1.0}, "stay"),
        ({"concentration": 0.0}, "concentration"),
        ({"popularity_exponent": -1.0}, "popularity_exponent"),
        ({"cluster_spread": float("nan")}, "cluster_spread"),
        ({"codebook_size": 1}, "codebook_size"),
    ],
)
def test_bad_config_names_the_field(fields: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=f"InterestWorldConfig.{named} "):
        InterestWorldConfig(**fields)  # type: ignore[arg-type]


def test_next_item_law_refuses_unknown_users_and_positions() -> None:
    w = world(interests=1, num_users=3, num_clusters=2, items_per_cluster=10, length=5)
    with pytest.raises(DataError, match="user must be in"):
        next_item_probabilities(w, 3, 0)
    with pytest.raises(DataError, match="position must be in"):
        next_item_probabilities(w, 0, 5)
