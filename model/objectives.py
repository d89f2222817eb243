"""The next-item objective shared by the single-embedding sequence models (SASRec, HSTU).

Every position of the history predicts the item that follows it: position ``t`` predicts
``history[t + 1]``, and the newest position predicts the first training target. The loss is the
full-softmax cross-entropy over the whole catalogue (``-log softmax(h_t E^T)[next_t]``), which is
cheap for a catalogue of ~1.7k items; SASRec's paper used binary cross-entropy with one sampled
negative and the HSTU reference a sampled softmax, both approximations of this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["next_item_cross_entropy", "next_targets_cross_entropy"]


def next_item_cross_entropy(
    hidden: Tensor, history: Tensor, targets: Tensor, item_table: Tensor
) -> Tensor:
    """Mean cross-entropy over every position that has a real item and a real next item.

    ``hidden`` (B, T, D) position states for ``history`` (B, T) (left-padded, newest last);
    ``targets`` (B, W): ``targets[:, 0]`` follows the newest item; ``item_table`` (N + 1, D),
    row 0 = padding, never a valid prediction.
    """
    next_items = torch.cat([history[:, 1:], targets[:, :1]], dim=1)  # (B, T)
    valid = (history > 0) & (next_items > 0)
    logits = hidden[valid].float() @ item_table.float().T  # (positions, N + 1)
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, next_items[valid])


def next_targets_cross_entropy(user: Tensor, items: Tensor, targets: Tensor) -> Tensor:
    """Mean over the non-zero ``targets`` (B, W) of ``-log softmax(user @ items.T)[target]``,
    the softmax over all items 1..N (column 0, padding, excluded): one user embedding predicting
    each of its next W items (PerSRec, Fuxi-MME)."""
    logits = user @ items.T
    logits = torch.cat([torch.full_like(logits[:, :1], float("-inf")), logits[:, 1:]], dim=1)
    log_probs = F.log_softmax(logits, dim=-1)
    valid = targets > 0
    picked = log_probs.gather(1, targets.clamp(min=1))
    return -(picked * valid).sum() / valid.sum().clamp(min=1)
