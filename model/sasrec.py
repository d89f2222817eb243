"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

Item embeddings (scaled by sqrt(d), as the reference code does) plus learned position embeddings
go through ``layers`` causal pre-norm transformer blocks; the state at position ``t`` predicts the
item at ``t + 1``. The output layer shares the input item table (the paper's eq. 7, ``r = F M^T``).
Training is next-item prediction at every position with the full-softmax cross-entropy over all
items (:mod:`model.objectives`) instead of the paper's binary cross-entropy with one sampled
negative: for ~1.7k items it is cheap and a better estimator. The user embedding is the newest
position's state (one interest).

Positions are counted from the newest item (the newest is position 0), which is what the paper's
fixed-length left-padded input gives; so extra left padding changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.errors import ConfigError
from model.base import Batch, CatalogInfo, SequentialRecommender
from model.layers import Block, causal_padding_mask, init_weights, last_position
from model.objectives import next_item_cross_entropy

__all__ = ["Config", "SASRec", "build_model", "recency_positions"]


@dataclass(frozen=True)
class Config:
    """Defaults follow the paper's ML-1M setting (2 blocks, 1 head, dropout 0.2, n = 200)."""

    dim: int = 64
    heads: int = 1
    layers: int = 2
    dropout: float = 0.2
    max_len: int = 200

    def __post_init__(self) -> None:
        if self.dim < 1 or self.heads < 1 or self.layers < 1 or self.max_len < 1:
            raise ConfigError("sasrec: dim, heads, layers and max_len must be >= 1")
        if self.dim % self.heads:
            raise ConfigError(f"sasrec: dim {self.dim} must be divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"sasrec: dropout must be in [0, 1); got {self.dropout}")


def recency_positions(length: int, device: torch.device) -> Tensor:
    """(length,) position of each column counted from the newest: [length-1, ..., 1, 0]."""
    return torch.arange(length - 1, -1, -1, device=device)


class SASRec(SequentialRecommender):
    def __init__(self, catalog: CatalogInfo, config: Config) -> None:
        super().__init__()
        self.config = config
        self.item = nn.Embedding(catalog.num_items + 1, config.dim, padding_idx=0)
        self.position = nn.Embedding(config.max_len, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.dim, config.heads, config.dropout) for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(config.dim)
        init_weights(self)

    def encode(self, history: Tensor) -> Tensor:
        """(B, T, D) position states for a left-padded ``history`` (B, T), T <= max_len."""
        valid = history > 0
        x = self.item(history) * math.sqrt(self.config.dim)
        x = x + self.position(recency_positions(history.shape[1], history.device))[None]
        x = self.dropout(x) * valid[..., None]  # padding positions carry zeros
        mask = causal_padding_mask(valid)
        for block in self.blocks:
            x = block(x, mask)
        out: Tensor = self.ln_f(x)
        return out

    def user_interests(self, batch: Batch) -> Tensor:
        hidden = self.encode(batch.history[:, -self.config.max_len :])
        return last_position(hidden)[:, None, :]

    def item_embeddings(self) -> Tensor:
        return self.item.weight

    def loss(self, batch: Batch) -> Tensor:
        history = batch.history[:, -self.config.max_len :]
        return next_item_cross_entropy(
            self.encode(history), history, batch.targets, self.item.weight
        )


def build_model(catalog: CatalogInfo, config: Config | None = None) -> SASRec:
    return SASRec(catalog, config or Config())
