"""Sequences, the leave-one-out split and the batches, checked exactly on a hand-made frame."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import DataError
from model.data import SequenceData, evaluation_batches, training_batches
from tests.model.offline_fixtures import cyclic_data

CATALOGUE = np.array([100, 200, 300, 400], dtype=np.int64)  # indices 1, 2, 3, 4
FRAME = pd.DataFrame(
    {
        "user_id": [10, 5, 10, 20, 5, 10, 5, 10, 20],
        "item_id": [100, 300, 200, 100, 400, 300, 100, 400, 200],
        # user 5: item 400 and 100 share 7 s; file order (400 first) must survive.
        "ts_ms": [1000, 6000, 2000, 1500, 7000, 3000, 7000, 4000, 2500],
    }
)


@pytest.fixture
def data() -> SequenceData:
    return SequenceData.from_ratings(FRAME, CATALOGUE)


def test_sequences_in_replay_order_and_short_users_dropped(data: SequenceData) -> None:
    assert data.user_ids.tolist() == [5, 10]  # user 20 has 2 interactions: dropped
    assert [s.tolist() for s in data.items] == [[3, 4, 1], [1, 2, 3, 4]]
    assert [s.tolist() for s in data.timestamps_s] == [[6, 7, 7], [1, 2, 3, 4]]
    assert data.num_items == 4


def test_leave_one_out_split_exact(data: SequenceData) -> None:
    assert data.training_part(0)[0].tolist() == [3]
    assert data.training_part(1)[0].tolist() == [1, 2]
    assert data.training_item_counts().tolist() == [0, 1, 1, 1, 0]
    valid = next(evaluation_batches(data, "valid", max_len=10, batch_size=8))
    assert valid.batch.history.tolist() == [[0, 3], [1, 2]]
    assert valid.batch.history_ts.tolist() == [[0, 6], [1, 2]]
    assert valid.target.tolist() == [4, 3]
    assert valid.batch.target_ts.tolist() == [[7], [3]]
    test = next(evaluation_batches(data, "test", max_len=10, batch_size=8))
    assert test.batch.history.tolist() == [[0, 3, 4], [1, 2, 3]]  # test history has the valid item
    assert test.target.tolist() == [1, 4]


def test_evaluation_masks_the_whole_history_not_only_the_window(data: SequenceData) -> None:
    test = next(evaluation_batches(data, "test", max_len=1, batch_size=8))
    assert test.batch.history.tolist() == [[4], [3]]
    assert test.seen.tolist() == [
        [False, False, False, True, True],
        [False, True, True, True, False],
    ]


def test_last_cut_gives_the_longest_history_and_pads_targets(data: SequenceData) -> None:
    rng = np.random.default_rng(0)
    batches = list(training_batches(data, 10, 8, rng, target_window=3, cut="last"))
    assert len(batches) == 1  # user 5 has one training item: no sample
    batch = batches[0]
    assert batch.user_index.tolist() == [1]
    assert batch.history.tolist() == [[1]]
    assert batch.targets.tolist() == [[2, 0, 0]]
    assert batch.target_ts.tolist() == [[2, 0, 0]]


@settings(max_examples=40, deadline=None)
@given(
    max_len=st.integers(1, 12),
    window=st.integers(1, 4),
    per_user=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_uniform_cuts_are_contiguous_distinct_and_counted(
    max_len: int, window: int, per_user: int, seed: int
) -> None:
    data = cyclic_data(num_users=6, num_items=9, length=8, seed=seed)  # training parts: 6 items
    rng = np.random.default_rng(seed)
    cuts: dict[int, list[int]] = {}
    for batch in training_batches(data, max_len, 4, rng, window, "uniform", per_user):
        for row in range(batch.history.shape[0]):
            user = int(batch.user_index[row])
            part = data.training_part(user)[0].tolist()
            history = [i for i in batch.history[row].tolist() if i]
            targets = [i for i in batch.targets[row].tolist() if i]
            # history + targets is one contiguous run of the training part (items never repeat
            # within a cyclic user's 8 items), and the history ends at the cut.
            joined = history + targets
            starts = [s for s in range(len(part)) if part[s : s + len(joined)] == joined]
            assert starts, (part, history, targets)
            cut = starts[0] + len(history)
            assert 1 <= cut <= len(part) - 1
            assert len(history) == min(cut, max_len)
            assert len(targets) == min(window, len(part) - cut)
            cuts.setdefault(user, []).append(cut)
    assert sorted(cuts) == list(range(6))
    for user_cuts in cuts.values():
        assert len(user_cuts) == min(per_user, 5) == len(set(user_cuts))


def test_bad_arguments_are_named(data: SequenceData) -> None:
    with pytest.raises(DataError, match="split must be"):
        next(evaluation_batches(data, "train", 10, 8))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="not in the catalogue"):
        SequenceData.from_ratings(FRAME, np.array([100, 200], dtype=np.int64))
    with pytest.raises(DataError, match="lacks columns"):
        SequenceData.from_ratings(FRAME.drop(columns="ts_ms"), CATALOGUE)


def test_movielens_sequences_load() -> None:
    from model.data import load_movielens_sequences

    data = load_movielens_sequences()
    assert (data.num_users, data.num_items) == (943, 1682)
    assert sum(len(s) for s in data.items) == 100_000
    assert all(np.all(np.diff(t) >= 0) for t in data.timestamps_s)
    first = next(evaluation_batches(data, "test", max_len=1000, batch_size=943))
    users = first.batch.user_index.tolist()
    assert sorted(users) == list(range(943))
    assert first.seen.sum(dim=1).tolist() == [len(data.items[u]) - 1 for u in users]
    lengths = (first.batch.history > 0).sum(dim=1)
    assert torch.all(lengths[1:] >= lengths[:-1])  # batched by history length


def test_catalog_rows_follow_item_indices_and_reuse_a_cached_codebook(tmp_path) -> None:
    from core.settings import Settings
    from model.data import build_catalog
    from tests.conftest import EMBEDDING_CACHE

    settings = Settings(
        data_dir=tmp_path, cache_dir=EMBEDDING_CACHE, codebook_levels=2, codebook_size=8
    )
    catalog = build_catalog(settings)
    assert catalog.num_items == 1682
    assert catalog.text_embeddings.shape == (1683, 384)
    assert float(catalog.text_embeddings[0].abs().sum()) == 0.0
    assert torch.allclose(catalog.text_embeddings[1:].norm(dim=1), torch.ones(1682), atol=1e-5)
    assert catalog.codes.shape == (1683, 2) and catalog.codes[0].tolist() == [8, 8]  # UNKNOWN
    assert int(catalog.codes[1:].max()) < 8
    assert catalog.codebook_centroids.shape == (2, 8, 384)
    assert catalog.genres[0] == frozenset()
    assert catalog.genres[1] == frozenset({"Animation", "Children's", "Comedy"})  # Toy Story
    # The fitted codebook was saved, and a second build reuses it instead of refitting.
    saved = (settings.codebook_dir / "codebook.npz").stat().st_mtime_ns
    again = build_catalog(settings)
    assert (settings.codebook_dir / "codebook.npz").stat().st_mtime_ns == saved
    assert torch.equal(again.codes, catalog.codes)
