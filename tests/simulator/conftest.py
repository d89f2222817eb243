"""The real ML-100K catalogue (MiniLM item text embeddings, from the shared test cache) and a
simulated population over it, built once per session."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from features.item_embeddings import embed_movielens_items
from simulator.population import SimulatedPopulation
from tests.conftest import EMBEDDING_CACHE


@pytest.fixture(scope="session")
def catalogue() -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(item_ids, embeddings) of every ML-100K item."""
    return embed_movielens_items(EMBEDDING_CACHE)


@pytest.fixture(scope="session")
def population(catalogue: tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]):
    """200 users with 3 interests each, no drift: the defaults the service will meet."""
    item_ids, embeddings = catalogue
    return SimulatedPopulation(
        embeddings, item_ids, num_users=200, interests_per_user=3, drift_per_hour=0.0, seed=0
    )
