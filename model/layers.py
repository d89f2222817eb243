"""Transformer pieces shared by the sequence models (nanoGPT-style, pre-norm).

``attn_mask`` everywhere is a boolean tensor broadcastable to (B, heads, T, T) where ``True``
means "may attend". Helpers build the usual masks: causal, padding, and their combination.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "Block",
    "SelfAttention",
    "causal_padding_mask",
    "init_weights",
    "last_position",
]


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with an explicit boolean mask."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)
        shape = (batch, length, self.heads, dim // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        # A row with no allowed key (a padded query) would give NaN: let it see itself.
        eye = torch.eye(length, dtype=torch.bool, device=x.device)
        mask = attn_mask | (~attn_mask.any(dim=-1, keepdim=True) & eye)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        merged: Tensor = self.proj(out.transpose(1, 2).reshape(batch, length, dim))
        return merged

    def forward_last(self, x: Tensor, attn_mask: Tensor, rows: int) -> Tensor:
        """``forward(x, attn_mask)[:, -rows:]`` without computing the other rows' outputs: the
        same operations on the rows kept (the keys and values of every position are still
        needed), so the same numbers up to float rounding (a single row may take another kernel;
        ``tests/model/test_layers.py``)."""
        batch, length, dim = x.shape
        weight, bias = self.qkv.weight, self.qkv.bias
        k, v = torch.split(F.linear(x, weight[dim:], bias[dim:]), dim, dim=2)
        q = F.linear(x[:, -rows:], weight[:dim], bias[:dim])
        head_dim = dim // self.heads
        q = q.view(batch, rows, self.heads, head_dim).transpose(1, 2)
        k, v = (t.view(batch, length, self.heads, head_dim).transpose(1, 2) for t in (k, v))
        eye = torch.eye(length, dtype=torch.bool, device=x.device)[-rows:]
        mask = attn_mask[..., -rows:, :]
        mask = mask | (~mask.any(dim=-1, keepdim=True) & eye)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        merged: Tensor = self.proj(out.transpose(1, 2).reshape(batch, rows, dim))
        return merged


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.dropout(self.down(F.gelu(self.up(x))))
        return out


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + ffn(ln(x)). ``ffn`` is replaceable."""

    def __init__(self, dim: int, heads: int, dropout: float, ffn: nn.Module | None = None) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = ffn if ffn is not None else MLP(dim, 4 * dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), attn_mask))
        ffn_out: Tensor = self.ffn(self.ln2(x))
        return x + ffn_out

    def forward_last(self, x: Tensor, attn_mask: Tensor, rows: int) -> Tensor:
        """``forward(x, attn_mask)[:, -rows:]``, computing only those rows (the last block of a
        model whose output is read at its last positions)."""
        attended: Tensor = self.attn.forward_last(self.ln1(x), attn_mask, rows)
        out: Tensor = x[:, -rows:] + self.dropout(attended)
        ffn_out: Tensor = self.ffn(self.ln2(out))
        return out + ffn_out


def causal_padding_mask(valid: Tensor) -> Tensor:
    """(B, 1, T, T) mask: query t may see key s when s <= t and s is not padding."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    return (causal[None, :, :] & valid[:, None, :])[:, None, :, :]


def last_position(hidden: Tensor) -> Tensor:
    """(B, D) the newest position's state (histories are left-padded, newest last)."""
    return hidden[:, -1, :]


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) for linear and embedding weights, zeros for biases (nanoGPT's init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
