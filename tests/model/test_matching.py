"""Target-to-interest assignment: Hungarian matching of target groups, and ComiRec's argmax."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from model.matching import (
    argmax_assignment,
    assign_targets,
    diversity_penalty,
    group_targets,
    hungarian_assignment,
    match_groups,
    multi_interest_loss,
)


def brute_force_best(sims: np.ndarray) -> float:
    """Largest total similarity over every injective map groups -> interests."""
    k, g = sims.shape
    return max(
        sum(sims[interest, group] for group, interest in enumerate(chosen))
        for chosen in itertools.permutations(range(k), g)
    )


def test_match_groups_on_a_hand_made_matrix() -> None:
    # Greedy (group 0 takes its best interest 0) gives 9 + 1 = 10; the optimum is 8 + 7 = 15.
    sims = np.array([[9.0, 8.0], [7.0, 1.0], [0.0, 0.0]])
    assert match_groups(sims).tolist() == [1, 0]
    assert brute_force_best(sims) == 15.0


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda k: st.integers(1, k).flatmap(
            lambda g: arrays(np.float64, (k, g), elements=st.floats(-10, 10, width=32))
        )
    )
)
def test_match_groups_is_optimal_like_brute_force(sims: np.ndarray) -> None:
    chosen = match_groups(sims)
    assert len(set(chosen.tolist())) == sims.shape[1]  # one interest per group, all distinct
    total = sims[chosen, np.arange(sims.shape[1])].sum()
    assert total == pytest.approx(brute_force_best(sims), abs=1e-6)


def test_match_groups_rejects_more_groups_than_interests() -> None:
    with pytest.raises(ValueError, match="G <= K"):
        match_groups(np.zeros((2, 3)))


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_grouping_recovers_clear_clusters_and_marks_missing_targets() -> None:
    targets = unit([1, 0.1, 0], [0, 1, 0], [1, 0, 0.1], [0, 1, 0.1], [5, 5, 5])[None]
    valid = torch.tensor([[True, True, True, True, False]])
    grouping = group_targets(targets, valid, max_groups=2)
    labels = grouping.labels[0].tolist()
    assert labels[4] == -1
    assert labels[0] == labels[2] != labels[1] == labels[3]
    assert grouping.present[0].tolist() == [True, True]


def test_grouping_never_splits_duplicates_and_uses_at_most_the_distinct_targets() -> None:
    targets = unit([1, 0], [1, 0], [1, 0], [0, 1])[None]
    grouping = group_targets(targets, torch.ones(1, 4, dtype=torch.bool), max_groups=3)
    assert grouping.present[0].tolist() == [True, True, False]
    labels = grouping.labels[0].tolist()
    assert labels[0] == labels[1] == labels[2] != labels[3]


def test_hungarian_matches_groups_not_targets_one_by_one() -> None:
    # Targets: two near e0 (group A), one on e1 (group B). Argmax sends all three to interest 0.
    # Scores (sum of member similarities): interest 0 -> A 1.0, B 0.9; interest 1 -> A 0.8,
    # B -1.0. Giving A its best interest (0) totals 1.0 - 1.0 = 0; the optimum gives B to
    # interest 0 and A to interest 1: 0.9 + 0.8 = 1.7.
    interests = torch.tensor([[[0.5, 0.9], [0.4, -1.0]]])
    targets = unit([1, 0.01], [1, -0.01], [0, 1])[None]
    valid = torch.ones(1, 3, dtype=torch.bool)
    assert argmax_assignment(interests, targets, valid).tolist() == [[0, 0, 0]]
    assert hungarian_assignment(interests, targets, valid).tolist() == [[1, 1, 0]]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_hungarian_gives_each_group_its_own_interest(batch: int, k: int, w: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    interests = torch.randn(batch, k, 3, generator=gen)
    # few distinct directions, so duplicates and users with fewer targets than interests occur
    targets = torch.randn(4, 3, generator=gen)[torch.randint(0, 4, (batch, w), generator=gen)]
    valid = torch.rand(batch, w, generator=gen) < 0.7
    grouping = group_targets(targets, valid, k)
    out = hungarian_assignment(interests, targets, valid)
    assert out[~valid].eq(-1).all() and grouping.labels[~valid].eq(-1).all()
    for user in range(batch):
        labels, chosen = grouping.labels[user][valid[user]], out[user][valid[user]]
        assert grouping.present[user, labels].all()  # every valid target is in a present group
        assert int(grouping.present[user].sum()) <= min(k, int(valid[user].sum()))
        pairs = set(zip(labels.tolist(), chosen.tolist(), strict=True))
        assert len(pairs) == len({g for g, _ in pairs}) == len({i for _, i in pairs})


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_argmax_assignment_matches_a_loop(batch: int, k: int, w: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    interests = torch.randn(batch, k, 5, generator=gen)
    targets = torch.randn(batch, w, 5, generator=gen)
    valid = torch.rand(batch, w, generator=gen) < 0.7
    out = argmax_assignment(interests, targets, valid)
    for b in range(batch):
        for t in range(w):
            if not valid[b, t]:
                assert out[b, t] == -1
                continue
            scores = [float(interests[b, j] @ targets[b, t]) for j in range(k)]
            assert out[b, t] == int(np.argmax(scores))


def test_assign_targets_rejects_an_unknown_rule() -> None:
    with pytest.raises(ValueError, match="hungarian"):
        assign_targets(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1).bool(), "x")  # type: ignore[arg-type]


def test_multi_interest_loss_equals_a_per_target_softmax() -> None:
    gen = torch.Generator().manual_seed(0)
    interests = torch.randn(2, 3, 4, generator=gen)
    items = torch.randn(6, 4, generator=gen)
    targets = torch.tensor([[1, 5, 0], [2, 0, 0]])
    assignment = torch.tensor([[2, 0, -1], [1, -1, -1]])
    expected = []
    for b, t in [(0, 0), (0, 1), (1, 0)]:
        logits = items[1:] @ interests[b, assignment[b, t]] / 0.5  # padding row 0 excluded
        expected.append(-torch.log_softmax(logits, dim=0)[targets[b, t] - 1])
    got = multi_interest_loss(interests, items, targets, assignment, temperature=0.5)
    assert got.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_multi_interest_loss_without_targets_is_a_differentiable_zero() -> None:
    interests = torch.randn(1, 2, 3, requires_grad=True)
    loss = multi_interest_loss(
        interests, torch.randn(4, 3), torch.zeros(1, 2).long(), torch.full((1, 2), -1), 0.1
    )
    loss.backward()
    assert loss.item() == 0.0


def test_diversity_penalty_is_zero_for_orthogonal_and_one_for_equal_interests() -> None:
    assert diversity_penalty(torch.eye(3)[None]).item() == pytest.approx(0.0)
    assert diversity_penalty(torch.ones(1, 3, 4)).item() == pytest.approx(1.0)


def test_assignment_under_bfloat16_autocast_is_computed_in_float32() -> None:
    # The harness trains under bf16 autocast on CUDA; scipy cannot take bf16 arrays.
    gen = torch.Generator().manual_seed(1)
    interests = torch.randn(3, 2, 8, generator=gen)
    targets = torch.randn(3, 4, 8, generator=gen)
    valid = torch.ones(3, 4, dtype=torch.bool)
    with torch.autocast("cpu", torch.bfloat16):
        got = assign_targets(interests.bfloat16(), targets, valid, "hungarian")
    expected = assign_targets(interests.bfloat16().float(), targets, valid, "hungarian")
    assert got.tolist() == expected.tolist()
