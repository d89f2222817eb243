"""Full-ranking offline metrics over the whole catalogue: Recall, NDCG, HR, diversity, coverage.

A pure function of a score matrix (users x items, column 0 = padding), one held-out target per
user and the items each user has already seen; no model, no I/O, so it can be checked by hand.

The ranking protocol, stated once:

* **Every item is ranked** (no sampled negatives; Krichene & Rendle 2020 show sampled metrics
  can reorder models).
* **History masking.** Items in the user's history before the target are removed from the ranking
  (their score becomes -inf): a recommender does not re-recommend what the user already rated. A
  target that repeats a history item is therefore masked and counts as a miss; ML-100K has no
  repeated (user, item) pairs, so this never happens there. Padding (item 0) is always masked.
* **Ties** are broken by item index, lower first: ``rank = #{j: s_j > s_t} + #{j < t: s_j = s_t}``
  (0-based), the order a stable descending sort gives. The top-N lists use the same order.
* With one target per user, ``Recall@K = HR@K = 1[rank < K]`` (the share of the one relevant item
  that is retrieved, and whether any is), averaged over users; both are reported for comparison
  with papers that use either name. ``NDCG@K = 1[rank < K] / log2(rank + 2)`` (the ideal DCG of a
  single relevant item is 1; Järvelin & Kekäläinen 2002).
* **Diversity@N**: per user, the share of the N(N-1)/2 pairs in the top-N whose genre sets are
  *not equal* (two items with genres {Action, Comedy} and {Action} differ; {Drama} and {Drama} do
  not), averaged over users (intra-list diversity with a 0/1 distance; Ziegler et al. 2005).
  A user with fewer than N unseen items gets a shorter list (masked items are never listed); a
  list with fewer than two items has diversity 0.
* **Coverage@N**: the share of the catalogue's items (1..N_items) that appear in at least one
  user's top-N (aggregate diversity; Adomavicius & Kwon 2012).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from core.errors import DataError

__all__ = [
    "DIVERSITY_NS",
    "KS",
    "RankingAccumulator",
    "genre_ids",
    "masked_scores",
    "ranking_metrics",
    "target_ranks",
    "top_items",
]

KS = (10, 50)
DIVERSITY_NS = (10, 50)


def genre_ids(genres: Sequence[frozenset[str]]) -> Tensor:
    """(N + 1,) int64: equal genre sets get equal ids (ids in order of first appearance)."""
    ids: dict[frozenset[str], int] = {}
    return torch.tensor([ids.setdefault(g, len(ids)) for g in genres], dtype=torch.int64)


def masked_scores(scores: Tensor, seen: Tensor | None) -> Tensor:
    """Float scores with seen items and column 0 set to -inf (a new tensor)."""
    out = scores.detach().float().clone()
    if seen is not None:
        if seen.shape != scores.shape:
            raise DataError(f"seen has shape {tuple(seen.shape)}; scores {tuple(scores.shape)}")
        out[seen.to(out.device)] = float("-inf")
    out[:, 0] = float("-inf")
    return out


def target_ranks(masked: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(0-based ranks (U,), ties by lower index; valid (U,): False where the target is masked)."""
    target = targets.to(masked.device).long()
    score = masked.gather(1, target[:, None])  # (U, 1)
    index = torch.arange(masked.shape[1], device=masked.device)[None, :]
    ahead = (masked > score) | ((masked == score) & (index < target[:, None]))
    return ahead.sum(dim=1), torch.isfinite(score[:, 0])


def top_items(masked: Tensor, n: int) -> Tensor:
    """(B, n) item indices, best first, ties by lower index: the first ``n`` columns of a stable
    descending sort, found with ``topk`` (linear in the catalogue) instead of a full sort.

    The n-th best score ``v`` splits the row: every item above ``v`` is in; the items equal to
    ``v`` fill the remaining places lowest index first; a stable sort of those ``n`` items, taken
    in index order, puts them in the sort's order. Rows with NaN take the full sort."""
    if n >= masked.shape[1] or bool(masked.isnan().any()):
        return torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :n]
    kth = masked.topk(n, dim=1).values[:, -1:]  # (B, 1)
    above = masked > kth  # at most n - 1 per row
    tied = masked == kth
    room = n - above.sum(dim=1, keepdim=True)
    chosen = (above | (tied & (tied.cumsum(dim=1) <= room))).nonzero()[:, 1].view(-1, n)
    order = torch.sort(masked.gather(1, chosen), dim=1, descending=True, stable=True).indices
    return chosen.gather(1, order)


@dataclass
class RankingAccumulator:
    """Sums of per-user metrics over batches; :meth:`result` gives the means (and coverage)."""

    genres: Sequence[frozenset[str]]
    ks: tuple[int, ...] = KS
    ns: tuple[int, ...] = DIVERSITY_NS
    users: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    covered: dict[int, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._genre_ids = genre_ids(self.genres)
        if any(k < 1 for k in (*self.ks, *self.ns)):
            raise DataError(f"cut-offs must be >= 1; got ks={self.ks}, ns={self.ns}")

    @property
    def num_items(self) -> int:
        return len(self.genres) - 1

    def add(self, scores: Tensor, targets: Tensor, seen: Tensor | None = None) -> None:
        """Add a batch: ``scores`` (B, N+1), ``targets`` (B,) item indices, ``seen`` (B, N+1)."""
        if scores.ndim != 2 or scores.shape[1] != self.num_items + 1:
            raise DataError(f"scores must be (B, {self.num_items + 1}); got {tuple(scores.shape)}")
        masked = masked_scores(scores, seen)
        ranks, valid = target_ranks(masked, targets)
        for k in self.ks:
            hit = (ranks < k) & valid
            gain = torch.where(hit, 1.0 / torch.log2(ranks.double() + 2.0), 0.0)
            self._add(f"hr@{k}", float(hit.sum()))
            self._add(f"recall@{k}", float(hit.sum()))
            self._add(f"ndcg@{k}", float(gain.sum()))
        deepest = min(max(self.ns), self.num_items)
        top = top_items(masked, deepest)
        # A user with fewer unmasked items than N gets a shorter list: masked entries drop out.
        listed = torch.isfinite(masked.gather(1, top))  # (B, deepest)
        genre = self._genre_ids.to(top.device)[top]
        for n in self.ns:
            g, ok = genre[:, : min(n, deepest)], listed[:, : min(n, deepest)]
            both = (ok[:, :, None] & ok[:, None, :]).triu(diagonal=1)
            differ = ((g[:, :, None] != g[:, None, :]) & both).sum(dim=(1, 2)).double()
            pairs = both.sum(dim=(1, 2)).double()
            share = torch.where(pairs > 0, differ / pairs.clamp(min=1), 0.0)
            self._add(f"diversity@{n}", float(share.sum()))
            hit_items = torch.zeros(self.num_items + 1, dtype=torch.bool, device=top.device)
            hit_items[top[:, : min(n, deepest)][ok]] = True
            prior = self.covered.get(n)
            self.covered[n] = hit_items if prior is None else prior | hit_items
        self.users += int(scores.shape[0])

    def _add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value

    def result(self) -> dict[str, float]:
        """Metric name -> value: means over users; coverage over the catalogue."""
        if self.users == 0:
            raise DataError("no users were evaluated")
        out = {name: total / self.users for name, total in sorted(self.sums.items())}
        for n, hit_items in self.covered.items():
            out[f"coverage@{n}"] = float(hit_items[1:].sum()) / self.num_items
        return out


def ranking_metrics(
    scores: Tensor,
    targets: Tensor,
    genres: Sequence[frozenset[str]],
    seen: Tensor | None = None,
    ks: tuple[int, ...] = KS,
    ns: tuple[int, ...] = DIVERSITY_NS,
) -> dict[str, float]:
    """All metrics of one score matrix (see the module docstring for the definitions)."""
    accumulator = RankingAccumulator(genres, ks, ns)
    accumulator.add(scores, targets, seen)
    return accumulator.result()
