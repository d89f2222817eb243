"""How a multi-interest model turns its K per-interest scores of an item into one score.

Three rules, over per-interest scores ``s_k = <u_k, e_n>`` (unit vectors, so ``s_k`` in [-1, 1]):

* ``"max"``: ``max_k s_k``, ComiRec's retrieval (each interest retrieves its own top-N; merging the
  lists by score and de-duplicating ranks by the max; Cen et al. 2020, Sec. 3.4).
* ``"logsumexp"``: ``tau * log sum_k exp(s_k / tau)``, the soft maximum at the training temperature
  ``tau``. HyMiRec trains each interest with a softmax over items at ``tau``
  (``model.matching.multi_interest_loss``), so ``exp(s_k / tau)`` is the unnormalised probability
  interest ``k`` gives item ``n``; summing them over interests is the score of a mixture with equal
  weights. It tends to the max as ``tau -> 0``.
* ``"gate"``: ``tau * log sum_k g_k exp(s_k / tau)``, the same mixture with per-user weights
  ``g = softmax(gate logits)`` from :class:`InterestGate`, which reads the user's interests (the
  state serving caches per user, so a gated score needs nothing more than the interests). Uniform
  ``g`` is ``"logsumexp"`` shifted by the constant ``-tau log K``, which does not change a ranking.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError

__all__ = ["MERGES", "InterestGate", "Merge", "gate_loss", "merge_interest_scores"]

Merge = Literal["max", "logsumexp", "gate"]
MERGES: tuple[Merge, ...] = get_args(Merge)


def merge_interest_scores(
    scores: Tensor, rule: Merge, temperature: float, gate_logits: Tensor | None = None
) -> Tensor:
    """(..., N) merged scores from per-interest scores ``scores`` (..., K, N) (module docstring).

    ``gate_logits`` (..., K) are needed by ``"gate"`` only; ``temperature`` by the soft rules.
    """
    if rule == "max":
        return scores.amax(dim=-2)
    if rule == "logsumexp":
        return temperature * torch.logsumexp(scores / temperature, dim=-2)
    if rule == "gate":
        if gate_logits is None:
            raise ConfigError("merge 'gate' needs gate logits (the model has no InterestGate)")
        log_weights = gate_logits.float().log_softmax(dim=-1)[..., None]  # (..., K, 1)
        return temperature * torch.logsumexp(scores / temperature + log_weights, dim=-2)
    raise ConfigError(f"merge must be one of {MERGES}; got {rule!r}")


class InterestGate(nn.Module):
    """Per-user weights over the K interests, conditioned on the whole user state.

    ``logit_k = w^T GELU(W [LN(u_k) ; LN(mean_j u_j)] + b) + c``: each interest is judged beside
    the user's average interest, so the same interest can weigh more for one user than another.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln_interest = nn.LayerNorm(dim)
        self.ln_user = nn.LayerNorm(dim)
        self.hidden = nn.Linear(2 * dim, dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, interests: Tensor) -> Tensor:
        """``interests`` (..., K, D) -> gate logits (..., K)."""
        user = self.ln_user(interests.mean(dim=-2, keepdim=True)).expand_as(interests)
        features = torch.cat([self.ln_interest(interests), user], dim=-1)
        logits: Tensor = self.out(F.gelu(self.hidden(features)))
        return logits.squeeze(-1)


def gate_loss(
    gate: InterestGate, interests: Tensor, items: Tensor, targets: Tensor, temperature: float
) -> Tensor:
    """Negative log-likelihood of the targets under the gated mixture, for the gate alone.

    ``interests`` (B, K, D) and ``items`` (N + 1, D) are detached, so this trains the gate and
    nothing else: the interests learn exactly as without it. Logits over items are the
    ``"gate"`` merge divided by ``tau``; item 0 is excluded; targets (B, W) with 0 = none.
    """
    interests, items = interests.detach().float(), items.detach().float()
    valid = targets > 0
    if not valid.any():
        return interests.new_zeros(())
    scores = torch.einsum("bkd,nd->bkn", interests, items)
    merged = merge_interest_scores(scores, "gate", temperature, gate(interests)) / temperature
    merged[:, 0] = float("-inf")
    log_probs = merged.log_softmax(dim=-1).gather(1, targets)  # (B, W)
    return -log_probs[valid].mean()
