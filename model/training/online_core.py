"""The pure core of online training: per-user histories from the sample stream, the training
examples a micro-batch gives, catalogue growth, and test-then-train (prequential) metrics.

Samples arrive per user in order (the training topic is keyed by user), each numbered by ``seq``,
its position in the user's history. :class:`StreamHistories` keeps the last ``max_len`` items per
user, drops repeats (``seq`` already applied: the stream worker is at-least-once) and, on a gap
(``seq`` beyond the next expected one: the trainer started on a topic whose older samples are
gone), seeds the history from the sample's ``recent_item_ids``.

Examples follow the offline harness's cut policy per model (``model.zoo.TRAINING_DEFAULTS``):
``cut="last"`` models (SASRec, HSTU) learn next-item at every position, so one example per active
user (its newest prefix) covers every new transition; ``cut="uniform"`` models (HyMiRec, PerSRec,
Fuxi-MME) get up to ``samples_per_user`` cuts among the user's new positions, each predicting the
items after the cut (a partial target window when the stream has not yet brought W items).
Replay examples, drawn uniformly over users from their whole kept history, mix old data into
each step (experience replay, as in continual learning) so the model does not drift to the
newest users only; ``replay_ratio`` sets how many per new example.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from model.base import Batch, SequentialRecommender
from model.checkpoint import extend_catalog  # here since the trainer grows its catalogue
from model.evaluate import RankingAccumulator
from model.zoo import TrainingDefaults
from streaming.schema import TrainingSample

__all__ = [
    "PROBE_BUCKET_WIDTH",
    "Example",
    "StreamHistories",
    "examples_for_step",
    "extend_catalog",
    "grow_model",
    "length_buckets",
    "make_batch",
    "prequential_metrics",
]

Applied = Literal["new", "duplicate", "gap"]

PROBE_BUCKET_WIDTH = 64  # history lengths that share one ranking forward (prequential_metrics)


@dataclass(frozen=True)
class Example:
    """A user's history up to a cut and the items right after it."""

    user_id: int
    history: np.ndarray  # item indices, oldest first
    history_ts_s: np.ndarray
    targets: np.ndarray
    targets_ts_s: np.ndarray


class StreamHistories:
    """The last ``max_len`` items of every user the stream has shown, with their ``seq``."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self._items: dict[int, list[int]] = {}
        self._ts_s: dict[int, list[int]] = {}
        self._next_seq: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def next_seq(self, user_id: int) -> int:
        return self._next_seq.get(user_id, 0)

    def items(self, user_id: int) -> list[int]:
        return self._items.get(user_id, [])

    def apply(self, sample: TrainingSample) -> Applied:
        """Append the sample's item; a repeat changes nothing; a gap seeds the history."""
        user, expected = sample.user_id, self.next_seq(sample.user_id)
        if sample.seq < expected:
            return "duplicate"
        result: Applied = "new"
        items = self._items.setdefault(user, [])
        stamps = self._ts_s.setdefault(user, [])
        ts_s = sample.ts_ms // 1000
        if sample.seq > expected:
            result = "gap"
            seed = list(sample.recent_item_ids)[-self.max_len :]
            if len(seed) > len(items):
                items[:] = seed
                stamps[:] = [ts_s] * len(seed)
        items.append(sample.item_id)
        stamps.append(ts_s)
        if len(items) > self.max_len:
            del items[: len(items) - self.max_len]
            del stamps[: len(stamps) - self.max_len]
        self._next_seq[user] = sample.seq + 1
        return result

    def example(self, user_id: int, cut: int, window: int, max_len: int) -> Example:
        """History ``items[cut - max_len:cut]``, targets ``items[cut:cut + window]``."""
        items = np.asarray(self._items[user_id], dtype=np.int64)
        stamps = np.asarray(self._ts_s[user_id], dtype=np.int64)
        start = max(0, cut - max_len)
        return Example(
            user_id,
            items[start:cut],
            stamps[start:cut],
            items[cut : cut + window],
            stamps[cut : cut + window],
        )

    def random_users(self, count: int, rng: np.random.Generator) -> list[int]:
        """``count`` users with at least two items, uniformly with replacement."""
        # Sorted, so that a restored copy (users in another insertion order) draws the same.
        eligible = sorted(u for u, items in self._items.items() if len(items) >= 2)
        if not eligible or count <= 0:
            return []
        return [eligible[i] for i in rng.integers(0, len(eligible), size=count)]

    def state(self) -> dict[str, Tensor]:
        """Flat tensors (loadable with ``torch.load(weights_only=True)``)."""
        users = sorted(self._items)
        lengths = [len(self._items[u]) for u in users]
        flat_items = [i for u in users for i in self._items[u]]
        flat_ts = [t for u in users for t in self._ts_s[u]]
        return {
            "max_len": torch.tensor(self.max_len),
            "users": torch.tensor(users, dtype=torch.int64),
            "lengths": torch.tensor(lengths, dtype=torch.int64),
            "next_seq": torch.tensor([self._next_seq[u] for u in users], dtype=torch.int64),
            "items": torch.tensor(flat_items, dtype=torch.int64),
            "ts_s": torch.tensor(flat_ts, dtype=torch.int64),
        }

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> StreamHistories:
        histories = cls(int(state["max_len"]))
        items, stamps = state["items"].tolist(), state["ts_s"].tolist()
        start = 0
        for user, length, next_seq in zip(
            state["users"].tolist(),
            state["lengths"].tolist(),
            state["next_seq"].tolist(),
            strict=True,
        ):
            histories._items[user] = items[start : start + length]
            histories._ts_s[user] = stamps[start : start + length]
            histories._next_seq[user] = next_seq
            start += length
        return histories


def examples_for_step(
    histories: StreamHistories,
    new_positions: dict[int, tuple[int, int]],
    defaults: TrainingDefaults,
    replay_ratio: float,
    rng: np.random.Generator,
) -> list[Example]:
    """The examples one training step learns from, after ``histories`` took the micro-batch.

    ``new_positions[user] = (first, end)``: the user's new items are ``items[first:end]`` of its
    kept history. Cuts index the first target, so a cut needs at least one item before it.
    """
    window, max_len = defaults.target_window, defaults.max_len
    examples: list[Example] = []
    for user, (first, end) in new_positions.items():
        if defaults.cut == "last":
            cut = max(1, end - window)
            if cut < end:
                examples.append(histories.example(user, cut, window, max_len))
            continue
        candidates = np.arange(max(first, 1), end)
        if len(candidates) == 0:
            continue
        take = min(defaults.samples_per_user, len(candidates))
        for cut in rng.choice(candidates, size=take, replace=False):
            examples.append(histories.example(user, int(cut), window, max_len))
    for user in histories.random_users(round(replay_ratio * len(examples)), rng):
        length = len(histories.items(user))
        cut = max(1, length - window) if defaults.cut == "last" else int(rng.integers(1, length))
        examples.append(histories.example(user, cut, window, max_len))
    return examples


def make_batch(examples: list[Example], window: int) -> Batch:
    """Left-padded histories and right-padded targets, as ``model.data`` builds them."""
    width = max(1, max(len(e.history) for e in examples))
    history = np.zeros((len(examples), width), dtype=np.int64)
    history_ts = np.zeros_like(history)
    targets = np.zeros((len(examples), window), dtype=np.int64)
    targets_ts = np.zeros_like(targets)
    for row, e in enumerate(examples):
        if len(e.history):
            history[row, width - len(e.history) :] = e.history
            history_ts[row, width - len(e.history) :] = e.history_ts_s
        targets[row, : len(e.targets)] = e.targets[:window]
        targets_ts[row, : len(e.targets)] = e.targets_ts_s[:window]
    return Batch(
        user_index=torch.tensor([e.user_id for e in examples], dtype=torch.int64),
        history=torch.from_numpy(history),
        history_ts=torch.from_numpy(history_ts),
        targets=torch.from_numpy(targets),
        target_ts=torch.from_numpy(targets_ts),
    )


@torch.no_grad()
def prequential_metrics(
    model: SequentialRecommender,
    examples: list[Example],
    genres: list[frozenset[str]],
    device: torch.device,
    bucket_width: int | None = PROBE_BUCKET_WIDTH,
) -> RankingAccumulator:
    """Test-then-train: rank each example's first target before the model learns from it.

    Items in the example's history are masked, as the offline evaluator masks seen items.
    ``bucket_width`` picks the path: probes whose history lengths fall in the same
    ``bucket_width``-item range share one forward, padded only to that bucket's longest (a short
    history no longer pays for the longest one's padding); ``None`` is the plain reference, one
    forward over every probe padded to the longest. Every model's output ignores left padding,
    so both give the same metrics (``tests/model/test_online.py`` checks it).
    """
    accumulator = RankingAccumulator(genres)
    if not examples:
        return accumulator
    was_training = model.training
    model.eval()
    try:
        if bucket_width is None:
            batch = make_batch(examples, 1).to(device)
            scores = model.score_all(batch).float()
            seen = torch.zeros_like(scores, dtype=torch.bool)
            rows = torch.arange(len(examples), device=device)[:, None].expand_as(batch.history)
            seen[rows, batch.history] = True
            seen[:, 0] = False
        else:
            scores = _bucketed_scores(model, examples, bucket_width, device)
            seen = _seen_items(examples, scores.shape[1], device)
    finally:
        model.train(was_training)
    targets = torch.tensor([int(e.targets[0]) for e in examples], device=device)
    accumulator.add(scores, targets, seen)
    return accumulator


def length_buckets(lengths: np.ndarray, width: int) -> list[np.ndarray]:
    """Row indices grouped by history length, in ranges that double: ``1..width``, then
    ``width + 1..2 * width``, ``2 * width + 1..4 * width``, ... (an empty history goes first).

    A row is padded to at most twice its length, and a history of up to 1,000 items makes at
    most five buckets of width 64, so the per-forward overhead stays small beside the padding
    it saves."""
    if width < 1:
        raise ValueError(f"bucket width must be >= 1; got {width}")
    lengths = np.asarray(lengths, dtype=np.int64)
    edges = [width]
    while edges[-1] < lengths.max(initial=0):
        edges.append(2 * edges[-1])
    keys = np.searchsorted(np.asarray(edges), lengths, side="left")
    return [np.flatnonzero(keys == key) for key in np.unique(keys)]


def _bucketed_scores(
    model: SequentialRecommender, examples: list[Example], width: int, device: torch.device
) -> Tensor:
    """(B, N + 1) float scores, rows in ``examples`` order: one forward per length bucket.

    The buckets' interests are scored against the item embeddings once, as
    ``SequentialRecommender.score_all`` scores (the item side is computed once, not per bucket);
    a model that overrides ``score_all`` is scored per bucket instead."""
    lengths = np.array([len(e.history) for e in examples], dtype=np.int64)
    buckets = length_buckets(lengths, width)
    batches = [make_batch([examples[i] for i in rows], 1).to(device) for rows in buckets]
    if type(model).score_all is SequentialRecommender.score_all:
        interests = torch.cat([model.user_interests(batch) for batch in batches])  # (B, K, D)
        by_bucket = torch.einsum("bkd,nd->bkn", interests, model.item_embeddings()).amax(dim=1)
        by_bucket[:, 0] = float("-inf")
    else:
        by_bucket = torch.cat([model.score_all(batch) for batch in batches])
    scores = torch.empty_like(by_bucket, dtype=torch.float32)
    scores[torch.from_numpy(np.concatenate(buckets)).to(device)] = by_bucket.float()
    return scores


def _seen_items(examples: list[Example], width: int, device: torch.device) -> Tensor:
    """(B, width) bool: True at the items of each example's history (never at column 0)."""
    lengths = [len(e.history) for e in examples]
    rows = np.repeat(np.arange(len(examples)), lengths)
    items = np.concatenate([e.history for e in examples]) if sum(lengths) else rows
    seen = torch.zeros(len(examples), width, dtype=torch.bool)
    seen[torch.from_numpy(rows), torch.from_numpy(items.astype(np.int64))] = True
    seen[:, 0] = False
    return seen.to(device)


def grow_model(
    old: SequentialRecommender, new: SequentialRecommender, old_rows: int
) -> SequentialRecommender:
    """Copy ``old``'s weights into ``new`` (built for a larger catalogue): tensors of equal
    shape are copied; per-item tables (first dimension ``old_rows``) keep their old rows and
    the new rows keep ``new``'s initialisation."""
    target = new.state_dict()
    for name, value in old.state_dict().items():
        grown = target[name]
        if grown.shape == value.shape:
            grown.copy_(value)
        elif value.shape[0] == old_rows and grown.shape[1:] == value.shape[1:]:
            grown[:old_rows].copy_(value)
        else:
            raise ValueError(f"{name}: cannot grow {tuple(value.shape)} to {tuple(grown.shape)}")
    new.load_state_dict(target)
    return new


def grow_optimizer_state(
    old: torch.optim.Optimizer, new: torch.optim.Optimizer, old_rows: int
) -> None:
    """Carry AdamW moments over to the grown parameters (new rows start at zero moments)."""
    old_state = old.state_dict()
    new_state = new.state_dict()
    params = [p for group in new.param_groups for p in group["params"]]
    for index, moments in old_state["state"].items():
        carried = {}
        for key, value in moments.items():
            shape = params[index].shape
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != shape:
                grown = torch.zeros(shape, dtype=value.dtype, device=value.device)
                grown[:old_rows] = value
                value = grown
            carried[key] = value
        new_state["state"][index] = carried
    new.load_state_dict(new_state)


def item_ids_in(samples: Iterable[TrainingSample]) -> int:
    """The largest item id the samples name (their items and recent items)."""
    largest = 0
    for sample in samples:
        largest = max(largest, sample.item_id, *sample.recent_item_ids, 0)
    return largest
