"""HSTU: hierarchical sequential transduction units (Zhai et al., ICML 2024, "Actions Speak Louder
than Words: Trillion-Parameter Sequential Transducers for Generative Recommendations").

One HSTU layer (the paper's eqs. 1-3), on the pre-normalised input ``LN(X)``:

    U, V, Q, K = Split(SiLU(f1(LN(X))))
    A(X) V(X)  = SiLU(Q K^T + rab^{p,t}) V / n        (pointwise aggregated attention)
    Y(X)       = f2(LN(A(X) V(X)) ⊙ U(X)),   X <- X + Y(X)

The attention weights are **not** normalised over the keys (no softmax): each weight is
``SiLU(score) / n`` with ``n = max_len`` fixed (the reference code divides by the padded length),
so the output grows with the number of relevant past actions, which is the "intensity" signal the
paper argues softmax discards. ``rab^{p,t}`` is a learned relative attention bias: one scalar per
relative position ``i - j`` plus one per bucket of the time gap ``ts_i - ts_j`` (seconds), bucket
``floor(ln(max(|gap|, 1)) / 0.301)`` clipped to ``time_buckets`` (the reference's log bucketing).
The reference measures the gap from the *next* action's time; here it is the query's own action,
so nothing about the target leaks into the history encoding.

Training is next-item prediction at every position with full-softmax cross-entropy (the
reference uses a sampled softmax). The user embedding is the newest position's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError
from model.base import Batch, CatalogInfo, SequentialRecommender
from model.layers import causal_padding_mask, init_weights, last_position
from model.objectives import next_item_cross_entropy
from model.sasrec import recency_positions

__all__ = ["HSTU", "Config", "HSTULayer", "build_model", "pointwise_attention", "time_buckets"]

LOG_BUCKET_DIVISOR = 0.301  # the reference's log bucketing: ln(gap) / 0.301


@dataclass(frozen=True)
class Config:
    dim: int = 64
    heads: int = 2
    layers: int = 2
    dropout: float = 0.2
    max_len: int = 200
    time_buckets: int = 128

    def __post_init__(self) -> None:
        if min(self.dim, self.heads, self.layers, self.max_len, self.time_buckets) < 1:
            raise ConfigError("hstu: dim, heads, layers, max_len and time_buckets must be >= 1")
        if self.dim % self.heads:
            raise ConfigError(f"hstu: dim {self.dim} must be divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"hstu: dropout must be in [0, 1); got {self.dropout}")


def time_buckets(timestamps_s: Tensor, buckets: int) -> Tensor:
    """(B, T, T) bucket of ``ts[i] - ts[j]``: ``floor(ln(max(|gap|, 1)) / 0.301)``, <= buckets."""
    gap = (timestamps_s[:, :, None] - timestamps_s[:, None, :]).abs().clamp(min=1).double()
    return (gap.log() / LOG_BUCKET_DIVISOR).floor().long().clamp(max=buckets)


def pointwise_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, allowed: Tensor, n: int
) -> tuple[Tensor, Tensor]:
    """HSTU's pointwise aggregated attention: weights ``SiLU(q k^T + bias) / n`` where allowed.

    ``q, k, v`` (B, H, T, d); ``bias`` broadcastable to (B, H, T, T); ``allowed`` bool, same.
    Returns (output (B, H, T, d), weights (B, H, T, T)). Rows do not sum to 1.
    """
    weights = F.silu(q @ k.transpose(-2, -1) + bias) / n
    weights = weights * allowed
    return weights @ v, weights


class HSTULayer(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.heads = config.heads
        self.max_len = config.max_len
        self.ln_in = nn.LayerNorm(config.dim)
        self.uvqk = nn.Linear(config.dim, 4 * config.dim)  # f1
        self.ln_attn = nn.LayerNorm(config.dim)
        self.out = nn.Linear(config.dim, config.dim)  # f2
        self.dropout = nn.Dropout(config.dropout)
        self.position_bias = nn.Parameter(torch.zeros(config.max_len))  # by i - j
        self.time_bias = nn.Parameter(torch.zeros(config.time_buckets + 1))  # by time bucket

    def forward(self, x: Tensor, allowed: Tensor, relative: Tensor, buckets: Tensor) -> Tensor:
        """``x`` (B, T, D); ``allowed`` (B, 1, T, T); ``relative`` (T, T) = i - j clipped to
        [0, max_len); ``buckets`` (B, T, T) time buckets."""
        batch, length, dim = x.shape
        u, v, q, k = torch.split(F.silu(self.uvqk(self.ln_in(x))), dim, dim=2)
        shape = (batch, length, self.heads, dim // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        bias = self.position_bias[relative][None] + self.time_bias[buckets]  # (B, T, T)
        attended, _ = pointwise_attention(q, k, v, bias[:, None], allowed, self.max_len)
        attended = attended.transpose(1, 2).reshape(batch, length, dim)
        out: Tensor = x + self.out(self.dropout(self.ln_attn(attended) * u))
        return out


class HSTU(SequentialRecommender):
    def __init__(self, catalog: CatalogInfo, config: Config) -> None:
        super().__init__()
        self.config = config
        self.item = nn.Embedding(catalog.num_items + 1, config.dim, padding_idx=0)
        self.position = nn.Embedding(config.max_len, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(HSTULayer(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.dim)
        init_weights(self)
        for layer in self.layers:
            assert isinstance(layer, HSTULayer)
            nn.init.normal_(layer.position_bias, std=0.02)
            nn.init.normal_(layer.time_bias, std=0.02)

    def encode(self, history: Tensor, history_ts: Tensor) -> Tensor:
        """(B, T, D) states; ``history`` and ``history_ts`` (B, T) left-padded, T <= max_len."""
        valid = history > 0
        length = history.shape[1]
        x = self.item(history) * math.sqrt(self.config.dim)
        x = x + self.position(recency_positions(length, history.device))[None]
        x = self.dropout(x) * valid[..., None]
        allowed = causal_padding_mask(valid)
        index = torch.arange(length, device=history.device)
        relative = (index[:, None] - index[None, :]).clamp(0, self.config.max_len - 1)
        buckets = time_buckets(history_ts, self.config.time_buckets)
        for layer in self.layers:
            x = layer(x, allowed, relative, buckets)
        out: Tensor = self.ln_f(x)
        return out

    def _window(self, batch: Batch) -> tuple[Tensor, Tensor]:
        cut = self.config.max_len
        return batch.history[:, -cut:], batch.history_ts[:, -cut:]

    def user_interests(self, batch: Batch) -> Tensor:
        return last_position(self.encode(*self._window(batch)))[:, None, :]

    def item_embeddings(self) -> Tensor:
        return self.item.weight

    def loss(self, batch: Batch) -> Tensor:
        history, history_ts = self._window(batch)
        hidden = self.encode(history, history_ts)
        return next_item_cross_entropy(hidden, history, batch.targets, self.item.weight)


def build_model(catalog: CatalogInfo, config: Config | None = None) -> HSTU:
    return HSTU(catalog, config or Config())
