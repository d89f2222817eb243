"""An evaluation that can see several interests: a multi-target hold-out, and the tie-free users.

Leave-one-out asks for one next item, which a single embedding can aim at as well as K interests.
The multi-target hold-out asks for a user's whole near future:

* **Split.** Each user's last ``n`` items (``n = 10`` by default) are the target set; the model
  trains and early-stops on the rest (:func:`holdout_data`: the sequence without its last
  ``n - 1`` items, so that the usual leave-one-out split of it trains on everything before the
  last ``n + 1`` items and validates on the ``n + 1``-th from last). A user needs ``n + 3`` items
  (ML-100K's users all have >= 20). The history at test time is everything before the set.
* **Ranking** as in ``model.evaluate``: every item ranked, the history masked, ties by lower index.
* ``recall@K = |top_K ∩ T| / |T|``; ``ndcg@K = DCG / IDCG`` with ``DCG = sum over hits of
  1 / log2(rank + 2)`` and ``IDCG = sum_{i < min(|T|, K)} 1 / log2(i + 2)``; ``hr@K = 1[any hit]``;
  ``interest_coverage@K = |C(top_K) ∩ C(T)| / |C(T)|``, ``C`` the set of item clusters (given as
  one label per item: the grounded world's item clusters, or genre sets). Means over users.

**Ties.** ML-100K stores seconds, and users often rate several items in one second: their replay
order within a second is the file's order (``core.movielens.load_ratings``), which a model
cannot know. :func:`tie_free_users` keeps the users whose test and validation items have
different timestamps, so a leave-one-out metric on them does not depend on that order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from core.errors import DataError
from model.base import SequentialRecommender
from model.data import SequenceData, evaluation_batches
from model.evaluate import masked_scores, top_items
from model.interest_merge import Merge

__all__ = [
    "MULTI_KS",
    "MultiTargetAccumulator",
    "evaluate_multi_target",
    "holdout_data",
    "target_sets",
    "tie_free_users",
]

MULTI_KS = (10, 50)
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


def tie_free_users(data: SequenceData) -> BoolArray:
    """(num_users,) True where the test (last) and validation (second-to-last) items' timestamps
    differ."""
    return np.array([ts[-1] != ts[-2] for ts in data.timestamps_s], dtype=bool)


def _kept_users(data: SequenceData, num_targets: int) -> list[int]:
    if num_targets < 1:
        raise DataError(f"num_targets must be >= 1; got {num_targets}")
    keep = [u for u in range(data.num_users) if len(data.items[u]) >= num_targets + 3]
    if not keep:
        need = num_targets + 3
        raise DataError(f"no user has the {need} items a {num_targets}-item hold-out needs")
    return keep


def holdout_data(data: SequenceData, num_targets: int = 10) -> SequenceData:
    """``data`` without each user's last ``num_targets - 1`` items (users with fewer than
    ``num_targets + 3`` items dropped): train on it with the usual harness, then test with
    :func:`evaluate_multi_target` on the full ``data``. Its leave-one-out test item is the first
    of the target set, so its test histories are the multi-target histories."""
    keep = _kept_users(data, num_targets)
    drop = num_targets - 1
    return SequenceData(
        data.user_ids[keep],
        data.item_ids,
        tuple(data.items[u][: len(data.items[u]) - drop] for u in keep),
        tuple(data.timestamps_s[u][: len(data.items[u]) - drop] for u in keep),
    )


def target_sets(data: SequenceData, users: IntArray, num_targets: int) -> Tensor:
    """(len(users), num_targets) int64: each user's last ``num_targets`` items as a set (sorted;
    a repeated item counts once, the row 0-padded)."""
    out = torch.zeros(len(users), num_targets, dtype=torch.int64)
    for row, user in enumerate(users):
        unique = np.unique(data.items[int(user)][-num_targets:])
        out[row, : len(unique)] = torch.from_numpy(unique)
    return out


@dataclass
class MultiTargetAccumulator:
    """Sums of the per-user set metrics (module docstring); :meth:`result` gives the means."""

    clusters: Tensor  # (N + 1,) int64 cluster label per item (row 0 unused)
    ks: tuple[int, ...] = MULTI_KS
    users: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, scores: Tensor, targets: Tensor, seen: Tensor | None = None) -> None:
        """``scores`` (B, N + 1), ``targets`` (B, n) item sets (0 = none), ``seen`` (B, N + 1)."""
        if scores.shape[1] != self.clusters.shape[0]:
            raise DataError(f"scores have {scores.shape[1]} columns; clusters {len(self.clusters)}")
        masked = masked_scores(scores, seen)
        targets = targets.to(masked.device)
        valid = targets > 0  # (B, n)
        size = valid.sum(dim=1).double()
        if bool((size == 0).any()):
            raise DataError("every user needs at least one target")
        top = top_items(masked, min(max(self.ks), masked.shape[1]))
        listed = torch.isfinite(masked.gather(1, top))
        # hit[b, r]: the item at rank r is in b's target set (and is a real, unmasked item)
        hit = ((top[:, :, None] == targets[:, None, :]) & valid[:, None, :]).any(dim=2) & listed
        discount = 1.0 / torch.log2(torch.arange(top.shape[1], device=top.device).double() + 2.0)
        labels = self.clusters.to(masked.device)
        num_clusters = int(labels.max()) + 1
        rows = torch.arange(targets.shape[0], device=masked.device)[:, None]
        wanted = torch.zeros(targets.shape[0], num_clusters, dtype=torch.bool, device=top.device)
        wanted[rows.expand_as(targets)[valid], labels[targets][valid]] = True
        for k in self.ks:
            depth = min(k, top.shape[1])  # a catalogue smaller than k lists every item
            hits = hit[:, :depth]
            ideal = torch.cumsum(discount, 0)[size.long().clamp(max=depth) - 1]
            self._add(f"recall@{k}", hits.sum(dim=1).double() / size)
            self._add(f"ndcg@{k}", (hits.double() * discount[:depth]).sum(dim=1) / ideal)
            self._add(f"hr@{k}", hits.any(dim=1).double())
            got = torch.zeros_like(wanted)
            shown = listed[:, :depth]
            got[rows.expand(-1, depth)[shown], labels[top[:, :depth]][shown]] = True
            covered = (got & wanted).sum(dim=1).double() / wanted.sum(dim=1).double()
            self._add(f"interest_coverage@{k}", covered)
        self.users += int(targets.shape[0])

    def _add(self, name: str, per_user: Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(per_user.sum())

    def result(self) -> dict[str, float]:
        if self.users == 0:
            raise DataError("no users were evaluated")
        return {name: total / self.users for name, total in sorted(self.sums.items())}


@torch.no_grad()
def evaluate_multi_target(
    model: SequentialRecommender,
    data: SequenceData,
    clusters: Tensor,
    max_len: int,
    num_targets: int = 10,
    *,
    merge: Merge | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """The multi-target metrics of ``model`` (trained on ``holdout_data(data, num_targets)``):
    the histories are the hold-out data's leave-one-out test histories; the sets come from
    ``data``."""
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    held = holdout_data(data, num_targets)
    full_index = np.searchsorted(data.user_ids, held.user_ids)
    was_training = model.training
    model.eval()
    accumulator = MultiTargetAccumulator(clusters)
    for chunk in evaluation_batches(held, "test", max_len, batch_size):
        scores = model.score_all(chunk.batch.to(device), merge)
        sets = target_sets(data, full_index[chunk.batch.user_index.numpy()], num_targets)
        accumulator.add(scores.float(), sets, chunk.seen.to(device))
    model.train(was_training)
    return accumulator.result()
