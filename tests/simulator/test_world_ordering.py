"""Under the fitted world, with no experiment traffic: the oracle's lists beat SASRec's and
HyMiRec's (trained offline on ML-100K with the demo's budget), which beat popular's, which beats
random lists; the margins are printed. Trains the two models once when the cache is empty (about
two minutes on 2 cores), hence slow."""

from __future__ import annotations

import numpy as np
import pytest

from core.movielens import load_ratings
from core.settings import Settings
from hymirec.closed_loop import pretrained_models
from hymirec.world_check import ORACLE, RANDOM, offline_expected_ctr
from model.data import build_catalog
from simulator.grounded import grounded_population
from tests.conftest import EMBEDDING_CACHE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_personalised_lists_beat_popular_and_the_oracle_beats_them(
    make_settings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings: Settings = make_settings()
    catalog = build_catalog(settings)
    models = pretrained_models(["sasrec", "hymirec", "popular"], catalog, EMBEDDING_CACHE)
    population = grounded_population(load_ratings(), seed=0, cache_dir=EMBEDDING_CACHE)
    ctr = offline_expected_ctr(population, models, catalog)
    mean = {name: float(np.mean(values)) for name, values in ctr.items()}
    with capsys.disabled():
        print(
            "\nexpected CTR over all 943 users: "
            + ", ".join(f"{n} {v:.4f}" for n, v in sorted(mean.items(), key=lambda x: -x[1]))
            + f"; multi-interest users {population.multi_interest_share:.1%}"
        )
    for learned in ("sasrec", "hymirec"):
        assert mean[ORACLE] > 1.5 * mean[learned], (learned, mean)
        assert mean[learned] > mean["popular"], (learned, mean)
    assert mean["popular"] > 2 * mean[RANDOM], mean
    assert population.multi_interest_share > 0.5
