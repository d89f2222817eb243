"""The mixture-of-experts layer: top-k routing, vectorised = loop reference, load balancing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from model.moe import MoE, Routing, load_balancing_loss


def make_moe(dim: int = 8, experts: int = 4, top_k: int = 2, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(dim, 2 * dim, experts, top_k, dropout=0.0).eval()
    with torch.no_grad():  # spread the router's scores so that top-k has no near-ties
        moe.router.weight.normal_(std=1.0)
    return moe


def test_each_token_goes_to_exactly_its_top_k_experts() -> None:
    moe = make_moe(experts=5, top_k=2)
    routing = moe.route(torch.randn(64, 8))
    assert routing.expert_index.shape == (64, 2)
    # k distinct experts per token, and they are the k most probable ones
    assert all(len(set(row.tolist())) == 2 for row in routing.expert_index)
    kth_best = routing.probs.sort(dim=-1, descending=True).values[:, 1]
    chosen = routing.probs.gather(1, routing.expert_index)
    assert torch.all(chosen >= kth_best[:, None])
    # combine weights: exactly k non-zeros per token, equal to the chosen probabilities
    weights = routing.combine_weights()
    assert torch.all((weights > 0).sum(dim=-1) == 2)
    torch.testing.assert_close(weights.gather(1, routing.expert_index), routing.gates)
    torch.testing.assert_close(routing.gates, chosen)


def test_output_is_gate_weighted_sum_of_chosen_experts() -> None:
    """Hand computation for a single token, independent of both implementations."""
    moe = make_moe(experts=4, top_k=2)
    x = torch.randn(1, 8)
    probs = F.softmax(x @ moe.router.weight.T, dim=-1)[0]
    best = probs.topk(2).indices.tolist()
    expected = sum(probs[e] * moe.expert(e, x)[0] for e in best)
    torch.testing.assert_close(moe(x)[0], expected)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 40),
    dim=st.sampled_from([4, 8]),
    experts=st.integers(1, 6),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_vectorised_equals_loop_reference(
    tokens: int, dim: int, experts: int, data: st.DataObject, seed: int
) -> None:
    top_k = data.draw(st.integers(1, experts))
    moe = make_moe(dim=dim, experts=experts, top_k=top_k, seed=seed)
    x = torch.randn(2, tokens, dim, requires_grad=True)

    fast = moe(x)
    grads_fast = torch.autograd.grad(fast.square().sum(), [x, *moe.parameters()])
    slow = moe.forward_reference(x)
    grads_slow = torch.autograd.grad(slow.square().sum(), [x, *moe.parameters()])

    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    for g_fast, g_slow in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(g_fast, g_slow, atol=1e-6, rtol=1e-5)


def one_hot_routing(experts_of_tokens: list[int], num_experts: int) -> Routing:
    """Every token sure of its expert (probability 1), top-1."""
    index = torch.tensor(experts_of_tokens)[:, None]
    probs = F.one_hot(index[:, 0], num_experts).float()
    return Routing(probs=probs, expert_index=index, gates=probs.gather(1, index))


def test_load_balancing_loss_is_one_for_uniform_routing() -> None:
    num_experts = 4
    balanced = one_hot_routing([t % num_experts for t in range(40)], num_experts)
    assert load_balancing_loss(balanced).item() == pytest.approx(1.0)
    # uniform router probabilities give 1.0 whatever the (tie-broken) assignments
    moe = make_moe(experts=num_experts, top_k=2)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(3, 5, 8))
    assert moe.routing is not None
    assert load_balancing_loss(moe.routing).item() == pytest.approx(1.0)


def test_load_balancing_loss_grows_as_routing_collapses() -> None:
    """Share ``a`` of the tokens on expert 0, the rest spread evenly: the loss is
    ``E * (a^2 + (1 - a)^2 / (E - 1))``, smallest (1.0) at ``a = 1/E``, ``E`` when collapsed."""
    num_experts, tokens = 4, 60
    losses = []
    for on_first in (15, 24, 36, 48, 60):  # 15 = 60 / E: uniform
        rest = [1 + t % (num_experts - 1) for t in range(tokens - on_first)]
        routing = one_hot_routing([0] * on_first + rest, num_experts)
        share = on_first / tokens
        expected = num_experts * (share**2 + (1 - share) ** 2 / (num_experts - 1))
        losses.append(load_balancing_loss(routing).item())
        assert losses[-1] == pytest.approx(expected)
    assert losses[0] == pytest.approx(1.0)
    assert losses[-1] == pytest.approx(num_experts)
    assert losses == sorted(losses)


def test_load_balancing_loss_skips_masked_tokens() -> None:
    routing = one_hot_routing([0, 1, 0, 0], num_experts=2)
    mask = torch.tensor([True, True, False, False])
    assert load_balancing_loss(routing, mask).item() == pytest.approx(1.0)
    assert load_balancing_loss(routing).item() > 1.0


def top_expert_share_after_training(aux_weight: float, steps: int = 150) -> float:
    """Regress a random teacher with a top-1 MoE whose router starts collapsed on expert 0."""
    torch.manual_seed(0)
    dim, num_experts = 8, 4
    moe = MoE(dim, 16, num_experts, top_k=1, dropout=0.0)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(dim, 32), torch.nn.Tanh(), torch.nn.Linear(32, dim)
    )
    x = torch.randn(256, dim)
    x[:, 0] += 3.0  # a feature every token shares...
    with torch.no_grad():
        y = teacher(x)
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0  # ...that the router reads as "expert 0"
        assert moe.route(x).expert_index.eq(0).all()
    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-2)
    for _ in range(steps):
        out = moe(x)
        assert moe.routing is not None
        loss = F.mse_loss(out, y) + aux_weight * load_balancing_loss(moe.routing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        counts = torch.bincount(moe.route(x).expert_index[:, 0], minlength=num_experts)
    return counts.max().item() / x.shape[0]


def test_training_with_aux_loss_spreads_load() -> None:
    without = top_expert_share_after_training(aux_weight=0.0)
    with_aux = top_expert_share_after_training(aux_weight=0.1)
    assert without > 0.9  # stays collapsed
    assert with_aux < 0.5  # close to the uniform 0.25
