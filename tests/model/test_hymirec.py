"""HyMiRec: codes-only long history, item-encoder recent items, K interests, cache, learning."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from features.codebook import ResidualCodebook
from model.base import Batch, CatalogInfo
from model.hymirec_model import Config, HyMiRec, build_model
from model.interest_merge import Merge

NUM_ITEMS, TEXT_DIM, LEVELS, SIZE = 40, 16, 2, 8
TINY = Config(dim=16, heads=2, layers=1, recent_len=6, coarse_interests=2, interests=3, dropout=0.0)


def make_catalog(text: torch.Tensor, seed: int = 0) -> CatalogInfo:
    """A catalog whose codes come from a residual codebook fitted on ``text`` (row 0 = pad)."""
    book = ResidualCodebook.fit(text[1:].numpy(), LEVELS, SIZE, iters=5, seed=seed)
    codes = np.full((text.shape[0], LEVELS), book.UNKNOWN, dtype=np.int64)
    codes[1:] = book.encode(text[1:].numpy())
    return CatalogInfo(
        num_items=text.shape[0] - 1,
        text_embeddings=text,
        codes=torch.from_numpy(codes),
        codebook_centroids=torch.from_numpy(book.centroids.copy()),
        codebook_scales=torch.from_numpy(book.scales.copy()),
        genres=[frozenset()] * text.shape[0],
    )


def random_text(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(NUM_ITEMS + 1, TEXT_DIM, generator=gen), dim=-1)
    text[0] = 0.0
    return text


def batch_of(history: torch.Tensor, targets: torch.Tensor | None = None) -> Batch:
    if targets is None:
        targets = torch.zeros(history.shape[0], 2, dtype=torch.long)
    return Batch(torch.arange(history.shape[0]), history, history.clone(), targets, targets.clone())


def model_for(catalog: CatalogInfo, config: Config = TINY, seed: int = 0) -> HyMiRec:
    torch.manual_seed(seed)
    model = build_model(catalog, config)
    assert isinstance(model, HyMiRec)
    return model.eval()


# Two users: the long part (all but the last 6) holds items 1..4, the recent part items 10..15.
HISTORY = torch.tensor([[0, 1, 2, 3, 10, 11, 12, 13, 14, 15], [1, 4, 2, 3, 15, 14, 13, 12, 11, 10]])
LONG_ONLY, RECENT_ONLY = 4, 12


@pytest.fixture(scope="module")
def catalog() -> CatalogInfo:
    return make_catalog(random_text())


@torch.no_grad()
def interests_with(catalog: CatalogInfo) -> torch.Tensor:
    return model_for(catalog).user_interests(batch_of(HISTORY))


def test_long_history_is_rebuilt_from_codes_not_from_text(catalog: CatalogInfo) -> None:
    before = interests_with(catalog)
    text = catalog.text_embeddings.clone()
    text[LONG_ONLY] = -text[LONG_ONLY]  # an item seen only in the long part: text unused
    assert torch.allclose(
        interests_with(dataclasses.replace(catalog, text_embeddings=text)), before, atol=1e-6
    )
    codes = catalog.codes.clone()
    codes[LONG_ONLY] = (codes[LONG_ONLY] + 1) % SIZE  # ...but its codes are
    changed = interests_with(dataclasses.replace(catalog, codes=codes))
    assert not torch.allclose(changed[1], before[1], atol=1e-4)
    assert torch.allclose(changed[0], before[0], atol=1e-6)  # user 0 never saw that item


def test_recent_items_go_through_the_item_encoder(catalog: CatalogInfo) -> None:
    before = interests_with(catalog)
    text = catalog.text_embeddings.clone()
    text[RECENT_ONLY] = -text[RECENT_ONLY]
    assert not torch.allclose(
        interests_with(dataclasses.replace(catalog, text_embeddings=text)), before, atol=1e-4
    )
    codes = catalog.codes.clone()
    codes[RECENT_ONLY] = (codes[RECENT_ONLY] + 1) % SIZE  # recent items are not decoded
    assert torch.allclose(
        interests_with(dataclasses.replace(catalog, codes=codes)), before, atol=1e-6
    )


def test_decoder_fast_path_equals_codebook_decode_then_adapter(catalog: CatalogInfo) -> None:
    model = model_for(catalog)
    book = ResidualCodebook(catalog.codebook_centroids.numpy(), catalog.codebook_scales.numpy())
    codes = catalog.codes[HISTORY]  # (B, L, levels), row 0 UNKNOWN
    reference = model.items.adapter(
        torch.from_numpy(book.decode(codes.reshape(-1, LEVELS).numpy()))
    ).reshape(*codes.shape[:2], -1)
    fast = model.decoder(codes, model.items.adapter)
    assert torch.allclose(fast, reference, atol=1e-5)


def test_k_interests_are_unit_vectors_that_differ(catalog: CatalogInfo) -> None:
    out = interests_with(catalog)
    assert out.shape == (2, TINY.interests, TINY.dim)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, TINY.interests), atol=1e-5)
    cosines = out @ out.transpose(1, 2)
    off_diagonal = ~torch.eye(TINY.interests, dtype=torch.bool)
    assert cosines[:, off_diagonal].max() < 0.99


@pytest.mark.parametrize("merge", ["max", "logsumexp", "gate"])
def test_item_embeddings_are_what_score_all_ranks_with(catalog: CatalogInfo, merge: Merge) -> None:
    model = model_for(catalog, dataclasses.replace(TINY, merge=merge))
    batch = batch_of(HISTORY)
    with torch.no_grad():
        for weight in model.gate.parameters():  # far from uniform (its init is nearly uniform)
            weight.normal_(std=1.0)
        items = model.item_embeddings()
        interests = model.user_interests(batch)
        gate = model.gate(interests).double().numpy()  # (B, K)
        scores = model.score_all(batch)
    # numpy float64 reference of each merge rule (model/interest_merge.py's docstring)
    s = np.einsum("bkd,nd->bkn", interests.double().numpy(), items.double().numpy())
    tau = TINY.temperature
    weights = np.exp(gate) / np.exp(gate).sum(axis=1, keepdims=True)
    expected = {
        "max": s.max(axis=1),
        "logsumexp": tau * np.log(np.exp(s / tau).sum(axis=1)),
        "gate": tau * np.log((weights[:, :, None] * np.exp(s / tau)).sum(axis=1)),
    }[merge]
    assert items.shape == (NUM_ITEMS + 1, TINY.dim)
    np.testing.assert_allclose(scores[:, 1:].numpy(), expected[:, 1:], rtol=1e-5, atol=1e-6)
    assert torch.isinf(scores[:, 0]).all()
    with torch.no_grad():  # one user's cached (K, D) interests, as serving scores them
        one_user = model.interest_scores(interests[1], items)
    np.testing.assert_allclose(one_user[1:].numpy(), expected[1, 1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_ids", [True, False])
def test_id_embedding_switch(catalog: CatalogInfo, use_ids: bool) -> None:
    text = catalog.text_embeddings.clone()
    text[2] = text[1]  # two items with the same text
    model = model_for(
        dataclasses.replace(catalog, text_embeddings=text),
        dataclasses.replace(TINY, use_id_embedding=use_ids),
    )
    with torch.no_grad():
        items = model.item_embeddings()
    assert torch.allclose(items[1], items[2]) is not use_ids  # only IDs tell them apart


@pytest.mark.parametrize("width", [3, 6, 10])  # shorter than, equal to, longer than R
def test_left_padding_does_not_change_the_interests(catalog: CatalogInfo, width: int) -> None:
    model = model_for(catalog)
    history = HISTORY[:, -width:]
    with torch.no_grad():
        plain = model.user_interests(batch_of(history))
        padded = model.user_interests(batch_of(F.pad(history, (7, 0))))
    assert torch.allclose(plain, padded, atol=1e-6)


def test_cached_path_equals_user_interests(catalog: CatalogInfo) -> None:
    model = model_for(catalog)
    long, recent = HISTORY[:, : -TINY.recent_len], HISTORY[:, -TINY.recent_len :]
    with torch.no_grad():
        coarse = model.encode_long(catalog.codes[long])  # what serving fetches: codes only
        cached = model.refine(coarse, recent)
        assert coarse.shape == (2, TINY.coarse_interests, TINY.dim)
        assert torch.allclose(cached, model.user_interests(batch_of(HISTORY)), atol=1e-6)
        # A user with no long history: an empty code sequence pools nothing, no NaN.
        empty = model.encode_long(torch.zeros(2, 0, LEVELS, dtype=torch.long))
        short = model.user_interests(batch_of(recent))
        assert torch.isfinite(short).all()
        assert torch.allclose(model.refine(empty, recent), short, atol=1e-6)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        Config(dim=10, heads=3)
    with pytest.raises(ConfigError, match="assignment"):
        Config(assignment="nearest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dense_weight"):
        Config(dense_weight=-1.0)


def two_cluster_task(seed: int) -> tuple[CatalogInfo, Batch]:
    """Items 1..20 and 21..40 form two text clusters; every user's history mixes both, and
    their next 4 items are 2 from each cluster."""
    gen = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(2, TEXT_DIM, generator=gen), dim=-1)
    cluster = torch.tensor([0] + [0] * 20 + [1] * 20)
    noise = 0.3 * torch.randn(NUM_ITEMS + 1, TEXT_DIM, generator=gen)
    text = F.normalize(centers[cluster] + noise, dim=-1)
    text[0] = 0.0
    users, length = 32, 12
    first = torch.randint(1, 21, (users, length + 2), generator=gen)
    second = torch.randint(21, 41, (users, length + 2), generator=gen)
    history = torch.where(
        torch.rand(users, length, generator=gen) < 0.5, first[:, :length], second[:, :length]
    )
    targets = torch.cat([first[:, length:], second[:, length:]], dim=1)
    return make_catalog(text, seed), batch_of(history, targets)


def test_hungarian_training_splits_two_interests_over_the_two_clusters() -> None:
    catalog, batch = two_cluster_task(seed=0)
    config = dataclasses.replace(  # the interests' loss alone (the gate's: test_interest_merge)
        TINY, interests=2, recent_len=8, assignment="hungarian", gate_weight=0.0
    )
    model = model_for(catalog, config).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = model.loss(batch)
        optimiser.zero_grad()
        torch.autograd.backward(loss)
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    model.eval()
    with torch.no_grad():
        scores = torch.einsum("bkd,nd->bkn", model.user_interests(batch), model.item_embeddings())
    # (B, K) how much each interest prefers cluster 1 over cluster 2
    preference = scores[:, :, 1:21].mean(dim=-1) - scores[:, :, 21:].mean(dim=-1)
    opposite = preference[:, 0] * preference[:, 1] < 0
    assert opposite.float().mean() > 0.9  # for (nearly) every user, one interest per cluster


def test_dense_loss_equals_hand_computed_cross_entropy(catalog: CatalogInfo) -> None:
    model = model_for(catalog, dataclasses.replace(TINY, temperature=0.5))
    items = F.normalize(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    states = F.normalize(torch.tensor([[[9.0, 9.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]]), dim=-1)
    recent = torch.tensor([[0, 1, 2, 3]])  # position 0 is padding; 3 -> target 1
    targets = torch.tensor([[1, 2]])
    # (position, next item): (1, 2), (2, 3), (3, target 1); softmax over items 1..3 at tau 0.5
    expected = 0.0
    for position, nxt in [(1, 2), (2, 3), (3, 1)]:
        logits = [float(states[0, position] @ items[n]) / 0.5 for n in (1, 2, 3)]
        expected -= logits[nxt - 1] - math.log(sum(math.exp(v) for v in logits))
    got = model.dense_loss(states, recent, targets, items)
    assert got.item() == pytest.approx(expected / 3, rel=1e-5)


def test_recent_states_do_not_see_the_items_they_predict(catalog: CatalogInfo) -> None:
    model = model_for(catalog)
    long, recent = HISTORY[:, : -TINY.recent_len], HISTORY[:, -TINY.recent_len :]
    changed = recent.clone()
    changed[:, 3:] = 20  # the items positions 0..2 predict (and later ones)
    with torch.no_grad():
        coarse = model.encode_long(catalog.codes[long])
        _, before = model._refine(coarse, recent)
        _, after = model._refine(coarse, changed)
    assert torch.allclose(before[:, :3], after[:, :3], atol=1e-6)
    assert not torch.allclose(before[:, 3:], after[:, 3:], atol=1e-4)


def test_dense_weight_adds_the_weighted_dense_loss(catalog: CatalogInfo) -> None:
    targets = torch.tensor([[20, 21], [22, 0]])
    batch = batch_of(HISTORY, targets)
    plain = model_for(catalog, dataclasses.replace(TINY, dense_weight=0.0))
    dense = model_for(catalog, dataclasses.replace(TINY, dense_weight=0.5))
    long, recent = HISTORY[:, : -TINY.recent_len], HISTORY[:, -TINY.recent_len :]
    with torch.no_grad():
        _, states = dense._refine(dense.encode_long(catalog.codes[long]), recent)
        extra = dense.dense_loss(states, recent, targets, dense.item_embeddings())
        assert dense.loss(batch).item() == pytest.approx(
            plain.loss(batch).item() + 0.5 * extra.item(), rel=1e-5
        )


def test_item_bias_adds_a_logit_per_item_under_every_merge(catalog: CatalogInfo) -> None:
    """``item_bias``: zero at the start (scores as without it, the same weights), then each
    interest's logit gains b_i, so tau*logsumexp_k(s_k/tau + b_i) = merge + tau*b_i; training
    raises the bias of an item every user takes next."""
    plain = model_for(catalog)
    biased = model_for(catalog, dataclasses.replace(TINY, item_bias=True))
    batch = batch_of(HISTORY)
    with torch.no_grad():
        assert torch.equal(plain.score_all(batch), biased.score_all(batch))
        assert biased.item_bias is not None
        biased.item_bias.copy_(torch.linspace(-1.0, 1.0, NUM_ITEMS + 1))
        interests, items = biased.user_interests(batch), biased.item_embeddings()
        cosines = torch.einsum("bkd,nd->bkn", interests, items)
        tau, bias = TINY.temperature, biased.item_bias
        by_hand = tau * torch.logsumexp(cosines / tau + bias, dim=1)
        assert torch.allclose(biased.score_all(batch)[:, 1:], by_hand[:, 1:], atol=1e-5)
        for merge in ("max", "gate"):
            shift = (biased.score_all(batch, merge) - plain.score_all(batch, merge))[:, 1:]
            assert torch.allclose(shift, tau * bias[1:].expand_as(shift), atol=1e-5), merge
        with pytest.raises(ValueError, match="item_bias covers 41 items; got 40"):
            biased.interest_scores(interests, items[1:])
    trained = model_for(catalog, dataclasses.replace(TINY, item_bias=True, dense_weight=0.0))
    trained.train()
    optimiser = torch.optim.Adam(trained.parameters(), lr=0.05)
    popular = torch.tensor([[7, 0], [7, 0]])
    for _ in range(20):
        optimiser.zero_grad()
        trained.loss(batch_of(HISTORY, popular)).backward()
        optimiser.step()
    assert trained.item_bias is not None
    others = torch.cat([trained.item_bias[1:7], trained.item_bias[8:]])
    assert trained.item_bias[7] > others.max()
