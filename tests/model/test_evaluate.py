"""The full-ranking evaluator against hand computations on a 3-user, 6-item case."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import DataError
from model.evaluate import (
    RankingAccumulator,
    masked_scores,
    ranking_metrics,
    target_ranks,
    top_items,
)

NEG = float("-inf")
# Items 1..6; column 0 is padding. Genre sets: 1 {A}, 2 {A}, 3 {A,B}, 4 {B}, 5 {B}, 6 {C}.
GENRES = [
    frozenset(),
    frozenset({"A"}),
    frozenset({"A"}),
    frozenset({"A", "B"}),
    frozenset({"B"}),
    frozenset({"B"}),
    frozenset({"C"}),
]
SCORES = torch.tensor(
    [
        [0.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # user 0: seen {1}; order 2,3,4,5,6 -> target 3 at 1
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # user 1: seen {6}; order 5,4,3,2,1 -> target 1 at 4
        [0.0, 0.5, 0.5, 0.5, 0.1, 0.1, 0.9],  # user 2: nothing seen; ties: 6,1,2,3,4,5 -> 3 at 3
    ]
)
TARGETS = torch.tensor([3, 1, 3])
SEEN = torch.zeros(3, 7, dtype=torch.bool)
SEEN[0, 1] = True
SEEN[1, 6] = True


def test_ranks_by_hand_with_masking_and_ties() -> None:
    ranks, valid = target_ranks(masked_scores(SCORES, SEEN), TARGETS)
    assert ranks.tolist() == [1, 4, 3]
    assert valid.tolist() == [True, True, True]
    # Without masking, user 0's seen item 1 (score 0.9) sits above the target.
    unmasked, _ = target_ranks(masked_scores(SCORES, None), TARGETS)
    assert unmasked.tolist() == [2, 5, 3]


def test_accuracy_metrics_by_hand() -> None:
    metrics = ranking_metrics(SCORES, TARGETS, GENRES, SEEN, ks=(2, 4), ns=(1, 3))
    # ranks 1, 4, 3: @2 only user 0 hits; @4 users 0 and 2 hit.
    assert metrics["hr@2"] == pytest.approx(1 / 3)
    assert metrics["hr@4"] == pytest.approx(2 / 3)
    assert metrics["recall@2"] == metrics["hr@2"]  # one target per user: Recall@K == HR@K
    assert metrics["recall@4"] == metrics["hr@4"]
    assert metrics["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 3)
    assert metrics["ndcg@4"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 3)


def test_diversity_and_coverage_by_hand() -> None:
    metrics = ranking_metrics(SCORES, TARGETS, GENRES, SEEN, ks=(2,), ns=(1, 3))
    # Top-3: user 0 -> 2,3,4 ({A},{A,B},{B}): 3 of 3 pairs differ.
    #        user 1 -> 5,4,3 ({B},{B},{A,B}): 2 of 3 differ ({B} vs {B} is the same set).
    #        user 2 -> 6,1,2 ({C},{A},{A}):   2 of 3 differ.
    assert metrics["diversity@3"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert metrics["diversity@1"] == 0.0  # a one-item list has no pairs
    # Top-1 items: 2, 5, 6 -> 3 of 6 catalogue items; the top-3 lists cover all six.
    assert metrics["coverage@1"] == pytest.approx(3 / 6)
    assert metrics["coverage@3"] == pytest.approx(6 / 6)


def test_padding_column_never_ranked_and_masked_target_is_a_miss() -> None:
    scores = torch.tensor([[100.0, 0.1, 0.2, 0.3]])  # a huge pad score must not count
    seen = torch.tensor([[False, False, True, False]])
    genres = [frozenset(), frozenset({"A"}), frozenset({"B"}), frozenset({"C"})]
    metrics = ranking_metrics(scores, torch.tensor([2]), genres, seen, ks=(3,), ns=(3,))
    assert metrics["hr@3"] == 0.0  # the target was in the history: masked, a miss
    # The top-3 holds only the two unseen items (3, then 1): masked items are never listed.
    assert metrics["coverage@3"] == pytest.approx(2 / 3)
    assert metrics["diversity@3"] == 1.0  # {C} vs {A}
    ranks, valid = target_ranks(masked_scores(scores, None), torch.tensor([1]))
    assert ranks.tolist() == [2] and valid.tolist() == [True]


def test_batches_merge_to_the_single_pass() -> None:
    whole = ranking_metrics(SCORES, TARGETS, GENRES, SEEN, ks=(2, 4), ns=(1, 3))
    parts = RankingAccumulator(GENRES, ks=(2, 4), ns=(1, 3))
    parts.add(SCORES[:1], TARGETS[:1], SEEN[:1])
    parts.add(SCORES[1:], TARGETS[1:], SEEN[1:])
    assert parts.result() == pytest.approx(whole)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(DataError, match=r"scores must be \(B, 7\)"):
        ranking_metrics(SCORES[:, :5], TARGETS, GENRES)
    with pytest.raises(DataError, match="no users"):
        RankingAccumulator(GENRES).result()


@settings(max_examples=60, deadline=None)
@given(
    users=st.integers(1, 5),
    items=st.integers(2, 12),
    levels=st.integers(1, 4),  # few distinct score values: many ties
    seed=st.integers(0, 10_000),
)
def test_ranks_match_a_stable_sort_reference(
    users: int, items: int, levels: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (users, items + 1), generator=gen).float()
    seen = torch.rand(users, items + 1, generator=gen) < 0.3
    targets = torch.randint(1, items + 1, (users,), generator=gen)
    ranks, valid = target_ranks(masked_scores(scores, seen), targets)
    for u in range(users):
        # Reference: a Python stable sort of the unmasked items, best first, ties by index.
        pool = [i for i in range(1, items + 1) if not seen[u, i]]
        order = sorted(pool, key=lambda i: -float(scores[u, i]))
        t = int(targets[u])
        assert bool(valid[u]) == (t in pool)
        if t in pool:
            assert int(ranks[u]) == order.index(t)


def loop_reference(
    scores: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor, genres: list, k: int, n: int
) -> dict[str, float]:
    """Every metric with Python lists and loops, straight from the definitions."""
    hits = gains = diversity = 0.0
    covered: set[int] = set()
    for u in range(scores.shape[0]):
        pool = [i for i in range(1, scores.shape[1]) if not seen[u, i]]
        order = sorted(pool, key=lambda i: -float(scores[u, i]))
        t = int(targets[u])
        if t in order[:k]:
            hits += 1
            gains += 1 / math.log2(order.index(t) + 2)
        top = order[:n]
        covered.update(top)
        pairs = [(a, b) for x, a in enumerate(top) for b in top[x + 1 :]]
        if pairs:
            diversity += sum(genres[a] != genres[b] for a, b in pairs) / len(pairs)
    users = scores.shape[0]
    return {
        f"hr@{k}": hits / users,
        f"recall@{k}": hits / users,
        f"ndcg@{k}": gains / users,
        f"diversity@{n}": diversity / users,
        f"coverage@{n}": len(covered) / (scores.shape[1] - 1),
    }


@settings(max_examples=60, deadline=None)
@given(
    users=st.integers(1, 5),
    items=st.integers(2, 10),
    k=st.integers(1, 6),
    n=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_vectorised_metrics_match_the_loop_reference(
    users: int, items: int, k: int, n: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (users, items + 1), generator=gen).float()
    seen = torch.rand(users, items + 1, generator=gen) < 0.3
    targets = torch.randint(1, items + 1, (users,), generator=gen)
    labels = ["A", "B", "C"]
    genres = [frozenset()] + [
        frozenset(labels[j] for j in range(3) if torch.rand(1, generator=gen) < 0.5)
        for _ in range(items)
    ]
    got = ranking_metrics(scores, targets, genres, seen, ks=(k,), ns=(n,))
    assert got == pytest.approx(loop_reference(scores, targets, seen, genres, k, n))


@settings(max_examples=150, deadline=None)
@given(
    users=st.integers(1, 6),
    items=st.integers(1, 30),
    n=st.integers(1, 35),
    levels=st.integers(1, 4),  # few distinct values: ties at the cut-off are the common case
    masked_share=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_top_items_match_a_stable_sort(
    users: int, items: int, n: int, levels: int, masked_share: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (users, items + 1), generator=gen).float()
    seen = torch.rand(users, items + 1, generator=gen) < masked_share
    masked = masked_scores(scores, seen)  # -inf ties too, and column 0
    n = min(n, items + 1)
    expected = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :n]
    assert torch.equal(top_items(masked, n), expected)


def test_top_items_with_nan_fall_back_to_the_sort() -> None:
    masked = torch.tensor([[float("-inf"), 0.5, float("nan"), 0.5, 0.9]])
    expected = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :2]
    assert torch.equal(top_items(masked, 2), expected)
