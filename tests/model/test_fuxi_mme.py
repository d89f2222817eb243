"""Fuxi-MME: M embedding tables through one shared stack of MoE blocks, concatenated."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import ConfigError
from model.base import Batch
from model.fuxi_mme import Config, FuxiMME, build_model
from model.layers import Block
from model.moe import MoE, load_balancing_loss
from tests.model.offline_fixtures import tiny_catalog

NUM_ITEMS = 40


def make_model(seed: int = 0, **overrides: Any) -> FuxiMME:
    torch.manual_seed(seed)
    values: dict[str, Any] = dict(
        dim=32, num_tables=4, heads=2, layers=2, max_len=16, num_experts=4, top_k=2, dropout=0.0
    )
    values.update(overrides)
    return build_model(tiny_catalog(NUM_ITEMS), Config(**values)).eval()


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


def history_of(lengths: list[int], width: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    history = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        history[row, width - length :] = torch.randint(
            1, NUM_ITEMS + 1, (length,), generator=generator
        )
    return history


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tables_share_the_blocks() -> None:
    """Width d = 8 per table: 1, 2 or 4 tables have the same blocks, only the table grows."""
    counts = {}
    for tables in (1, 2, 4):
        model = make_model(dim=8 * tables, num_tables=tables)
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        assert len(blocks) == model.config.layers  # one stack, not one per table
        counts[tables] = (parameter_count(model.blocks), parameter_count(model.item_emb))
    assert counts[1][0] == counts[2][0] == counts[4][0]
    assert [counts[t][1] for t in (1, 2, 4)] == [(NUM_ITEMS + 1) * 8 * t for t in (1, 2, 4)]


def test_user_embedding_concatenates_each_table_run_through_the_same_blocks() -> None:
    model = make_model()
    history = history_of([16, 10, 3], 16)
    user = model.user_interests(batch_of(history))
    assert user.shape == (3, 1, model.config.dim)

    # Reference: one table at a time through the one stack of blocks.
    width, valid = model.width, history > 0
    mask = valid[:, None, None, :] & torch.ones(16, 16, dtype=torch.bool).tril()
    parts = []
    with torch.no_grad():
        for table in range(model.config.num_tables):
            weight = model.item_emb.weight[:, table * width : (table + 1) * width]
            x = F.embedding(history, weight) + model.pos_emb(torch.arange(15, -1, -1))
            for block in model.blocks:
                x = block(x, mask)
            parts.append(model.ln_f(x)[:, -1])
        torch.testing.assert_close(user[:, 0], torch.cat(parts, dim=-1), atol=1e-5, rtol=1e-4)

        # an item's score is the sum over tables of the per-table dot products
        items = model.item_embeddings()
        per_table = sum(
            parts[t] @ items[:, t * width : (t + 1) * width].T
            for t in range(model.config.num_tables)
        )
        scores = model.score_all(batch_of(history))
        torch.testing.assert_close(scores[:, 1:], per_table[:, 1:], atol=1e-5, rtol=1e-4)


def test_every_block_routes_each_token_to_top_k_experts() -> None:
    model = make_model(top_k=2, num_experts=4)
    history = history_of([16, 5], 16)
    model.user_interests(batch_of(history))
    for block in model.blocks:
        assert isinstance(block.ffn, MoE) and block.ffn.routing is not None
        index = block.ffn.routing.expert_index
        assert index.shape == (2 * model.config.num_tables * 16, 2)  # (B * M * L, k)
        assert torch.all(index[:, 0] != index[:, 1])


def test_loss_adds_weighted_load_balancing_loss_over_valid_positions() -> None:
    history = history_of([16, 7], 16)
    targets = torch.tensor([[4, 9], [2, 0]])
    with torch.no_grad():
        plain = make_model(aux_loss_weight=0.0).loss(batch_of(history, targets))
        model = make_model(aux_loss_weight=0.5)
        loss = model.loss(batch_of(history, targets))
        aux = model.aux_loss(history)
    torch.testing.assert_close(loss - plain, 0.5 * aux)

    valid = (history > 0).repeat_interleave(model.config.num_tables, dim=0)
    expected = 0.0
    for block in model.blocks:
        assert isinstance(block.ffn, MoE) and block.ffn.routing is not None
        expected += load_balancing_loss(block.ffn.routing, valid).item()
    assert aux.item() == pytest.approx(expected)


def test_left_padding_changes_neither_user_embedding_nor_aux_loss() -> None:
    model = make_model(max_len=24)
    history = history_of([16, 9], 16)
    padded = F.pad(history, (8, 0))
    with torch.no_grad():
        torch.testing.assert_close(
            model.user_interests(batch_of(padded)), model.user_interests(batch_of(history))
        )
        model.user_interests(batch_of(history))
        aux = model.aux_loss(history)
        model.user_interests(batch_of(padded))
        aux_padded = model.aux_loss(padded)
    torch.testing.assert_close(aux_padded, aux)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"dim": 30, "num_tables": 4}, "num_tables"),
        ({"dim": 32, "num_tables": 4, "heads": 3}, "heads"),
        ({"num_experts": 2, "top_k": 3}, "top_k"),
    ],
)
def test_config_errors_name_the_field(overrides: dict[str, int], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Config(**overrides)
