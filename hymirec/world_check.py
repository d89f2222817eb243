"""The offline check of the simulated world: how good each model's lists are under the truth.

For every user of a :class:`~simulator.grounded.GroundedPopulation` (their real ML-100K history,
no experiment traffic), each model ranks its top ``k`` unseen items with the service's own
ranking code, from the view of the history the service would read (``HistoryViews``), and the
world gives the exact expected CTR of that list. The simulator's own lists frame them: the
oracle (greedy best for expected clicks, an upper bound the models can approach) and ``k`` random
items (the floor). A world where a personalised model cannot beat popular has nothing for an
experiment to find; this measures the margins.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

from hymirec.closed_loop import HistoryViews
from model.base import CatalogInfo
from serving.models import LoadedModel
from simulator.grounded import GroundedPopulation

__all__ = ["ORACLE", "RANDOM", "offline_expected_ctr"]

ORACLE, RANDOM = "oracle", "random"


def offline_expected_ctr(
    population: GroundedPopulation,
    models: Mapping[str, LoadedModel],
    catalog: CatalogInfo,
    *,
    k: int = 10,
    users: Iterable[int] | None = None,
    seed: int = 0,
    recent_len: int = 50,
    long_len: int = 1000,
) -> dict[str, npt.NDArray[np.float64]]:
    """Per list kind (each model, ``oracle``, ``random``): the expected CTR of its list for each
    user index in ``users`` (default: everyone), at simulated time 0."""
    views = HistoryViews(catalog, recent_len)
    rng = np.random.default_rng(seed)
    chosen = list(range(population.num_users) if users is None else users)
    out = {name: np.zeros(len(chosen)) for name in [*models, ORACLE, RANDOM]}
    for row, user in enumerate(chosen):
        items = population.history_items(user).tolist()
        history = views.of_items(population.user_id(user), items[-long_len:], len(items))
        for name, model in models.items():
            out[name][row] = population.expected_ctr(user, model.rank(history, k), 0.0)
        oracle = population.oracle_items(user, k, 0.0).tolist()
        out[ORACLE][row] = population.expected_ctr(user, oracle, 0.0)
        out[RANDOM][row] = population.expected_ctr(
            user, population.random_items(k, rng).tolist(), 0.0
        )
    return out
