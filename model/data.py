"""MovieLens-100K as per-user item sequences, the leave-one-out split, and the batches models see.

Items are re-indexed ``1..N`` by sorted ``item_id`` (0 is padding); users keep their ratings in
replay order (by timestamp, ties in file order, as :func:`core.movielens.load_ratings` gives
them). The split is the usual leave-one-out one (as in SASRec, Kang & McAuley 2018, Sec. IV): a
user's last item is the test target, the second-to-last the validation target, and training sees
the sequence without those two. Users with fewer than three interactions are dropped (they cannot
give a training item, a validation and a test target); ML-100K has none (every user rated >= 20).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch

from core.errors import CodebookError, DataError
from core.movielens import load_items, load_ratings
from core.settings import Settings
from features.codebook import ResidualCodebook
from features.item_embeddings import embed_movielens_items
from model.base import Batch, CatalogInfo
from model.llm_item_embeddings import embed_movielens_items_llm

__all__ = [
    "ITEM_ENCODERS",
    "MIN_INTERACTIONS",
    "EvalBatch",
    "ItemTextEncoder",
    "SequenceData",
    "build_catalog",
    "evaluation_batches",
    "load_movielens_sequences",
    "training_batches",
]

MIN_INTERACTIONS = 3
IntArray = npt.NDArray[np.int64]
Split = Literal["valid", "test"]
Cut = Literal["uniform", "last"]
ItemTextEncoder = Literal["minilm", "smollm2"]
ITEM_ENCODERS: tuple[ItemTextEncoder, ...] = ("minilm", "smollm2")


@dataclass(frozen=True, eq=False)
class SequenceData:
    """Every kept user's items (indices ``1..num_items``) and timestamps (s), oldest first."""

    user_ids: IntArray  # (U,) original user ids, sorted
    item_ids: IntArray  # (N,) original item ids, sorted; item index i + 1 is item_ids[i]
    items: tuple[IntArray, ...]  # per user, item indices in replay order
    timestamps_s: tuple[IntArray, ...]  # per user, seconds, aligned with ``items``

    @classmethod
    def from_ratings(cls, ratings: pd.DataFrame, item_ids: IntArray) -> SequenceData:
        """From a ``user_id, item_id, ts_ms`` frame; rows are stable-sorted by ``ts_ms`` first,
        so ties keep the frame's order (the replay order of ``load_ratings``)."""
        missing = {"user_id", "item_id", "ts_ms"} - set(ratings.columns)
        if missing:
            raise DataError(f"ratings frame lacks columns {sorted(missing)}")
        ratings = ratings.sort_values("ts_ms", kind="stable")
        catalogue = np.asarray(item_ids, dtype=np.int64)
        if np.any(np.diff(catalogue) <= 0):
            raise DataError("item_ids must be sorted and unique")
        raw = ratings["item_id"].to_numpy(dtype=np.int64)
        index = np.searchsorted(catalogue, raw)
        known = (index < len(catalogue)) & (catalogue[np.minimum(index, len(catalogue) - 1)] == raw)
        if not known.all():
            raise DataError(
                f"ratings name items not in the catalogue: {sorted(set(raw[~known]))[:5]}"
            )
        frame = pd.DataFrame(
            {
                "user_id": ratings["user_id"].to_numpy(dtype=np.int64),
                "item": index + 1,
                "ts_s": ratings["ts_ms"].to_numpy(dtype=np.int64) // 1000,
            }
        )
        users, items, stamps = [], [], []
        # groupby keeps the frame's row order inside each group: replay order survives.
        for user, group in frame.groupby("user_id", sort=True):
            if len(group) < MIN_INTERACTIONS:
                continue
            users.append(int(user))
            items.append(group["item"].to_numpy(dtype=np.int64))
            stamps.append(group["ts_s"].to_numpy(dtype=np.int64))
        if not users:
            raise DataError(f"no user has at least {MIN_INTERACTIONS} interactions")
        return cls(np.asarray(users, dtype=np.int64), catalogue, tuple(items), tuple(stamps))

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def training_part(self, user: int) -> tuple[IntArray, IntArray]:
        """(items, timestamps) the model may train on: the sequence without its last two."""
        return self.items[user][:-2], self.timestamps_s[user][:-2]

    def training_item_counts(self) -> IntArray:
        """(N + 1,) how often each item occurs in the training parts (index 0 = pad = 0)."""
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for user in range(self.num_users):
            np.add.at(counts, self.training_part(user)[0], 1)
        return counts


def load_movielens_sequences() -> SequenceData:
    """ML-100K from the installed recbole wheel, items indexed by sorted ``item_id``."""
    items = load_items()
    return SequenceData.from_ratings(load_ratings(), items["item_id"].to_numpy(dtype=np.int64))


def _load_or_fit_codebook(
    settings: Settings, embeddings: npt.NDArray[np.float32]
) -> ResidualCodebook:
    """The codebook in ``settings.codebook_dir`` if it has these levels/size/dim, else a fit.

    The cached file does not record its seed, so a cached codebook with the right shape is reused
    whatever seed fitted it. A fresh fit is saved only when the folder holds no codebook yet (the
    folder belongs to ``features.item_features``; a different codebook there is left alone).
    """
    folder = settings.codebook_dir
    shape = (settings.codebook.levels, settings.codebook.size, embeddings.shape[1])
    if (folder / "codebook.npz").is_file():
        try:
            cached = ResidualCodebook.load(folder)
        except CodebookError:
            cached = None
        if cached is not None and (cached.levels, cached.size, cached.dim) == shape:
            return cached
    codebook = ResidualCodebook.fit(
        embeddings,
        levels=settings.codebook.levels,
        size=settings.codebook.size,
        seed=settings.codebook.seed,
    )
    if not (folder / "codebook.npz").exists():
        codebook.save(folder)
    return codebook


def build_catalog(settings: Settings, item_encoder: ItemTextEncoder = "minilm") -> CatalogInfo:
    """Text embeddings, codebook codes and genres of every ML-100K item, rows by item index.

    ``item_encoder`` picks the text encoder: all-MiniLM-L6-v2 (384-d, the default, what the
    feature store publishes) or the LLM backbone SmolLM2-135M (576-d,
    ``model.llm_item_embeddings``; its codebook is fitted here and not saved, as the codebook
    folder holds MiniLM's).
    """
    items = load_items()
    if item_encoder == "minilm":
        item_ids, embeddings = embed_movielens_items(
            settings.embedding_cache_dir, batch_size=settings.features.embedding_batch_size
        )
    elif item_encoder == "smollm2":
        item_ids, embeddings = embed_movielens_items_llm(settings.embedding_cache_dir)
    else:
        raise DataError(f"item_encoder must be one of {ITEM_ENCODERS}; got {item_encoder!r}")
    if not np.array_equal(item_ids, items["item_id"].to_numpy(dtype=np.int64)):
        raise DataError("item embeddings are not aligned with the item table")
    codebook = _load_or_fit_codebook(settings, embeddings)
    num_items, dim = embeddings.shape
    text = np.zeros((num_items + 1, dim), dtype=np.float32)
    text[1:] = embeddings
    codes = np.full((num_items + 1, codebook.levels), codebook.UNKNOWN, dtype=np.int64)
    codes[1:] = codebook.encode(embeddings).astype(np.int64)
    genres = [frozenset[str](), *(frozenset(g) for g in items["genres"])]
    return CatalogInfo(
        num_items=num_items,
        text_embeddings=torch.from_numpy(text),
        codes=torch.from_numpy(codes),
        codebook_centroids=torch.from_numpy(np.array(codebook.centroids, dtype=np.float32)),
        codebook_scales=torch.from_numpy(np.array(codebook.scales, dtype=np.float32)),
        genres=genres,
    )


def _left_pad(rows: list[IntArray], width: int) -> torch.Tensor:
    """(len(rows), width) int64, each row right-aligned (newest last), 0 in front."""
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        if len(row):
            out[i, width - len(row) :] = row
    return torch.from_numpy(out)


def _right_pad(rows: list[IntArray], width: int) -> torch.Tensor:
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def _batch(
    users: list[int],
    histories: list[IntArray],
    history_ts: list[IntArray],
    targets: list[IntArray],
    target_ts: list[IntArray],
    window: int,
) -> Batch:
    width = max(1, max(len(h) for h in histories))  # pad to the batch's longest history
    return Batch(
        user_index=torch.tensor(users, dtype=torch.int64),
        history=_left_pad(histories, width),
        history_ts=_left_pad(history_ts, width),
        targets=_right_pad(targets, window),
        target_ts=_right_pad(target_ts, window),
    )


def training_batches(
    data: SequenceData,
    max_len: int,
    batch_size: int,
    rng: np.random.Generator,
    target_window: int = 1,
    cut: Cut = "uniform",
    samples_per_user: int = 1,
) -> Iterator[Batch]:
    """One epoch of next-W-items training samples, shuffled, in batches.

    A sample cuts a user's training part ``t`` (length ``m``) at ``c``: history ``t[c - max_len:c]``
    (at most ``max_len`` items, left-padded), targets ``t[c:c + W]`` (0-padded to ``W``).
    ``cut="uniform"``: each epoch draws ``min(samples_per_user, m - 1)`` distinct cuts per user,
    uniformly from ``1..m-1`` (fresh prefixes every epoch). ``cut="last"``: one cut per user at
    ``max(1, m - W)``, the longest history with a full target window; models that predict the next
    item at every position (SASRec, HSTU) learn from every transition of the history that way.
    Users with ``m < 2`` give no sample.

    Batches group samples of similar history length (less padding: ML-100K lengths run from 18
    to 735): the shuffled samples are cut into pools of ``POOL_BATCHES`` batches, each pool is
    sorted by length (stable, so equal lengths stay shuffled) and cut into batches, and the
    batches are yielded in random order.
    """
    if max_len < 1 or batch_size < 1 or target_window < 1 or samples_per_user < 1:
        raise DataError("max_len, batch_size, target_window and samples_per_user must be >= 1")
    samples: list[tuple[int, int]] = []
    for user in range(data.num_users):
        m = len(data.items[user]) - 2
        if m < 2:
            continue
        if cut == "last":
            samples.append((user, max(1, m - target_window)))
        elif cut == "uniform":
            draws = rng.choice(np.arange(1, m), size=min(samples_per_user, m - 1), replace=False)
            samples.extend((user, int(c)) for c in draws)
        else:
            raise DataError(f"cut must be 'uniform' or 'last'; got {cut!r}")
    for chosen in _length_grouped(samples, batch_size, rng, max_len):
        users, hist, hist_ts, tgt, tgt_ts = [], [], [], [], []
        for user, c in chosen:
            items, stamps = data.training_part(user)
            users.append(user)
            hist.append(items[max(0, c - max_len) : c])
            hist_ts.append(stamps[max(0, c - max_len) : c])
            tgt.append(items[c : c + target_window])
            tgt_ts.append(stamps[c : c + target_window])
        yield _batch(users, hist, hist_ts, tgt, tgt_ts, target_window)


POOL_BATCHES = 16


def _length_grouped(
    samples: list[tuple[int, int]], batch_size: int, rng: np.random.Generator, max_len: int
) -> list[list[tuple[int, int]]]:
    """Shuffled samples (user, cut) in batches of similar ``min(cut, max_len)``."""
    shuffled = [samples[i] for i in rng.permutation(len(samples))]
    batches: list[list[tuple[int, int]]] = []
    pool = batch_size * POOL_BATCHES
    for start in range(0, len(shuffled), pool):
        chunk = sorted(shuffled[start : start + pool], key=lambda s: min(s[1], max_len))
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass(frozen=True, eq=False)
class EvalBatch:
    """Model input (``batch.targets`` (B, 1) is the held-out item), the target, and ``seen``.

    ``seen`` (B, N + 1) bool marks every item of the user's *whole* history before the target
    (not only the last ``max_len`` the model sees): the evaluator masks them out of the ranking.
    """

    batch: Batch
    target: torch.Tensor  # (B,) int64
    seen: torch.Tensor  # (B, N + 1) bool


def evaluation_batches(
    data: SequenceData, split: Split, max_len: int, batch_size: int
) -> Iterator[EvalBatch]:
    """Every user once: validation target = second-to-last item, test = last.

    The history is everything before the target (for test that includes the validation item),
    truncated to its last ``max_len`` items. Users are batched by history length (shortest
    first, ties by user index) to save padding; ``batch.user_index`` says who is who.
    """
    if split not in ("valid", "test"):
        raise DataError(f"split must be 'valid' or 'test'; got {split!r}")
    if max_len < 1 or batch_size < 1:
        raise DataError("max_len and batch_size must be >= 1")
    position = -2 if split == "valid" else -1
    lengths = [min(len(items) + position, max_len) for items in data.items]
    by_length = sorted(range(data.num_users), key=lambda user: lengths[user])
    for start in range(0, data.num_users, batch_size):
        users = by_length[start : start + batch_size]
        hist, hist_ts, tgt, tgt_ts = [], [], [], []
        seen = torch.zeros(len(users), data.num_items + 1, dtype=torch.bool)
        for row, user in enumerate(users):
            items, stamps = data.items[user], data.timestamps_s[user]
            end = len(items) + position
            hist.append(items[max(0, end - max_len) : end])
            hist_ts.append(stamps[max(0, end - max_len) : end])
            tgt.append(items[end : end + 1])
            tgt_ts.append(stamps[end : end + 1])
            seen[row, torch.from_numpy(items[:end])] = True
        batch = _batch(users, hist, hist_ts, tgt, tgt_ts, 1)
        yield EvalBatch(batch=batch, target=batch.targets[:, 0].clone(), seen=seen)
