"""The interest-merge rules against numpy float64 references, and the gate's own training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ConfigError
from model.interest_merge import MERGES, InterestGate, gate_loss, merge_interest_scores


def reference(scores: np.ndarray, rule: str, tau: float, logits: np.ndarray) -> np.ndarray:
    """Per (user, item): max_k s_k; tau log sum_k exp(s_k/tau); tau log sum_k g_k exp(s_k/tau)."""
    if rule == "max":
        return np.asarray(scores.max(axis=1))
    weights = np.ones_like(logits) if rule == "logsumexp" else np.exp(logits)
    weights = weights / weights.sum(axis=1, keepdims=True) if rule == "gate" else weights
    return np.asarray(tau * np.log((weights[:, :, None] * np.exp(scores / tau)).sum(axis=1)))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 6),
    tau=st.sampled_from([0.05, 0.07, 0.2, 1.0]),
    rule=st.sampled_from(["max", "logsumexp", "gate"]),
)
def test_each_rule_equals_its_formula(seed: int, k: int, tau: float, rule: str) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-1, 1, size=(3, k, 11))  # cosine scores
    logits = rng.normal(scale=2.0, size=(3, k))
    merged = merge_interest_scores(
        torch.from_numpy(scores).float(),
        rule,  # type: ignore[arg-type]
        tau,
        torch.from_numpy(logits).float(),
    )
    np.testing.assert_allclose(merged.numpy(), reference(scores, rule, tau, logits), atol=2e-5)


def test_one_interest_leaves_scores_as_they_are_and_uniform_gate_is_logsumexp() -> None:
    scores = torch.tensor([[[0.3, -0.2, 0.9]], [[0.1, 0.5, -1.0]]])  # (2, 1, 3)
    for rule in MERGES:
        merged = merge_interest_scores(scores, rule, 0.07, torch.zeros(2, 1))
        assert torch.allclose(merged, scores[:, 0], atol=1e-6)
    many = torch.randn(4, 3, 9, generator=torch.Generator().manual_seed(0))
    uniform = merge_interest_scores(many, "gate", 0.1, torch.zeros(4, 3))
    soft = merge_interest_scores(many, "logsumexp", 0.1)
    assert torch.allclose(uniform, soft - 0.1 * math.log(3), atol=1e-6)


def test_logsumexp_tends_to_the_max_as_the_temperature_falls() -> None:
    scores = torch.tensor([[[0.30, 0.10], [0.25, 0.12], [0.0, 0.11]]])
    gaps = [
        float((merge_interest_scores(scores, "logsumexp", tau) - scores.amax(dim=1)).max())
        for tau in (0.1, 0.01, 0.001)
    ]
    assert gaps[0] > gaps[1] > gaps[2] > 0 and gaps[2] < 0.001 * math.log(3) + 1e-6


def test_gate_without_logits_and_unknown_rules_are_named() -> None:
    with pytest.raises(ConfigError, match="gate logits"):
        merge_interest_scores(torch.zeros(1, 2, 3), "gate", 0.1)
    with pytest.raises(ConfigError, match="merge must be one of"):
        merge_interest_scores(torch.zeros(1, 2, 3), "mean", 0.1)  # type: ignore[arg-type]


def test_gate_loss_is_the_mixture_cross_entropy_and_trains_only_the_gate() -> None:
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    gate = InterestGate(8)
    interests = F.normalize(torch.randn(2, 3, 8, generator=gen), dim=-1).requires_grad_()
    items = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    items[0] = 0.0
    targets = torch.tensor([[2, 5], [4, 0]])  # the second user has one target
    tau = 0.2
    loss = gate_loss(gate, interests, items, targets, tau)
    # numpy: -log of the target's share of sum_k g_k exp(s_k/tau) over items 1..5
    with torch.no_grad():
        g = gate(interests).softmax(dim=-1).double().numpy()
    s = np.einsum("bkd,nd->bkn", interests.detach().double().numpy(), items.double().numpy())
    mixture = (g[:, :, None] * np.exp(s / tau)).sum(axis=1)[:, 1:]  # (B, 5), items 1..5
    probs = mixture / mixture.sum(axis=1, keepdims=True)
    expected = -np.mean([np.log(probs[0, 1]), np.log(probs[0, 4]), np.log(probs[1, 3])])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    torch.autograd.backward(loss)
    assert interests.grad is None  # the interests learn as if there were no gate
    assert all(p.grad is not None for p in gate.parameters())


def test_a_trained_gate_weights_the_interest_that_predicts_the_targets() -> None:
    """Users' first interest leans one way and predicts their target; the second leans the other
    way and predicts nothing: the gate learns to put most weight on the first."""
    gen = torch.Generator().manual_seed(0)
    users, dim = 64, 8
    axis = F.one_hot(torch.tensor(0), dim).float()
    good = F.normalize(axis + 0.5 * torch.randn(users, dim, generator=gen), dim=-1)
    other = F.normalize(-axis + 0.5 * torch.randn(users, dim, generator=gen), dim=-1)
    interests = torch.stack([good, other], dim=1)  # (U, 2, D)
    items = torch.cat([torch.zeros(1, dim), good, other])  # item u + 1 is user u's good interest
    targets = torch.arange(1, users + 1)[:, None]
    torch.manual_seed(0)
    gate = InterestGate(dim)
    optimiser = torch.optim.Adam(gate.parameters(), lr=1e-2)
    before = float(gate_loss(gate, interests, items, targets, 0.1).detach())
    for _ in range(150):
        loss = gate_loss(gate, interests, items, targets, 0.1)
        optimiser.zero_grad()
        torch.autograd.backward(loss)
        optimiser.step()
    with torch.no_grad():
        weight_on_good = gate(interests).softmax(dim=-1)[:, 0]
    assert float(loss.detach()) < before
    assert float(weight_on_good.mean()) > 0.9
