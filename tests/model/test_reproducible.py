"""A fixed seed gives the same run on CPU: same metrics, same per-epoch history, same weights.

(Each run rebuilds its catalogue and data: ``tiny_catalog`` draws from its own seeded generator,
so the run does not depend on how much of the global RNG earlier tests used.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.training.offline import RunResult, train_and_evaluate
from tests.model.offline_fixtures import cyclic_data, tiny_catalog

NUM_ITEMS = 30
TINY = {"dim": 16, "heads": 2, "layers": 1, "recent_len": 6, "interests": 2}


def run(name: str, seed: int) -> RunResult:
    catalog = tiny_catalog(NUM_ITEMS)
    data = cyclic_data(num_users=24, num_items=NUM_ITEMS, length=20, seed=1)
    overrides = TINY if name == "hymirec" else {"dim": 16, "heads": 2, "layers": 1}
    return train_and_evaluate(
        name, catalog, data, seed=seed, epochs=2, batch_size=8, max_len=30, overrides=overrides
    )


@pytest.mark.parametrize("name", ["hymirec", "sasrec"])
def test_two_runs_with_the_same_seed_are_identical(name: str) -> None:
    first, second = run(name, seed=7), run(name, seed=7)
    assert first.valid == second.valid and first.test == second.test
    np.testing.assert_equal(first.history, second.history)  # every epoch (NaN = NaN at 0)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    assert first.options["deterministic"] and first.options["torch_threads"] == 1
    other = run(name, seed=8)
    assert repr(other.history) != repr(first.history)  # the seed does reach the run


def test_the_deterministic_setting_is_restored_after_a_run() -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    run("sasrec", seed=0)
    assert not torch.are_deterministic_algorithms_enabled()
