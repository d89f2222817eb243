"""Fuxi-MME: multi-embedding plus mixture-of-experts sequence model (Pan et al. 2025,
arXiv 2510.25285, "Revisiting scalable sequential recommendation with Multi-Embedding Approach and
Mixture-of-Experts").

The paper's two changes to a scalable sequential recommender, and how we build them:

- **Multi-embedding.** "We decompose the conventional single embedding matrix into several
  lower-dimensional embedding matrices" so that each captures a different facet of the items.
  Here: ``M`` tables of width ``d = D / M`` (stored as one ``(N + 1, M * d)`` matrix whose ``M``
  column blocks are the tables). A user's history is looked up in every table and the ``M``
  sequences go through the *same* transformer blocks (shared weights, run as an ``M * B`` batch),
  so adding tables adds embedding parameters but no block parameters. The ``M`` last-position
  outputs are **concatenated** into the ``D``-dim user embedding and an item's embedding is the
  concatenation of its ``M`` rows, so a score is the sum of the per-table dot products (the
  multi-embedding paradigm of Guo et al. 2023, arXiv 2310.04400, where each embedding set
  interacts on its own and the results are summed).
- **Mixture of experts.** "Substituting relevant parameters in the Fuxi Block with an MoE layer":
  each block's feed-forward network is a top-k routed :class:`model.moe.MoE`, trained with the
  Switch/GShard load-balancing loss (:func:`model.moe.load_balancing_loss`, over non-padding
  positions, summed over blocks) weighted by ``Config.aux_loss_weight``.

What we chose where the paper's details are not available to us: the blocks are our pre-norm
softmax-attention :class:`model.layers.Block`, not Fuxi-α's multi-channel attention (Ye et al.
2025, arXiv 2502.03036); positions are learned and counted back from the newest item (newest = 0)
and shared by the ``M`` tables; no per-table marker is added, so the blocks and router see only
the table's content; training is full-softmax cross-entropy from the last position to each of the
``W`` next targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.errors import ConfigError
from model.base import Batch, CatalogInfo, SequentialRecommender
from model.layers import Block, causal_padding_mask, init_weights
from model.moe import MoE, load_balancing_loss
from model.objectives import next_targets_cross_entropy

__all__ = ["Config", "FuxiMME", "build_model"]


@dataclass(frozen=True)
class Config:
    dim: int = 64  # D: the user / item embedding width
    num_tables: int = 4  # M embedding tables of width D / M, sharing the blocks
    heads: int = 2  # attention heads of the width-(D / M) blocks
    layers: int = 2
    max_len: int = 200
    num_experts: int = 4
    top_k: int = 2
    expert_hidden_mult: int = 4  # each expert: d -> mult * d -> d
    aux_loss_weight: float = 0.01
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("dim", "num_tables", "heads", "layers", "max_len", "num_experts", "top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"fuxi_mme: Config.{name} must be >= 1; got {getattr(self, name)}"
                )
        if self.dim % self.num_tables:
            raise ConfigError(
                f"fuxi_mme: Config.dim ({self.dim}) must be divisible by num_tables "
                f"({self.num_tables}): each table is dim / num_tables wide"
            )
        if (self.dim // self.num_tables) % self.heads:
            raise ConfigError(
                f"fuxi_mme: the table width dim / num_tables ({self.dim // self.num_tables}) "
                f"must be divisible by heads ({self.heads})"
            )
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"fuxi_mme: Config.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})"
            )
        if self.aux_loss_weight < 0.0:
            raise ConfigError(
                f"fuxi_mme: Config.aux_loss_weight must be >= 0; got {self.aux_loss_weight}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"fuxi_mme: Config.dropout must be in [0, 1); got {self.dropout}")


class FuxiMME(SequentialRecommender):
    num_interests = 1

    def __init__(self, catalog: CatalogInfo, config: Config) -> None:
        super().__init__()
        self.config = config
        width = config.dim // config.num_tables
        self.width = width
        self.item_emb = nn.Embedding(catalog.num_items + 1, config.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, width)  # 0 = newest item
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(
                width,
                config.heads,
                config.dropout,
                ffn=MoE(
                    width,
                    config.expert_hidden_mult * width,
                    config.num_experts,
                    config.top_k,
                    config.dropout,
                ),
            )
            for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(width)
        init_weights(self)

    def hidden(self, history: Tensor) -> Tensor:
        """(B, M, L, d): the ``M`` tables' sequences after the shared blocks."""
        history = history[:, -self.config.max_len :]
        batch, length = history.shape
        tables = self.config.num_tables
        x = self.item_emb(history).view(batch, length, tables, self.width)
        x = x.transpose(1, 2).reshape(batch * tables, length, self.width)  # table-major per user
        positions = torch.arange(length - 1, -1, -1, device=history.device)
        x = self.drop(x + self.pos_emb(positions))
        valid = (history > 0).repeat_interleave(tables, dim=0)  # (B * M, L)
        mask = causal_padding_mask(valid)
        for block in self.blocks:
            x = block(x, mask)
        out: Tensor = self.ln_f(x)
        return out.view(batch, tables, length, self.width)

    def aux_loss(self, history: Tensor) -> Tensor:
        """Sum over blocks of the load-balancing loss of the last forward, over valid tokens."""
        history = history[:, -self.config.max_len :]
        valid = (history > 0).repeat_interleave(self.config.num_tables, dim=0)
        total = self.item_emb.weight.new_zeros(())
        for block in self.blocks:
            moe = block.ffn
            if not isinstance(moe, MoE) or moe.routing is None:
                raise RuntimeError("aux_loss needs a forward pass through the MoE blocks first")
            total = total + load_balancing_loss(moe.routing, valid)
        return total

    def user_interests(self, batch: Batch) -> Tensor:
        last = self.hidden(batch.history)[:, :, -1, :]  # (B, M, d)
        return last.reshape(last.shape[0], 1, self.config.dim)  # concatenate the M tables

    def item_embeddings(self) -> Tensor:
        return self.item_emb.weight

    def loss(self, batch: Batch) -> Tensor:
        """Next-target cross-entropy plus ``aux_loss_weight`` times the load-balancing loss."""
        user = self.user_interests(batch)[:, 0, :]  # (B, D)
        task = next_targets_cross_entropy(user, self.item_embeddings(), batch.targets)
        return task + self.config.aux_loss_weight * self.aux_loss(batch.history)


def build_model(catalog: CatalogInfo, config: Config | None = None) -> FuxiMME:
    return FuxiMME(catalog, config or Config())
