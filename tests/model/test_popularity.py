"""The most-popular baseline: scores are training counts, ranks follow them (ties by index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.data import SequenceData, evaluation_batches
from model.evaluate import masked_scores, ranking_metrics, target_ranks
from model.popularity import PopularityRecommender, build_model
from tests.model.offline_fixtures import tiny_catalog

# Five items, three users (each item at most once per user).
SEQUENCES = [[1, 2, 3, 4, 5], [2, 3, 5, 1], [3, 2, 4, 1]]
# Training parts: [1, 2, 3], [2, 3], [3, 2] -> counts: item1 1, item2 3, item3 3, item4 0, item5 0.
COUNTS = [0, 1, 3, 3, 0, 0]


def data() -> SequenceData:
    return SequenceData(
        np.arange(3, dtype=np.int64),
        np.arange(1, 6, dtype=np.int64),
        tuple(np.asarray(s, dtype=np.int64) for s in SEQUENCES),
        tuple(np.arange(len(s), dtype=np.int64) for s in SEQUENCES),
    )


def fitted() -> PopularityRecommender:
    model = build_model(tiny_catalog(5))
    model.fit(torch.from_numpy(data().training_item_counts()).float())
    return model


def test_counts_by_hand() -> None:
    assert data().training_item_counts().tolist() == COUNTS


def test_scores_are_counts_for_every_user() -> None:
    chunk = next(evaluation_batches(data(), "test", max_len=10, batch_size=8))
    scores = fitted().score_all(chunk.batch)
    assert scores[:, 0].tolist() == [float("-inf")] * 3
    assert torch.equal(scores[:, 1:], torch.tensor(COUNTS[1:]).float().expand(3, 5))


def test_ranks_by_hand() -> None:
    chunk = next(evaluation_batches(data(), "test", max_len=10, batch_size=8))
    scores = fitted().score_all(chunk.batch)
    ranks, valid = target_ranks(masked_scores(scores, chunk.seen), chunk.target)
    # Order by count, ties by index: 2 (3), 3 (3), 1 (1), 4 (0), 5 (0).
    # user 0: target 5, seen {1,2,3,4} -> only 5 left: rank 0.
    # user 1: target 1, seen {2,3,5}  -> 1, 4: rank 0.
    # user 2: target 1, seen {3,2,4}  -> 1, 5: rank 0.
    assert ranks.tolist() == [0, 0, 0] and bool(valid.all())
    valid_chunk = next(evaluation_batches(data(), "valid", max_len=10, batch_size=8))
    scores = fitted().score_all(valid_chunk.batch)
    ranks, _ = target_ranks(masked_scores(scores, valid_chunk.seen), valid_chunk.target)
    # user 0: target 4, seen {1,2,3} -> 4, 5 (both 0; 4 first): rank 0.
    # user 1: target 5, seen {2,3}   -> 1, 4, 5: rank 2.
    # user 2: target 4, seen {3,2}   -> 1, 4, 5: rank 1.
    by_user = dict(zip(valid_chunk.batch.user_index.tolist(), ranks.tolist(), strict=True))
    assert by_user == {0: 0, 1: 2, 2: 1}
    genres = tiny_catalog(5).genres
    metrics = ranking_metrics(scores, valid_chunk.target, genres, valid_chunk.seen, ks=(1, 2))
    assert metrics["hr@1"] == pytest.approx(1 / 3)
    assert metrics["hr@2"] == pytest.approx(2 / 3)
