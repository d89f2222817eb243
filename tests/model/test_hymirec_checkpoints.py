"""A HyMiRec checkpoint saved before the interest gate existed still loads, and scores as before."""

from __future__ import annotations

import torch

from tests.model.test_hymirec import batch_of, make_catalog, model_for, random_text


def test_a_checkpoint_without_gate_weights_loads_with_the_same_scores() -> None:
    catalog = make_catalog(random_text())
    saved = model_for(catalog, seed=3)
    older = {k: v for k, v in saved.state_dict().items() if not k.startswith("gate.")}
    assert len(older) < len(saved.state_dict())  # the gate's weights are really left out

    loaded = model_for(catalog, seed=7)  # other weights, another gate
    gate_before = {k: v.clone() for k, v in loaded.gate.state_dict().items()}
    loaded.load_state_dict(older)  # strict: every other key must match

    history = torch.tensor([[0, 0, 3, 5, 2, 9, 4]])
    saved.eval(), loaded.eval()
    with torch.no_grad():
        for merge in ("max", "logsumexp"):
            assert torch.equal(
                saved.score_all(batch_of(history), merge),
                loaded.score_all(batch_of(history), merge),
            )
    for name, value in loaded.gate.state_dict().items():  # the gate kept its own initial weights
        assert torch.equal(value, gate_before[name])
