"""Most-popular baseline: every user gets the same ranking, by training-interaction count.

The non-personalised reference point of every sequential-recommendation table (e.g. SASRec, Kang &
McAuley 2018, Table III "PopRec"). Counts come from the training parts only (the sequences without
their validation and test items), so nothing held out leaks into the scores. It is fitted by
counting (:meth:`PopularityRecommender.fit`), not by gradient descent; ties in counts are broken
by the evaluator (lower item index first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.errors import DataError
from model.base import Batch, CatalogInfo, SequentialRecommender

__all__ = ["Config", "PopularityRecommender", "build_model"]


@dataclass(frozen=True)
class Config:
    """Nothing to tune; kept so every model is built the same way."""


class PopularityRecommender(SequentialRecommender):
    """score(user, item) = count(item): one 1-d "interest" (1.0) against 1-d item counts."""

    def __init__(self, catalog: CatalogInfo, config: Config) -> None:
        super().__init__()
        self.config = config
        self.counts: Tensor
        self.register_buffer("counts", torch.zeros(catalog.num_items + 1))

    def fit(self, counts: Tensor) -> None:
        """Set the (N + 1,) item counts (index 0 = padding)."""
        if counts.shape != self.counts.shape:
            raise DataError(f"counts must have shape {tuple(self.counts.shape)}")
        self.counts.copy_(counts.to(self.counts))

    def user_interests(self, batch: Batch) -> Tensor:
        return torch.ones(batch.history.shape[0], 1, 1, device=self.counts.device)

    def item_embeddings(self) -> Tensor:
        return self.counts[:, None]

    def loss(self, batch: Batch) -> Tensor:
        """No trainable parameters: the loss is a constant zero."""
        return torch.zeros((), device=self.counts.device)


def build_model(catalog: CatalogInfo, config: Config | None = None) -> PopularityRecommender:
    return PopularityRecommender(catalog, config or Config())
