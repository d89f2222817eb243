"""The registry: names, lazy imports, config overrides, and every built model's interface."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.errors import ConfigError
from model import zoo
from model.sasrec import Config as SASRecConfig
from tests.model.offline_fixtures import batch_of, tiny_catalog


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'gru4rec'.*popular, sasrec, hstu"):
        zoo.build("gru4rec", tiny_catalog(5))
    with pytest.raises(ConfigError, match="unknown model"):
        zoo.default_max_len("nope")


def test_overrides_reach_the_config_and_unknown_fields_are_named() -> None:
    config = zoo.make_config("sasrec", dim=32, layers=1)
    assert config == SASRecConfig(dim=32, layers=1)
    with pytest.raises(ConfigError, match=r"no fields \['depth'\]"):
        zoo.make_config("sasrec", depth=3)
    assert zoo.config_from_dict(SASRecConfig, dataclasses.asdict(config)) == config


def test_long_history_models_get_long_windows() -> None:
    assert zoo.default_max_len("sasrec") == zoo.default_max_len("hstu") == 200
    assert zoo.default_max_len("hymirec") == zoo.default_max_len("persrec") == 1000
    assert set(zoo.TRAINING_DEFAULTS) == set(zoo.MODEL_NAMES)


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_every_available_model_scores_the_whole_catalogue(name: str) -> None:
    if not zoo.is_available(name):
        pytest.skip(f"{zoo.module_name(name)} does not exist yet")
    torch.manual_seed(0)
    model = zoo.build(name, tiny_catalog(12, text_dim=16)).eval()
    history = torch.tensor([[0, 0, 3, 5, 7], [1, 2, 3, 4, 5]])
    with torch.no_grad():
        scores = model.score_all(batch_of(history))
    assert scores.shape == (2, 13)
    assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
