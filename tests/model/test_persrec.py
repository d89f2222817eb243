"""PerSRec: recent items reach the old history only through the tokens, the tokens never see the
recent items, and the cached serving path equals the one-pass model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from core.errors import ConfigError
from model.base import Batch
from model.persrec import Config, PerSRec, build_model, persrec_mask
from tests.model.offline_fixtures import tiny_catalog

NUM_ITEMS = 40


def make_model(seed: int = 0, **overrides: Any) -> PerSRec:
    torch.manual_seed(seed)
    values: dict[str, Any] = dict(
        dim=16, heads=2, layers=2, num_tokens=3, recent_len=4, max_len=12, dropout=0.0
    )
    values.update(overrides)
    return build_model(tiny_catalog(NUM_ITEMS), Config(**values)).eval()


def random_history(lengths: list[int], width: int, generator: torch.Generator) -> Tensor:
    """Left-padded histories with the given numbers of items."""
    history = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        if length:
            history[row, -length:] = torch.randint(1, NUM_ITEMS + 1, (length,), generator=generator)
    return history


def batch_of(history: Tensor, targets: Tensor | None = None) -> Batch:
    size = history.shape[0]
    if targets is None:
        targets = torch.ones(size, 1, dtype=torch.long)
    return Batch(
        user_index=torch.arange(size),
        history=history,
        history_ts=torch.zeros_like(history),
        targets=targets,
        target_ts=torch.zeros_like(targets),
    )


class BlockInputs:
    """Forward pre-hooks on every block: record, or overwrite, the rows ``rows`` of its input."""

    def __init__(self, model: PerSRec, rows: slice) -> None:
        self.model, self.rows = model, rows
        self.recorded: list[Tensor] = []
        self.replacement: list[Tensor] | None = None

    def __enter__(self) -> BlockInputs:
        def hook(module: torch.nn.Module, args: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            x, mask = args
            layer = len(self.recorded)
            self.recorded.append(x[:, self.rows].clone())
            if self.replacement is not None:
                x = x.clone()
                x[:, self.rows] = self.replacement[layer]
            return x, mask

        self.handles = [b.register_forward_pre_hook(hook) for b in self.model.blocks]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def test_mask_blocks_recent_to_old_and_tokens_to_recent() -> None:
    old_len, k, recent_len = 5, 3, 4
    mask = persrec_mask(
        torch.ones(1, old_len, dtype=torch.bool), k, torch.ones(1, recent_len, dtype=torch.bool)
    )[0, 0]
    old, tokens, recent = slice(0, old_len), slice(old_len, old_len + k), slice(old_len + k, None)
    assert not mask[recent, old].any()  # recent items never see old items directly
    assert mask[recent, tokens].all()  # ...but see every token
    assert not mask[tokens, recent].any()  # tokens never see recent items
    assert mask[tokens, old].all()  # tokens read the whole old history
    assert not mask[old, old_len:].any()  # old items see neither tokens nor recent items
    assert torch.equal(mask[recent, recent], torch.ones(4, 4, dtype=torch.bool).tril())


def test_recent_outputs_depend_on_old_items_only_through_tokens() -> None:
    model = make_model()
    cfg = model.config
    generator = torch.Generator().manual_seed(1)
    history = random_history([12, 12], 12, generator)
    perturbed = history.clone()
    perturbed[:, :-4] = random_history([8, 8], 8, generator)  # new old items, same recent ones
    old_len = cfg.max_len - cfg.recent_len
    tokens = slice(old_len, old_len + cfg.num_tokens)
    recent = slice(old_len + cfg.num_tokens, None)

    with torch.no_grad(), BlockInputs(model, tokens) as original:
        reference = model.hidden(history)[:, recent]
    with torch.no_grad():
        fresh = model.hidden(perturbed)[:, recent]
    assert not torch.allclose(fresh, reference, atol=1e-4)  # the old items do matter...

    with torch.no_grad(), BlockInputs(model, tokens) as pinned:
        pinned.replacement = original.recorded  # ...but only via the tokens' states
        held = model.hidden(perturbed)[:, recent]
    torch.testing.assert_close(held, reference, atol=1e-6, rtol=0)


def test_tokens_and_old_items_never_see_recent_items() -> None:
    model = make_model()
    cfg = model.config
    generator = torch.Generator().manual_seed(2)
    history = random_history([12, 12], 12, generator)
    perturbed = history.clone()
    perturbed[:, -cfg.recent_len :] = random_history([4, 4], 4, generator)
    before_recent = slice(0, cfg.max_len - cfg.recent_len + cfg.num_tokens)

    with torch.no_grad(), BlockInputs(model, before_recent) as a:
        out_a = model.hidden(history)
    with torch.no_grad(), BlockInputs(model, before_recent) as b:
        out_b = model.hidden(perturbed)
    for layer_a, layer_b in zip(a.recorded, b.recorded, strict=True):
        torch.testing.assert_close(layer_a, layer_b, atol=0, rtol=0)
    torch.testing.assert_close(out_a[:, before_recent], out_b[:, before_recent], atol=0, rtol=0)
    assert not torch.allclose(out_a[:, -1], out_b[:, -1], atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    num_tokens=st.integers(1, 3),
    recent_len=st.integers(1, 5),
    old_len=st.integers(1, 8),
    heads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_cached_inference_equals_one_pass(
    data: st.DataObject,
    batch: int,
    num_tokens: int,
    recent_len: int,
    old_len: int,
    heads: int,
    seed: int,
) -> None:
    max_len = old_len + recent_len
    model = make_model(
        seed, heads=heads, num_tokens=num_tokens, recent_len=recent_len, max_len=max_len
    )
    width = data.draw(st.integers(1, max_len + 3))
    lengths = data.draw(st.lists(st.integers(0, width), min_size=batch, max_size=batch))
    generator = torch.Generator().manual_seed(seed)
    history = random_history(lengths, width, generator)

    with torch.no_grad():
        one_pass = model.hidden(history)[:, -1]
        cached = model.user_interests(batch_of(history))[:, 0]
        torch.testing.assert_close(cached, one_pass, atol=1e-5, rtol=1e-4)

        # Serving: the old part is encoded once; new recent items reuse the cache.
        old, _ = model.split_history(history)
        cache = model.encode_old(old)
        assert cache.token_states.shape == (2, batch, num_tokens, 16)
        new_recent = random_history([recent_len] * batch, recent_len, generator)
        from_cache = model.interests_from_cache(cache, new_recent)[:, 0]
        one_pass_new = model.hidden(torch.cat([old, new_recent], dim=1))[:, -1]
        torch.testing.assert_close(from_cache, one_pass_new, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lengths", [[12, 9, 5], [3, 1, 2]], ids=["long", "shorter-than-R"])
def test_left_padding_does_not_change_anything(lengths: list[int]) -> None:
    model = make_model(max_len=20)
    history = random_history(lengths, 12, torch.Generator().manual_seed(3))
    padded = F.pad(history, (6, 0))
    targets = torch.tensor([[5, 7], [1, 0], [9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            model.user_interests(batch_of(padded)), model.user_interests(batch_of(history))
        )
        torch.testing.assert_close(
            model.loss(batch_of(padded, targets)), model.loss(batch_of(history, targets))
        )


def test_loss_is_cross_entropy_of_targets_and_trains_the_tokens() -> None:
    model = make_model()
    history = random_history([12, 12], 12, torch.Generator().manual_seed(4))
    targets = torch.tensor([[3, 0], [8, 11]])  # 0 = no target
    loss = model.loss(batch_of(history, targets))

    user = model.hidden(history)[:, -1]
    logits = user @ model.item_embeddings()[1:].T  # softmax over items 1..N only
    expected = F.cross_entropy(logits[[0, 1, 1]], torch.tensor([3, 8, 11]) - 1)
    torch.testing.assert_close(loss, expected)

    loss.backward()
    assert model.tokens.grad is not None and model.tokens.grad.abs().sum() > 0


def test_recent_len_must_leave_room_for_old_items() -> None:
    with pytest.raises(ConfigError, match="recent_len"):
        Config(recent_len=12, max_len=12)
