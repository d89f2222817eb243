"""SASRec and HSTU mechanisms: causality, padding invariance, pointwise attention, time bias."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import hstu, sasrec
from model.base import SequentialRecommender
from tests.model.offline_fixtures import batch_of, tiny_catalog

NUM_ITEMS = 30
HISTORY = torch.tensor([[0, 0, 4, 9, 2, 17, 5], [3, 8, 1, 1, 6, 22, 30]])


def build(name: str) -> SequentialRecommender:
    torch.manual_seed(0)
    catalog = tiny_catalog(NUM_ITEMS)
    if name == "sasrec":
        return sasrec.build_model(
            catalog, sasrec.Config(dim=16, heads=2, layers=2, max_len=12)
        ).eval()
    return hstu.build_model(catalog, hstu.Config(dim=16, heads=2, layers=2, max_len=12)).eval()


def hidden(model: SequentialRecommender, history: torch.Tensor, ts: torch.Tensor | None = None):
    batch = batch_of(history, ts)
    if isinstance(model, sasrec.SASRec):
        return model.encode(batch.history)
    assert isinstance(model, hstu.HSTU)
    return model.encode(batch.history, batch.history_ts)


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_causal_a_later_item_does_not_change_earlier_positions(name: str) -> None:
    model = build(name)
    changed = HISTORY.clone()
    changed[:, -1] = torch.tensor([11, 12])
    with torch.no_grad():
        before, after = hidden(model, HISTORY), hidden(model, changed)
    assert torch.allclose(before[:, :-1], after[:, :-1], atol=1e-6)
    assert not torch.allclose(before[:, -1], after[:, -1], atol=1e-4)


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_more_left_padding_does_not_change_the_user_embedding(name: str) -> None:
    model = build(name)
    padded = F.pad(HISTORY, (4, 0))
    ts = 1_000_000 + 60 * torch.arange(HISTORY.shape[1]).expand_as(HISTORY)
    ts = torch.where(HISTORY > 0, ts, 0)
    with torch.no_grad():
        short = model.user_interests(batch_of(HISTORY, ts))
        long = model.user_interests(batch_of(padded, F.pad(ts, (4, 0))))
    assert short.shape == (2, 1, 16)
    assert torch.allclose(short, long, atol=1e-5)


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_histories_longer_than_max_len_keep_the_newest(name: str) -> None:
    model = build(name)  # max_len 12
    long = torch.randint(1, NUM_ITEMS + 1, (2, 20))
    with torch.no_grad():
        full = model.user_interests(batch_of(long))
        newest = model.user_interests(batch_of(long[:, -12:], batch_of(long).history_ts[:, -12:]))
    assert torch.allclose(full, newest, atol=1e-6)


def test_pointwise_attention_is_silu_over_n_and_not_normalised() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 3, generator=gen) for _ in range(3))
    bias = torch.randn(1, 1, 4, 4, generator=gen)
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    out, weights = hstu.pointwise_attention(q, k, v, bias, allowed, n=7)
    for i in range(4):
        for j in range(4):
            s = float(q[0, 0, i] @ k[0, 0, j] + bias[0, 0, i, j])
            expected = s / (1 + math.exp(-s)) / 7 if j <= i else 0.0  # SiLU(s) / n
            assert float(weights[0, 0, i, j]) == pytest.approx(expected, abs=1e-6)
    assert not torch.allclose(weights.sum(-1), torch.ones(4))
    assert torch.allclose(out, weights @ v)


def test_pointwise_attention_grows_with_repeated_evidence_where_softmax_averages() -> None:
    # One query, m identical keys and values: softmax returns v whatever m is; HSTU returns
    # m * SiLU(s) / n * v, i.e. it counts how much past evidence there is.
    q, key, value = torch.ones(1, 1, 1, 2), torch.tensor([0.5, 1.0]), torch.tensor([1.0, -2.0])
    outputs = []
    for m in (1, 2, 4):
        k, v = key.expand(1, 1, m, 2), value.expand(1, 1, m, 2)
        allowed = torch.ones(1, 1, 1, m, dtype=torch.bool)
        out, _ = hstu.pointwise_attention(q, k, v, torch.zeros(1, 1, 1, m), allowed, n=8)
        softmax = F.scaled_dot_product_attention(q, k, v)
        assert torch.allclose(softmax[0, 0, 0], value)
        outputs.append(out[0, 0, 0])
    assert torch.allclose(outputs[1], 2 * outputs[0]) and torch.allclose(outputs[2], 4 * outputs[0])


def test_time_buckets_by_hand() -> None:
    ts = torch.tensor([[0, 1, 3, 3603, 10**9]])
    buckets = hstu.time_buckets(ts, buckets=40)
    assert buckets[0, 0].tolist() == [
        0,  # gap 0 -> clamp to 1 -> ln 1 = 0
        0,  # gap 1
        math.floor(math.log(3) / 0.301),  # 3
        math.floor(math.log(3603) / 0.301),  # 27
        40,  # ln(1e9) / 0.301 = 68.8 -> clipped to the last bucket
    ]
    assert torch.equal(buckets, buckets.transpose(1, 2))  # |gap|: symmetric


def test_time_bias_changes_the_output_when_only_timestamps_change() -> None:
    model = build("hstu")
    ts_minutes = torch.where(HISTORY > 0, 60 * torch.arange(7), 0) + 1_000_000
    ts_months = torch.where(HISTORY > 0, 2_592_000 * torch.arange(7), 0) + 1_000_000
    with torch.no_grad():
        a = model.user_interests(batch_of(HISTORY, ts_minutes))
        b = model.user_interests(batch_of(HISTORY, ts_months))
        assert not torch.allclose(a, b, atol=1e-5)
        for layer in model.layers:
            assert isinstance(layer, hstu.HSTULayer)
            layer.time_bias.zero_()  # a constant time bias: timestamps no longer matter
        a = model.user_interests(batch_of(HISTORY, ts_minutes))
        b = model.user_interests(batch_of(HISTORY, ts_months))
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_loss_is_full_softmax_next_item_cross_entropy(name: str) -> None:
    model = build(name)
    batch = batch_of(HISTORY)
    batch.targets = torch.tensor([[7], [0]])  # user 1 has no target after its history
    with torch.no_grad():
        states = hidden(model, HISTORY)
        table = model.item_embeddings()
        terms = []
        for u, row in enumerate(HISTORY.tolist()):
            following = [*row[1:], int(batch.targets[u, 0])]
            for t, (item, nxt) in enumerate(zip(row, following, strict=True)):
                if item and nxt:
                    logits = states[u, t] @ table[1:].T
                    terms.append(-torch.log_softmax(logits, 0)[nxt - 1])
        assert float(model.loss(batch)) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
