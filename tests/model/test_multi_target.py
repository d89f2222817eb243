"""The multi-target hold-out and the tie-free users, against hand computations and plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.errors import DataError
from model.data import SequenceData
from model.multi_target import (
    MultiTargetAccumulator,
    evaluate_multi_target,
    holdout_data,
    target_sets,
    tie_free_users,
)
from model.popularity import PopularityRecommender, build_model
from model.training.offline import evaluate_model
from tests.model.offline_fixtures import cyclic_data, tiny_catalog


def popular(num_items: int, counts: torch.Tensor) -> PopularityRecommender:
    model = build_model(tiny_catalog(num_items))
    model.fit(counts)
    return model


def sequences(lengths: list[int], stamps: list[list[int]] | None = None) -> SequenceData:
    """User u rates items 1..lengths[u] (item i at time 100 * i unless ``stamps`` say)."""
    items = tuple(np.arange(1, n + 1, dtype=np.int64) for n in lengths)
    times = tuple(
        np.asarray(stamps[u] if stamps else 100 * items[u], dtype=np.int64)
        for u in range(len(lengths))
    )
    return SequenceData(
        np.arange(len(lengths), dtype=np.int64) + 10, np.arange(40, dtype=np.int64), items, times
    )


def test_metrics_of_one_user_by_hand() -> None:
    # items 1..8; scores put items 8, 7, ..., 1 in that order; item 7 is in the history (masked)
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 8]])
    seen = torch.zeros(1, 9, dtype=torch.bool)
    seen[0, 7] = True
    targets = torch.tensor([[8, 5, 1]])
    clusters = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])  # item -> cluster
    acc = MultiTargetAccumulator(clusters, ks=(2, 3))
    acc.add(scores, targets, seen)
    out = acc.result()
    # ranking: 8, 6, 5, 4, ... (7 masked); targets at 0-based ranks 0 (8), 2 (5), 6 (1)
    assert out["recall@2"] == pytest.approx(1 / 3) and out["recall@3"] == pytest.approx(2 / 3)
    ideal3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert out["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / ideal3)
    assert out["ndcg@2"] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert out["hr@2"] == 1.0
    # target clusters {3, 2, 0}; top 2 = items 8, 6 -> clusters {3, 2}; top 3 adds item 5 (2)
    assert out["interest_coverage@2"] == pytest.approx(2 / 3)
    assert out["interest_coverage@3"] == pytest.approx(2 / 3)


def loop_reference(
    scores: np.ndarray, targets: list[set[int]], seen: list[set[int]], clusters: np.ndarray, k: int
) -> dict[str, float]:
    """Plain Python: a stable descending sort per user, masked items skipped."""
    recall, ndcg, hr, cover = [], [], [], []
    for row, wanted in enumerate(targets):
        order = [
            int(i) for i in np.argsort(-scores[row], kind="stable") if i and i not in seen[row]
        ]
        top = order[:k]
        hits = [r for r, item in enumerate(top) if item in wanted]
        recall.append(len(hits) / len(wanted))
        ideal = sum(1 / math.log2(r + 2) for r in range(min(len(wanted), k)))
        ndcg.append(sum(1 / math.log2(r + 2) for r in hits) / ideal)
        hr.append(float(bool(hits)))
        want = {int(clusters[i]) for i in wanted}
        cover.append(len(want & {int(clusters[i]) for i in top}) / len(want))
    return {
        f"recall@{k}": float(np.mean(recall)),
        f"ndcg@{k}": float(np.mean(ndcg)),
        f"hr@{k}": float(np.mean(hr)),
        f"interest_coverage@{k}": float(np.mean(cover)),
    }


@pytest.mark.parametrize("seed", range(5))
def test_accumulator_equals_a_loop_with_ties_and_masks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    users, items, k = 6, 30, 7
    scores = rng.integers(0, 5, size=(users, items + 1)).astype(np.float64)  # many ties
    clusters = rng.integers(0, 4, size=items + 1)
    targets = [
        set(rng.choice(np.arange(1, items + 1), size=4, replace=False).tolist())
        for _ in range(users)
    ]
    seen = [
        set(rng.choice(np.arange(1, items + 1), size=5, replace=False).tolist()) - t
        for t in targets
    ]
    seen_mask = torch.zeros(users, items + 1, dtype=torch.bool)
    for row, items_seen in enumerate(seen):
        seen_mask[row, list(items_seen)] = True
    acc = MultiTargetAccumulator(torch.from_numpy(clusters), ks=(k,))
    acc.add(torch.from_numpy(scores), torch.tensor([sorted(t) for t in targets]), seen_mask)
    expected = loop_reference(scores, targets, seen, clusters, k)
    assert acc.result() == pytest.approx(expected)


def test_holdout_keeps_the_set_out_of_training_and_validation() -> None:
    data = sequences([15, 13, 12])  # the third user is too short for a 10-item set
    held = holdout_data(data, 10)
    assert held.user_ids.tolist() == [10, 11]
    assert [len(i) for i in held.items] == [6, 4]
    # trains on items before the last 11, validates on the 11th from last, tests on the 10th
    assert held.training_part(0)[0].tolist() == [1, 2, 3, 4]
    assert held.items[0][-2] == data.items[0][-11] and held.items[0][-1] == data.items[0][-10]
    assert target_sets(data, np.array([0]), 10)[0].tolist() == list(range(6, 16))
    with pytest.raises(DataError, match="13 items"):
        holdout_data(sequences([12]), 10)


def test_evaluate_multi_target_scores_history_before_the_set() -> None:
    data = cyclic_data(num_users=8, num_items=20, length=16, seed=1)
    counts = torch.zeros(data.num_items + 1)
    counts[1:] = torch.arange(data.num_items, 0, -1).float()  # item 1 most popular
    model = popular(data.num_items, counts)
    clusters = torch.arange(data.num_items + 1) % 3
    out = evaluate_multi_target(model, data, clusters, max_len=50, num_targets=5)
    scores = np.tile(counts.numpy(), (data.num_users, 1))
    targets = [set(items[-5:].tolist()) for items in data.items]
    seen = [set(items[:-5].tolist()) for items in data.items]
    for k in (10, 50):
        for name, value in loop_reference(scores, targets, seen, clusters.numpy(), k).items():
            assert out[name] == pytest.approx(value), name


def test_tie_free_users_and_evaluating_only_them() -> None:
    stamps = [[1, 2, 3, 4], [1, 2, 3, 3], [5, 6, 6, 7], [1, 1, 1, 1]]
    data = sequences([4, 4, 4, 4], stamps)
    assert tie_free_users(data).tolist() == [True, False, True, False]
    cyclic = cyclic_data(num_users=9, num_items=12, length=10, seed=2)
    model = popular(cyclic.num_items, torch.from_numpy(cyclic.training_item_counts()).float())
    chosen = np.array([u % 3 == 0 for u in range(cyclic.num_users)])
    subset = SequenceData(
        cyclic.user_ids[chosen],
        cyclic.item_ids,
        tuple(i for i, c in zip(cyclic.items, chosen, strict=True) if c),
        tuple(t for t, c in zip(cyclic.timestamps_s, chosen, strict=True) if c),
    )
    genres = [frozenset({"a"})] * (cyclic.num_items + 1)
    on_mask = evaluate_model(model, cyclic, genres, "test", 20, users=chosen)
    on_subset = evaluate_model(model, subset, genres, "test", 20)
    assert on_mask == pytest.approx(on_subset)
