"""A block computed for its last rows only gives the rows the whole block gives (to float rounding:
one query row may take another matmul or attention kernel than several, 2e-7 here): serving and
evaluation read HyMiRec's interests from the last positions of its refiner that way."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.hymirec_model import HyMiRec, InterestRefiner
from model.layers import Block, causal_padding_mask
from tests.model.test_hymirec import HISTORY, TINY, catalog, model_for  # noqa: F401 (fixture)


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_a_block_for_its_last_rows_equals_those_rows_of_the_whole_block(rows: int) -> None:
    torch.manual_seed(rows)
    block = Block(dim=16, heads=4, dropout=0.0).eval()
    x = torch.randn(3, 9, 16)
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, :4] = False  # left padding: those rows see no key but themselves
    mask = causal_padding_mask(valid)
    with torch.no_grad():
        last, whole = block.forward_last(x, mask, rows), block(x, mask)[:, -rows:]
        assert torch.allclose(last, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2])
def test_hymirec_interests_alone_equal_those_of_the_full_refiner(catalog, layers: int) -> None:  # noqa: F811
    model = model_for(catalog, dataclasses.replace(TINY, layers=layers))
    assert isinstance(model, HyMiRec) and isinstance(model.refiner, InterestRefiner)
    long, recent = model.split_history(HISTORY)
    with torch.no_grad():
        coarse = model.encode_long(catalog.codes[long])
        assert torch.equal(model.refine(coarse, recent), model._refine(coarse, recent)[0])
        assert torch.equal(
            model.refine(coarse, recent[:, 2:]), model._refine(coarse, recent[:, 2:])[0]
        )
