"""Mixture of experts feed-forward layer with top-k routing (Fuxi-MME's MoE, arXiv 2510.25285).

A linear router scores every token against ``E`` experts; each token goes to its ``k`` best
experts and the layer's output is the gate-weighted sum of those experts' outputs (Shazeer et al.
2017, "Outrageously Large Neural Networks", eq. 1-2). The gates are the router's softmax
probabilities of the chosen experts, not renormalised over the top-k (Switch Transformer, Fedus et
al. 2022, eq. 2), so the router gets a gradient from the task loss even when ``k = 1``.

Routing alone tends to collapse onto a few experts, so training adds the Switch/GShard
load-balancing loss ``E * sum_i f_i * P_i`` (Fedus et al. 2022, eq. 4-6; Lepikhin et al. 2021),
where ``f_i`` is the fraction of (token, slot) assignments sent to expert ``i`` and ``P_i`` the
mean router probability of expert ``i``. With ``f`` normalised over the ``k`` slots it is 1.0 when
routing is uniform and approaches ``E`` when every token goes to one expert.

Two implementations of the experts: :meth:`MoE.forward` groups the assignments by expert and runs
all experts as one batched matmul (no loop over experts); :meth:`MoE.forward_reference` is the
plain loop over experts. Tests check that they agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MoE", "Routing", "load_balancing_loss"]


@dataclass
class Routing:
    """One forward's routing decisions for ``T`` tokens (flattened over batch and time)."""

    probs: Tensor  # (T, E) router softmax probabilities
    expert_index: Tensor  # (T, k) chosen experts, best first
    gates: Tensor  # (T, k) the chosen experts' probabilities (the combine weights)

    def combine_weights(self) -> Tensor:
        """(T, E) dense combine weights: ``gates`` at the chosen experts, 0 elsewhere."""
        return torch.zeros_like(self.probs).scatter(1, self.expert_index, self.gates)


def load_balancing_loss(routing: Routing, mask: Tensor | None = None) -> Tensor:
    """Switch/GShard auxiliary loss ``E * sum_i f_i * P_i`` over the tokens where ``mask`` is True.

    ``f_i``: share of the ``T * k`` (token, slot) assignments that went to expert ``i`` (a count,
    no gradient); ``P_i``: mean router probability of expert ``i`` (differentiable).
    """
    probs, index = routing.probs, routing.expert_index
    if mask is not None:
        keep = mask.reshape(-1)
        probs, index = probs[keep], index[keep]
    num_experts = probs.shape[1]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = torch.bincount(index.reshape(-1), minlength=num_experts).to(probs.dtype)
    fraction_routed = counts / index.numel()
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.sum(fraction_routed * mean_prob)


class MoE(nn.Module):
    """Drop-in replacement for :class:`model.layers.MLP`: ``E`` GELU MLP experts, top-k routed.

    After each forward, ``self.routing`` holds that forward's :class:`Routing` so the model can
    compute :func:`load_balancing_loss` over its valid (non-padding) positions.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, dropout: float) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..num_experts={num_experts}, got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        # Expert e's MLP is (w_up[e], b_up[e]) then (w_down[e], b_down[e]), stored stacked.
        self.w_up = nn.Parameter(torch.randn(num_experts, dim, hidden) * 0.02)
        self.b_up = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w_down = nn.Parameter(torch.randn(num_experts, hidden, dim) * 0.02)
        self.b_down = nn.Parameter(torch.zeros(num_experts, dim))
        self.dropout = nn.Dropout(dropout)
        self.routing: Routing | None = None

    def route(self, x: Tensor) -> Routing:
        """Top-k routing of tokens ``x`` (T, D)."""
        probs = F.softmax(self.router(x), dim=-1)
        gates, expert_index = probs.topk(self.top_k, dim=-1)
        return Routing(probs=probs, expert_index=expert_index, gates=gates)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` applied to tokens ``x`` (n, D)."""
        hidden = F.gelu(x @ self.w_up[e] + self.b_up[e])
        return hidden @ self.w_down[e] + self.b_down[e]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.route(tokens)
        self.routing = routing
        out = self._grouped_experts(tokens, routing)
        dropped: Tensor = self.dropout(out)
        return dropped.reshape(shape)

    def forward_reference(self, x: Tensor) -> Tensor:
        """Same as :meth:`forward`, one expert at a time (the plain reference)."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.route(tokens)
        self.routing = routing
        out = torch.zeros_like(tokens)
        for e in range(self.num_experts):
            token_ids, slot = torch.nonzero(routing.expert_index == e, as_tuple=True)
            if token_ids.numel() == 0:
                continue
            gate = routing.gates[token_ids, slot].unsqueeze(-1)
            out = out.index_add(0, token_ids, gate * self.expert(e, tokens[token_ids]))
        dropped: Tensor = self.dropout(out)
        return dropped.reshape(shape)

    def _grouped_experts(self, tokens: Tensor, routing: Routing) -> Tensor:
        """All experts at once: sort assignments by expert, pad each expert's group to the
        largest group, one batched matmul per layer, then scatter-add back weighted by gate."""
        num_tokens, dim = tokens.shape
        k = self.top_k
        expert = routing.expert_index.reshape(-1)  # (T*k,) assignment -> expert
        token_ids = torch.arange(num_tokens, device=tokens.device).repeat_interleave(k)
        gate = routing.gates.reshape(-1)
        order = torch.argsort(expert, stable=True)
        expert, token_ids, gate = expert[order], token_ids[order], gate[order]
        counts = torch.bincount(expert, minlength=self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        # Position of each assignment inside its expert's group: (E, capacity, D) buffer.
        slot = torch.arange(expert.numel(), device=tokens.device) - starts[expert]
        capacity = int(counts.max().item())
        grouped = tokens.new_zeros(self.num_experts, capacity, dim)
        grouped[expert, slot] = tokens[token_ids]
        hidden = F.gelu(torch.bmm(grouped, self.w_up) + self.b_up[:, None, :])
        expert_out = torch.bmm(hidden, self.w_down) + self.b_down[:, None, :]
        weighted = gate.unsqueeze(-1) * expert_out[expert, slot]
        return tokens.new_zeros(num_tokens, dim).index_add(0, token_ids, weighted)
