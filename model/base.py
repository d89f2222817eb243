"""What every sequential recommender in ``model/`` offers the shared harness.

Items are indexed ``1..num_items`` (0 is padding). A batch holds each user's history, left-padded,
oldest first, and the next ``W`` items as training targets. A model turns a batch into ``K`` user
embeddings per user (``K = 1`` for single-embedding models); a user's score for an item merges its
interests' dot products with the item embedding (:meth:`SequentialRecommender.interest_scores`):
by default the best of them (ComiRec-style retrieval: each interest retrieves its own top-N;
merging by score and de-duplicating is the same as ranking by the max); a model may merge by
another rule of ``model.interest_merge`` (HyMiRec does). With one interest every rule is the
identity up to a constant.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.interest_merge import Merge

__all__ = ["Batch", "CatalogInfo", "SequentialRecommender"]


@dataclass
class CatalogInfo:
    """Per-item side information every model may use (rows indexed by item index; row 0 = pad).

    ``text_embeddings``: frozen item text embeddings (all-MiniLM-L6-v2, 384-d, unit norm; row 0
    zeros). ``codes``: the item's residual-codebook codes (levels columns; row 0 = UNKNOWN).
    ``codebook_centroids`` (L, K, D) and ``codebook_scales`` (L, K): to rebuild an item's
    embedding from its codes without touching its text embedding (HyMiRec's long history).
    """

    num_items: int
    text_embeddings: Tensor  # (num_items + 1, D_text) float32
    codes: Tensor  # (num_items + 1, levels) int64
    codebook_centroids: Tensor  # (levels, size, D_text) float32
    codebook_scales: Tensor  # (levels, size) float32
    genres: list[frozenset[str]]  # index = item index; [0] empty


@dataclass
class Batch:
    """A batch of users. ``history`` is left-padded with 0 (oldest first, newest last)."""

    user_index: Tensor  # (B,) int64, 0..num_users-1
    history: Tensor  # (B, L) int64 item indices, 0 = pad
    history_ts: Tensor  # (B, L) int64 seconds (0 at pads)
    targets: Tensor  # (B, W) int64 next items after the history, 0 = none (training only)
    target_ts: Tensor  # (B, W) int64 seconds

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in vars(self).values()))

    @property
    def mask(self) -> Tensor:
        return self.history > 0


class SequentialRecommender(nn.Module, abc.ABC):
    """Base class: subclasses implement ``user_interests``, ``item_embeddings`` and ``loss``."""

    #: how many user embeddings the model produces (1 = single-embedding)
    num_interests: int = 1

    @abc.abstractmethod
    def user_interests(self, batch: Batch) -> Tensor:
        """(B, K, D) user interest embeddings from the histories in ``batch``."""

    @abc.abstractmethod
    def item_embeddings(self) -> Tensor:
        """(num_items + 1, D) embeddings every item is scored with; row 0 is padding."""

    @abc.abstractmethod
    def loss(self, batch: Batch) -> Tensor:
        """Scalar training loss for predicting ``batch.targets`` from ``batch.history``."""

    def interest_scores(
        self, interests: Tensor, items: Tensor, merge: Merge | None = None
    ) -> Tensor:
        """(..., N) one score per item from ``interests`` (..., K, D) and ``items`` (N, D).

        The base rule is the max over interests whatever ``merge`` asks (single-embedding models
        have nothing to merge). Serving calls this with one user's cached (K, D) interests.
        """
        return torch.einsum("...kd,nd->...kn", interests, items).amax(dim=-2)

    def score_all(self, batch: Batch, merge: Merge | None = None) -> Tensor:
        """(B, num_items + 1) scores: the user's interests merged per item (item 0 at -inf).

        ``merge`` overrides the model's own rule (to compare rules on the same weights)."""
        interests = self.user_interests(batch)  # (B, K, D)
        scores = self.interest_scores(interests, self.item_embeddings(), merge)
        scores[:, 0] = float("-inf")
        return scores
