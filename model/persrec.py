"""PerSRec: a long history compressed into learnable tokens (Zhang et al. 2026, arXiv 2601.03479).

The paper compresses a user's older interactions into ``k`` learnable "personalized expert" tokens
and predicts from those tokens plus only the recent items, so serving recomputes just the recent
part: the tokens' attention state is computed once per user and cached ("KV caching of expert
activations"). What we follow, from the paper and its reference code (facebookresearch/PerSRec,
``code/REC/model/IDNet/hstu.py``, ``PersonalizedHSTU``):

- one sequence ``[old items | k tokens | recent R items]``; the ``k`` tokens are one learnable
  ``(k, D)`` parameter shared by all users (``self.user_embedding`` there), personalised only by
  what they attend to;
- the mask is causal over the whole sequence and padding-aware, minus one block: recent items may
  not attend to old items (``get_attention_mask(item_segments=...)``). So tokens see the old items
  and the earlier tokens (causal among themselves, as in the reference), recent items see all
  tokens and the earlier recent items, and old items never see the tokens or the recent items;
- the user embedding is the last recent position's output.

What we chose where the paper's details are not ours to copy or do not fit this interface:

- blocks are our pre-norm softmax-attention :class:`model.layers.Block` (the paper wraps HSTU and
  HLLM); a final LayerNorm as in nanoGPT;
- positions are learned and counted back from the newest item, skipping the tokens (newest = 0),
  and the tokens carry no position embedding (each token is its own parameter). Unlike the
  reference's absolute positions with a fixed old-segment length, this makes a user's output
  independent of left padding and of how long the old segment is;
- the cache is each layer's *input* hidden states at the token positions, ``(layers, B, k, D)``.
  A recent query at layer ``l`` attends to the tokens' keys and values, which are a function of
  exactly those states, so re-running each block on ``[cached token states | recent states]`` and
  keeping only the recent rows is exact (the reference caches the per-layer k/v instead; ours
  reuses :class:`Block` unchanged and costs ``k`` extra rows per layer);
- training is next-item full-softmax cross-entropy from the last position to each of the ``W``
  targets; the reference also puts a loss on every item position (``loss_on_all_items``). The
  uncached one-pass forward (:meth:`PerSRec.hidden`) is what training runs; serving runs
  :meth:`PerSRec.encode_old` once and then :meth:`PerSRec.interests_from_cache`, and
  :meth:`PerSRec.user_interests` is those two calls back to back. Tests check both give the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError
from model.base import Batch, CatalogInfo, SequentialRecommender
from model.layers import Block, init_weights
from model.objectives import next_targets_cross_entropy

__all__ = [
    "Config",
    "PerSRec",
    "PerSRecCache",
    "build_model",
    "next_targets_cross_entropy",
    "persrec_mask",
]


@dataclass(frozen=True)
class Config:
    dim: int = 64
    heads: int = 2
    layers: int = 2
    num_tokens: int = 4  # k learnable tokens
    recent_len: int = 50  # R recent items recomputed at every request
    max_len: int = 200  # the newest max_len history items are used (old = max_len - R)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("dim", "heads", "layers", "num_tokens", "recent_len", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"persrec: Config.{name} must be >= 1; got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ConfigError(f"persrec: Config.dim ({self.dim}) must be divisible by heads")
        if self.recent_len >= self.max_len:
            raise ConfigError(
                f"persrec: Config.recent_len ({self.recent_len}) must be below max_len "
                f"({self.max_len}) so that some history is old and goes into the tokens"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"persrec: Config.dropout must be in [0, 1); got {self.dropout}")


@dataclass
class PerSRecCache:
    """Per-user state of the tokens after reading the old history: each block's input at the
    token positions, ``(layers, B, k, D)``."""

    token_states: Tensor


def persrec_mask(old_valid: Tensor, num_tokens: int, recent_valid: Tensor) -> Tensor:
    """(B, 1, T, T) boolean mask over ``[old | tokens | recent]`` (True = may attend).

    Causal and padding-aware over the whole sequence, except that recent rows may not see old
    columns: recent items reach the old history only through the tokens.
    """
    batch, old_len = old_valid.shape
    tokens_valid = old_valid.new_ones(batch, num_tokens)
    valid = torch.cat([old_valid, tokens_valid, recent_valid], dim=1)
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    causal[old_len + num_tokens :, :old_len] = False  # recent -/-> old
    return (causal[None, :, :] & valid[:, None, :])[:, None, :, :]


class PerSRec(SequentialRecommender):
    num_interests = 1

    def __init__(self, catalog: CatalogInfo, config: Config) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(catalog.num_items + 1, config.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)  # 0 = newest item
        self.tokens = nn.Parameter(torch.zeros(config.num_tokens, config.dim))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.dim, config.heads, config.dropout) for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(config.dim)
        init_weights(self)
        nn.init.normal_(self.tokens, std=0.02)

    # -- inputs -------------------------------------------------------------------------------

    def split_history(self, history: Tensor) -> tuple[Tensor, Tensor]:
        """(old, recent): the last ``recent_len`` columns are recent, up to ``max_len`` in all.
        Shorter histories are left-padded so that ``recent`` always has ``recent_len`` columns."""
        history = history[:, -self.config.max_len :]
        recent_len = self.config.recent_len
        if history.shape[1] < recent_len:
            history = F.pad(history, (recent_len - history.shape[1], 0))
        return history[:, :-recent_len], history[:, -recent_len:]

    def _embed(self, items: Tensor, newest_position: int) -> Tensor:
        """Item plus position embeddings; the last column gets ``newest_position``."""
        length = items.shape[1]
        positions = torch.arange(
            newest_position + length - 1, newest_position - 1, -1, device=items.device
        )
        embedded: Tensor = self.item_emb(items) + self.pos_emb(positions)
        return embedded

    def _tokens(self, batch: int) -> Tensor:
        return self.tokens.unsqueeze(0).expand(batch, -1, -1)

    # -- the one-pass reference (training) ----------------------------------------------------

    def hidden(self, history: Tensor) -> Tensor:
        """(B, old + k + R, D) final states of ``[old | tokens | recent]`` in one masked pass."""
        old, recent = self.split_history(history)
        recent_len = self.config.recent_len
        x = torch.cat(
            [self._embed(old, recent_len), self._tokens(old.shape[0]), self._embed(recent, 0)],
            dim=1,
        )
        mask = persrec_mask(old > 0, self.config.num_tokens, recent > 0)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, mask)
        out: Tensor = self.ln_f(x)
        return out

    # -- the serving path: cache the tokens, recompute only the recent items -------------------

    def encode_old(self, old: Tensor) -> PerSRecCache:
        """Read the old history ``old`` (B, L_old) into the tokens; cache their per-layer states."""
        num_tokens = self.config.num_tokens
        x = torch.cat([self._embed(old, self.config.recent_len), self._tokens(old.shape[0])], 1)
        valid = torch.cat([old > 0, old.new_ones(old.shape[0], num_tokens, dtype=torch.bool)], 1)
        length = valid.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=old.device).tril()
        mask = (causal[None] & valid[:, None, :])[:, None]
        x = self.drop(x)
        # The cache holds each block's input at the token rows, so the last block is not run.
        states = [x[:, -num_tokens:]]
        for block in self.blocks[:-1]:
            x = block(x, mask)
            states.append(x[:, -num_tokens:])
        return PerSRecCache(token_states=torch.stack(states))

    def interests_from_cache(self, cache: PerSRecCache, recent: Tensor) -> Tensor:
        """(B, 1, D) user embedding from cached token states and the ``recent`` (B, R) items."""
        num_tokens = self.config.num_tokens
        batch, recent_len = recent.shape
        recent_valid = recent > 0
        # Rows: [tokens | recent]. Recent rows see every token and earlier valid recent items;
        # token rows see the tokens only (their outputs are discarded: the cache has them).
        valid = torch.cat([recent.new_ones(batch, num_tokens, dtype=torch.bool), recent_valid], 1)
        length = num_tokens + recent_len
        causal = torch.ones(length, length, dtype=torch.bool, device=recent.device).tril()
        mask = (causal[None] & valid[:, None, :])[:, None]
        h = self.drop(self._embed(recent, 0))
        for block, token_states in zip(self.blocks, cache.token_states, strict=True):
            h = block(torch.cat([token_states, h], dim=1), mask)[:, num_tokens:]
        user: Tensor = self.ln_f(h[:, -1:, :])
        return user

    # -- SequentialRecommender ----------------------------------------------------------------

    def user_interests(self, batch: Batch) -> Tensor:
        """The serving path with nothing cached: encode the old part, then the recent part."""
        old, recent = self.split_history(batch.history)
        return self.interests_from_cache(self.encode_old(old), recent)

    def item_embeddings(self) -> Tensor:
        return self.item_emb.weight

    def loss(self, batch: Batch) -> Tensor:
        """Full-softmax cross-entropy of each next target from the last position's state."""
        user = self.hidden(batch.history)[:, -1, :]  # (B, D)
        return next_targets_cross_entropy(user, self.item_embeddings(), batch.targets)


def build_model(catalog: CatalogInfo, config: Config | None = None) -> PerSRec:
    return PerSRec(catalog, config or Config())
