"""The default simulated population: the ML-100K users themselves, with tastes fitted on their
ratings.

This is a *model* of the users, not the users: it decides what the closed loop's ground truth is.

**Item space.** Item factors from an implicit-feedback factorisation of all 100,000 ratings
(:mod:`simulator.factorization`; 32 factors, confidence ``1 + 10`` per rating, lambda 1, 15
sweeps), fitted independently of every served model. Items are clustered in that space by
spherical k-means (``num_clusters``, 20 by default). Unlike the text population the factors are
not centred: their common direction is popularity, which is part of real users' taste (centred,
the popular list scored above SASRec's lists; see the README's simulator section).

**Interests.** User ``u``'s interests are the clusters of their *whole* rating history: every
cluster holding at least ``min_share`` of their ratings (the largest always counts), at most
``max_interests``, weighted by those shares. The interest vector of user ``u`` in cluster ``c`` is
``normalise(centroid_c + anchor_weight * normalise(mean of u's item vectors in c))``: the cluster,
pulled towards the corner of it the user actually watched.

**Drift.** As in :class:`~simulator.population.SimulatedPopulation`: with ``drift_per_hour = d``
the mixture moves a share ``d`` per hour towards a fresh draw; draw 0 is the history's shares and
draw ``j >= 1`` re-weights the same clusters by ``Dirichlet(drift_concentration * shares)``, so the
user drifts among their own interests.

Relevance, the dependent click model and every closed form are the base class's, unchanged.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from core.errors import ConfigError, SimulatorError
from simulator.factorization import ImplicitALS, fit_implicit_als
from simulator.population import ClickModel, SimulatedPopulation

__all__ = ["GroundedPopulation", "GroundedWorld", "fit_item_factors", "grounded_population"]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class GroundedWorld:
    """The fitted world's parameters (see the module docstring)."""

    als: ImplicitALS = field(default_factory=ImplicitALS)
    num_clusters: int = 20
    max_interests: int = 5
    min_share: float = 0.1
    anchor_weight: float = 1.0
    relevant_share: float = 0.03
    temperature: float = 0.25
    drift_concentration: float = 20.0
    centre: bool = (
        False  # keep the factors as fitted: their mean direction is popularity, a real taste
    )

    def __post_init__(self) -> None:
        if self.max_interests < 1 or not 0 < self.min_share <= 1:
            raise ConfigError(f"GroundedWorld needs max_interests >= 1, 0 < min_share <= 1: {self}")
        if self.drift_concentration <= 0:
            raise ConfigError(f"GroundedWorld needs drift_concentration > 0; got {self}")


class GroundedPopulation(SimulatedPopulation):
    """Users whose interests are the item clusters of their real histories (module docstring)."""

    def __init__(
        self,
        item_vectors: npt.ArrayLike,
        item_ids: npt.ArrayLike,
        user_ids: Sequence[int] | npt.ArrayLike,
        histories: Sequence[npt.ArrayLike],
        *,
        world: GroundedWorld | None = None,
        drift_per_hour: float = 0.05,
        seed: int = 0,
        click_model: ClickModel | None = None,
    ) -> None:
        world = world or GroundedWorld()
        ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(histories) or len(ids) == 0:
            raise ConfigError(f"need one history per user; got {len(ids)} ids, {len(histories)}")
        if np.any(np.diff(ids) <= 0):
            raise ConfigError("user_ids must be sorted and unique")
        super().__init__(
            item_vectors,
            item_ids,
            num_users=len(ids),
            interests_per_user=1,
            drift_per_hour=drift_per_hour,
            seed=seed,
            num_clusters=world.num_clusters,
            min_cluster_size=1,
            anchor_weight=world.anchor_weight,
            relevant_share=world.relevant_share,
            temperature=world.temperature,
            click_model=click_model,
            centre=world.centre,
        )
        self.world = world
        self.user_ids: IntArray = ids
        self._index = {int(u): n for n, u in enumerate(ids)}
        self._history_rows: list[IntArray] = []
        self._keys: list[IntArray] = []
        self._shares: list[FloatArray] = []
        k = self.clusters.num_clusters
        for n, history in enumerate(histories):
            rows = self.rows(history)
            if not len(rows):
                raise ConfigError(f"user {ids[n]} has an empty history")
            shares = np.bincount(self.clusters.labels[rows], minlength=k) / len(rows)
            order = np.argsort(-shares, kind="stable")[: world.max_interests]
            kept = [int(c) for c in order if shares[c] >= world.min_share] or [int(order[0])]
            self._history_rows.append(rows)
            self._keys.append(np.array([n * k + c for c in kept], dtype=np.int64))
            weights = shares[kept]
            self._shares.append(weights / weights.sum())

    # -- users ---------------------------------------------------------------------------------

    def user_id(self, user: int) -> int:
        return int(self.user_ids[self._check_user(user)])

    def user_index(self, user_id: int) -> int:
        found = self._index.get(int(user_id))
        if found is None:
            raise SimulatorError(f"user id {user_id} is not one of the {self.num_users} users")
        return found

    def history_items(self, user: int) -> IntArray:
        """The item ids of the user's real history (what the world was fitted on)."""
        return self.item_ids[self._history_rows[self._check_user(user)]]

    @property
    def interest_counts(self) -> IntArray:
        """(num_users,) how many interests each user has (clusters with >= min_share)."""
        return np.array([len(keys) for keys in self._keys], dtype=np.int64)

    @property
    def multi_interest_share(self) -> float:
        """Share of users with more than one real interest."""
        return float(np.mean(self.interest_counts > 1))

    # -- the base class's hooks ----------------------------------------------------------------

    def _draw(self, user: int, segment: int) -> tuple[IntArray, FloatArray]:
        keys, shares = self._keys[user], self._shares[user]
        if segment == 0 or len(keys) == 1:
            return keys, shares
        rng = np.random.default_rng([self.seed, user, segment])
        return keys, rng.dirichlet(self.world.drift_concentration * shares)

    def _interest_vector(self, key: int) -> FloatArray:
        user, cluster = divmod(int(key), self.clusters.num_clusters)
        rows = self._history_rows[user]
        rows = rows[self.clusters.labels[rows] == cluster]
        personal = self.embeddings[rows].mean(axis=0)
        personal /= max(float(np.linalg.norm(personal)), 1e-12)
        vector = self.clusters.centroids[cluster] + self.anchor_weight * personal
        return np.asarray(vector / np.linalg.norm(vector))

    def _key_clusters(self, keys: IntArray) -> IntArray:
        return np.asarray(keys % self.clusters.num_clusters, dtype=np.int64)


def _ratings_digest(ratings: pd.DataFrame) -> str:
    columns = ratings[["user_id", "item_id"]].to_numpy(dtype=np.int64)
    return hashlib.sha256(np.ascontiguousarray(columns).tobytes()).hexdigest()[:16]


def fit_item_factors(
    ratings: pd.DataFrame, als: ImplicitALS, seed: int, cache_dir: Path | None = None
) -> tuple[IntArray, FloatArray]:
    """(item ids, item factors) of the implicit ALS fit of ``ratings`` (``user_id, item_id``),
    cached in ``cache_dir`` by the data, the parameters and the seed."""
    key = hashlib.sha256(
        f"{_ratings_digest(ratings)}|{sorted(asdict(als).items())}|{seed}".encode()
    ).hexdigest()[:16]
    path = None if cache_dir is None else Path(cache_dir) / "world" / f"implicit-als-{key}.npz"
    if path is not None and path.is_file():
        with np.load(path) as cached:
            return cached["item_ids"].astype(np.int64), cached["items"].astype(np.float64)
    user_ids, user_rows = np.unique(ratings["user_id"].to_numpy(np.int64), return_inverse=True)
    item_ids, item_rows = np.unique(ratings["item_id"].to_numpy(np.int64), return_inverse=True)
    fitted = fit_implicit_als(user_rows, item_rows, len(user_ids), len(item_ids), als, seed)
    log.info(
        "fitted the simulated users' item space (%d users, %d items)", len(user_ids), len(item_ids)
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.tmp.npz")
        np.savez(partial, item_ids=item_ids, items=fitted.items)
        partial.replace(path)
    return item_ids.astype(np.int64), fitted.items


def grounded_population(
    ratings: pd.DataFrame,
    *,
    seed: int = 0,
    drift_per_hour: float = 0.05,
    world: GroundedWorld | None = None,
    cache_dir: Path | None = None,
    click_model: ClickModel | None = None,
) -> GroundedPopulation:
    """Every user of ``ratings`` (``user_id, item_id`` in replay order) as a simulated user."""
    world = world or GroundedWorld()
    item_ids, factors = fit_item_factors(ratings, world.als, seed, cache_dir)
    groups = ratings.groupby("user_id", sort=True)["item_id"]
    user_ids = np.array([int(u) for u, _ in groups], dtype=np.int64)
    histories = [items.to_numpy(np.int64) for _, items in groups]
    return GroundedPopulation(
        factors,
        item_ids,
        user_ids,
        histories,
        world=world,
        drift_per_hour=drift_per_hour,
        seed=seed,
        click_model=click_model,
    )
