"""The ranking's fast paths against their references, with no server: ``top_k`` against a stable
sort of every score, cached interests and HyMiRec's projected code table against the model's own
computation each time."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import zoo
from model.hymirec_model import HyMiRec
from serving.features import UserHistory
from serving.models import InterestCache, LoadedModel, encode_long, top_k
from tests.model.offline_fixtures import tiny_catalog

NUM_ITEMS = 60
LEVELS = 2
UNKNOWN = 8  # tiny_catalog's codebook size


def reference_top_k(scores: torch.Tensor, k: int) -> list[int]:
    """What serving did before ``top_k``: a stable descending sort of every score."""
    order = torch.argsort(scores, descending=True, stable=True)
    count = min(k, int(torch.isfinite(scores).sum()))
    return [int(i) for i in order[:count]]


# Few distinct values, so that ties (also at the k-th place) and -inf are common.
_SCORES = st.lists(
    st.sampled_from([-np.inf, -1.5, -0.25, 0.0, 0.1, 0.1000001, 0.7, 3.0]), min_size=1, max_size=80
)


@settings(max_examples=300, deadline=None)
@given(values=_SCORES, k=st.integers(1, 90))
def test_top_k_is_the_head_of_a_stable_sort_of_every_score(values: list[float], k: int) -> None:
    scores = torch.tensor(values, dtype=torch.float32)
    assert top_k(scores, k) == reference_top_k(scores, k)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1, 10, 200]))
def test_top_k_on_continuous_scores(seed: int, k: int) -> None:
    scores = torch.from_numpy(np.random.default_rng(seed).normal(size=1683).astype(np.float32))
    scores[0] = -torch.inf
    assert top_k(scores, k) == reference_top_k(scores, k)


def test_the_interest_cache_keeps_one_entry_per_user_and_drops_the_least_recent() -> None:
    cache = InterestCache(max_users=2)
    a, b, c = (torch.full((1, 2), float(v)) for v in (1, 2, 3))
    cache.put(1, b"x", a)
    cache.put(2, b"y", b)
    assert cache.get(1, b"x") is a  # 1 is now the most recent
    assert cache.get(1, b"z") is None  # another history
    cache.put(3, b"w", c)  # drops 2, the least recently used
    assert cache.get(2, b"y") is None and cache.get(3, b"w") is c
    cache.put(1, b"x2", c)  # a changed history replaces the user's entry
    assert len(cache) == 2 and cache.get(1, b"x") is None
    assert (cache.hits, cache.misses) == (2, 3)


def history(user: int, items: np.ndarray, codes: np.ndarray, recent_len: int) -> UserHistory:
    """A history as ``serving.features`` decodes it; the key a digest of the ids and codes."""
    recent = items[-recent_len:]
    key = hashlib.blake2b(recent.tobytes() + b"|" + codes.tobytes(), digest_size=16).digest()
    return UserHistory(user, recent, codes, len(items), np.unique(recent), key)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.manual_seed(0)
    catalog = tiny_catalog(NUM_ITEMS, levels=LEVELS)
    model = zoo.build("hymirec", catalog, recent_len=5, dim=16, heads=2)
    return LoadedModel.build("hymirec", "v000001", model, 0)


def reference_scores(loaded: LoadedModel, h: UserHistory) -> torch.Tensor:
    """The scores as serving computed them before the cache: ``HyMiRec.encode_long`` on the
    long part, ``refine`` with the recent ids, the interests merged per item by the model's rule,
    item 0 at -inf."""
    model = loaded.model
    assert isinstance(model, HyMiRec)
    r = min(model.config.recent_len, len(h.recent_item_ids))
    long_codes = torch.from_numpy(h.long_codes[: len(h.long_codes) - r]).reshape(-1, LEVELS)
    recent = torch.from_numpy(h.recent_item_ids[len(h.recent_item_ids) - r :])
    with torch.no_grad():
        interests = model.refine(model.encode_long(long_codes[None]), recent[None])[0]
        scores = model.interest_scores(interests, loaded.item_vectors)
    scores[0] = -torch.inf
    return scores


def reference_scores_unseen(loaded: LoadedModel, h: UserHistory) -> torch.Tensor:
    scores = reference_scores(loaded, h)
    scores[torch.from_numpy(h.seen_item_ids)] = -torch.inf
    return scores


def test_encode_long_with_the_projected_table_is_the_models_own_to_the_bit(
    loaded: LoadedModel,
) -> None:
    model = loaded.model
    assert isinstance(model, HyMiRec) and loaded.code_table is not None
    gen = torch.Generator().manual_seed(1)
    for length in (0, 1, 7, 300):
        codes = torch.randint(0, UNKNOWN + 1, (3, length, LEVELS), generator=gen)
        with torch.no_grad():
            fast = encode_long(model, loaded.code_table, codes)
            assert torch.equal(fast, model.encode_long(codes))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), length=st.integers(1, 40))
def test_cached_coarse_interests_score_exactly_as_computing_them_each_time(
    loaded: LoadedModel, seed: int, length: int
) -> None:
    rng = np.random.default_rng(seed)
    items = rng.integers(1, NUM_ITEMS + 1, size=length)
    codes = rng.integers(0, UNKNOWN + 1, size=(length, LEVELS))  # UNKNOWN rows included
    h = history(seed % 7, items, codes, 5)
    first, again = loaded.scores(h), loaded.scores(h)  # the second from the cache
    assert torch.equal(first, reference_scores(loaded, h)) and torch.equal(again, first)
    moved = history(seed % 7, np.append(items, 3), np.vstack([codes, [[1, 2]]]), 5)
    assert torch.equal(loaded.scores(moved), reference_scores(loaded, moved))  # a new history
    assert loaded.rank(moved, 7) == reference_top_k(reference_scores_unseen(loaded, moved), 7)


def test_the_model_runs_once_per_history(loaded: LoadedModel) -> None:
    model = loaded.model
    assert isinstance(model, HyMiRec)
    items = np.arange(1, 21)
    codes = np.tile(np.array([[1, 2], [3, 4]]), (10, 1))
    h = history(101, items, codes, 5)
    cache = loaded.interest_cache
    hits, misses = cache.hits, cache.misses
    calls = []
    original = model.lightweight.forward

    def counting(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.shape)
        return original(tokens, valid)

    model.lightweight.forward = counting  # type: ignore[method-assign]
    try:
        first = loaded.rank(h, 5)
        assert loaded.rank(h, 5) == first
        loaded.rank(history(101, np.append(items, 7), np.vstack([codes, [[5, 6]]]), 5), 5)
        loaded.rank(UserHistory(101, h.recent_item_ids, codes, 20, h.seen_item_ids), 5)  # no key
    finally:
        del model.lightweight.forward
    assert [c[1] for c in calls] == [15, 16, 15]  # the long part: all but the last 5 rows
    assert (cache.hits - hits, cache.misses - misses) == (1, 2)


def test_serving_loads_checkpoints_without_importing_the_trainer() -> None:
    code = (
        "import sys, serving, serving.models; "
        "print(sorted(m for m in sys.modules if m in ('model.training.online', "
        "'model.training.online_core', "
        "'model.training.stream_loop')))"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
