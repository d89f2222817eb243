"""A controlled multi-interest data set: K interleaved interests per user, the truth known.

The world (seeded, :class:`InterestWorldConfig`):

* ``num_clusters`` disjoint item clusters of ``items_per_cluster`` items. Inside a cluster, item
  of popularity rank ``r`` (0-based) has weight ``(r + 1) ** -popularity_exponent`` (Zipf).
* Each user holds ``K = interests`` distinct clusters, drawn uniformly without replacement, with
  shares ``w`` (equal, ``1 / K``, or Dirichlet(``concentration``)).
* The user's interest sequence ``z_0, z_1, ...`` (a slot ``0..K-1`` per item) is a sticky Markov
  chain: ``z_0 ~ w``; afterwards, with probability ``stay`` the interest is kept, otherwise a
  fresh one is drawn from ``w`` (possibly the same). ``w`` is its stationary law, so each
  interest's expected share of a sequence is exactly its weight, and
  ``P(z_t != z_{t-1}) = (1 - stay) * (1 - sum_k w_k^2)``.
* Item ``t`` comes from cluster ``c[z_t]``, drawn in proportion to popularity among the cluster's
  items the user has not consumed yet (users never repeat an item, as in ML-100K; Gumbel top-k
  gives these successive draws without replacement, Kool et al. 2019).

So the next item's law given the past is known exactly (:func:`next_item_probabilities`): the
last item's cluster names the current interest, and
``P(x_t = i) = P(z_t = k | z_{t-1}) * pop_i / sum_{j unseen in c[k]} pop_j`` for ``i`` in ``c[k]``.
Ranking by it is the Bayes-optimal recommender, an upper bound for any model.

Items carry a synthetic "text" embedding: a unit vector near their cluster's random unit centre
(``cluster_spread`` sets the noise), coded with the residual cosine codebook
(``features/codebook.py``) so that HyMiRec's long-history branch has codes to read. The genre
set of an item is its cluster (``"c07"``), so diversity and interest coverage see clusters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from core.errors import ConfigError, DataError
from features.codebook import ResidualCodebook
from model.base import CatalogInfo
from model.data import MIN_INTERACTIONS, SequenceData

__all__ = [
    "InterestWorld",
    "InterestWorldConfig",
    "generate_interest_world",
    "next_item_probabilities",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
START_S = 1_700_000_000  # the first user's first item, seconds
STEP_S = 60  # one item a minute; users start a day apart, so no timestamp ties


@dataclass(frozen=True)
class InterestWorldConfig:
    """How the world is drawn; every field is checked, a ConfigError names the one that is bad."""

    interests: int = 4  # K: distinct clusters per user
    num_users: int = 500
    num_clusters: int = 16
    items_per_cluster: int = 120
    length: int = 60  # items per user, the validation and test targets included
    stay: float = 0.5  # P(keep the current interest at the next item)
    concentration: float | None = None  # Dirichlet shares over a user's K; None: equal shares
    popularity_exponent: float = 1.0  # Zipf exponent inside a cluster (0: uniform)
    text_dim: int = 32
    cluster_spread: float = 0.5  # norm of an item's noise around its unit cluster centre
    codebook_levels: int = 2
    codebook_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("interests", "num_users", "num_clusters", "text_dim", "codebook_levels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"InterestWorldConfig.{name} must be an integer >= 1; got {value!r}"
                )
        if self.interests > self.num_clusters:
            raise ConfigError(
                f"InterestWorldConfig.interests ({self.interests}) exceeds num_clusters "
                f"({self.num_clusters}): a user's interests are distinct clusters"
            )
        if self.length < MIN_INTERACTIONS:
            raise ConfigError(
                f"InterestWorldConfig.length must be >= {MIN_INTERACTIONS} (training item, "
                f"validation and test targets); got {self.length}"
            )
        if self.items_per_cluster < self.length:
            raise ConfigError(
                f"InterestWorldConfig.items_per_cluster ({self.items_per_cluster}) must be >= "
                f"length ({self.length}): a user may draw every item from one cluster, never twice"
            )
        if not 0.0 <= self.stay < 1.0:
            raise ConfigError(f"InterestWorldConfig.stay must be in [0, 1); got {self.stay}")
        if self.concentration is not None and not self.concentration > 0.0:
            raise ConfigError(
                f"InterestWorldConfig.concentration must be > 0 or None; got {self.concentration}"
            )
        if not (math.isfinite(self.popularity_exponent) and self.popularity_exponent >= 0.0):
            raise ConfigError(
                "InterestWorldConfig.popularity_exponent must be finite and >= 0; "
                f"got {self.popularity_exponent}"
            )
        if not (math.isfinite(self.cluster_spread) and self.cluster_spread >= 0.0):
            raise ConfigError(
                f"InterestWorldConfig.cluster_spread must be finite and >= 0; "
                f"got {self.cluster_spread}"
            )
        if not 2 <= self.codebook_size <= self.num_items:
            raise ConfigError(
                f"InterestWorldConfig.codebook_size must be in [2, num_items = {self.num_items}]; "
                f"got {self.codebook_size}"
            )

    @property
    def num_items(self) -> int:
        return self.num_clusters * self.items_per_cluster


@dataclass(frozen=True, eq=False)
class InterestWorld:
    """The generated data, its catalogue, and the truth that generated them.

    Item arrays are indexed by item index (row 0 = padding); user arrays by user index.
    """

    config: InterestWorldConfig
    data: SequenceData
    catalog: CatalogInfo
    item_cluster: IntArray  # (N + 1,) cluster of each item; -1 at row 0
    popularity: FloatArray  # (N + 1,) Zipf weight inside the item's cluster; 0 at row 0
    user_clusters: IntArray  # (U, K) the clusters of each user's interests
    user_weights: FloatArray  # (U, K) each interest's share, rows sum to 1
    interest_slots: tuple[IntArray, ...]  # per user, z_t in 0..K-1 for every item of data.items


def _user_interests(
    config: InterestWorldConfig, rng: np.random.Generator
) -> tuple[IntArray, FloatArray]:
    """(U, K) distinct clusters per user and (U, K) shares."""
    users, k = config.num_users, config.interests
    # Distinct clusters per user: the first K of a random permutation (argsort of uniforms).
    clusters = np.argsort(rng.random((users, config.num_clusters)), axis=1)[:, :k]
    if config.concentration is None:
        weights = np.full((users, k), 1.0 / k)
    else:
        weights = rng.dirichlet(np.full(k, config.concentration), size=users)
    return clusters.astype(np.int64), weights


def _interest_chains(
    config: InterestWorldConfig, weights: FloatArray, rng: np.random.Generator
) -> IntArray:
    """(U, length) interest slots: the sticky chain, all users at once, one step at a time."""
    users, length = weights.shape[0], config.length
    cumulative = np.cumsum(weights, axis=1)
    cumulative[:, -1] = 1.0  # guard against rounding: every uniform lands in some slot

    def fresh() -> IntArray:
        drawn: IntArray = (rng.random((users, 1)) < cumulative).argmax(axis=1).astype(np.int64)
        return drawn

    slots = np.empty((users, length), dtype=np.int64)
    slots[:, 0] = fresh()
    for t in range(1, length):
        keep = rng.random(users) < config.stay
        slots[:, t] = np.where(keep, slots[:, t - 1], fresh())
    return slots


def _cluster_members(config: InterestWorldConfig, rng: np.random.Generator) -> IntArray:
    """(C, P) item indices of each cluster, by popularity rank (rank 0 the most popular)."""
    order = rng.permutation(config.num_items) + 1  # items shuffled over clusters
    return order.reshape(config.num_clusters, config.items_per_cluster).astype(np.int64)


def _draw_items(
    config: InterestWorldConfig,
    members: IntArray,
    user_clusters: IntArray,
    slots: IntArray,
    rng: np.random.Generator,
) -> IntArray:
    """(U, length) items: the n-th use of an interest takes the n-th popularity-weighted draw
    without replacement from its cluster (Gumbel top-k over log weights)."""
    users, k = user_clusters.shape
    ranks = np.arange(config.items_per_cluster)
    log_pop = -config.popularity_exponent * np.log1p(ranks)  # (P,)
    keys = log_pop + rng.gumbel(size=(users, k, config.items_per_cluster))
    draw_order = np.argsort(-keys, axis=2, kind="stable")  # (U, K, P) ranks in draw order
    # n-th use of slot s by user u: how many earlier steps used the same slot.
    onehot = slots[:, :, None] == np.arange(k)[None, None, :]  # (U, L, K)
    nth = (np.cumsum(onehot, axis=1) - 1)[onehot].reshape(users, config.length)
    user = np.arange(users)[:, None]
    rank = draw_order[user, slots, nth]  # (U, L)
    items: IntArray = members[user_clusters[user, slots], rank]
    return items


def _catalog(
    config: InterestWorldConfig, item_cluster: IntArray, rng: np.random.Generator
) -> CatalogInfo:
    """Unit item vectors near unit cluster centres, their codebook codes, clusters as genres."""
    centres = rng.standard_normal((config.num_clusters, config.text_dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((config.num_items, config.text_dim))
    noise *= config.cluster_spread / math.sqrt(config.text_dim)
    vectors = centres[item_cluster[1:]] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    codebook = ResidualCodebook.fit(
        vectors, levels=config.codebook_levels, size=config.codebook_size, seed=config.seed
    )
    text = np.zeros((config.num_items + 1, config.text_dim), dtype=np.float32)
    text[1:] = vectors
    codes = np.full((config.num_items + 1, codebook.levels), codebook.UNKNOWN, dtype=np.int64)
    codes[1:] = codebook.encode(vectors).astype(np.int64)
    genres = [frozenset[str]()] + [frozenset({f"c{c:02d}"}) for c in item_cluster[1:]]
    return CatalogInfo(
        num_items=config.num_items,
        text_embeddings=torch.from_numpy(text),
        codes=torch.from_numpy(codes),
        codebook_centroids=torch.from_numpy(np.array(codebook.centroids, dtype=np.float32)),
        codebook_scales=torch.from_numpy(np.array(codebook.scales, dtype=np.float32)),
        genres=genres,
    )


def generate_interest_world(config: InterestWorldConfig) -> InterestWorld:
    """Draw the world of ``config`` (the same config always gives the same world)."""
    # Separate streams per part: changing how users are drawn leaves the catalogue alone.
    users_rng, chain_rng, items_rng, world_rng = (
        np.random.default_rng([config.seed, part]) for part in range(4)
    )
    members = _cluster_members(config, world_rng)
    item_cluster = np.full(config.num_items + 1, -1, dtype=np.int64)
    popularity = np.zeros(config.num_items + 1)
    ranks = np.arange(config.items_per_cluster)
    for cluster, row in enumerate(members):
        item_cluster[row] = cluster
        popularity[row] = (ranks + 1.0) ** -config.popularity_exponent
    catalog = _catalog(config, item_cluster, world_rng)
    user_clusters, user_weights = _user_interests(config, users_rng)
    slots = _interest_chains(config, user_weights, chain_rng)
    items = _draw_items(config, members, user_clusters, slots, items_rng)
    stamps = START_S + 86_400 * np.arange(config.num_users)[:, None]
    stamps = stamps + STEP_S * np.arange(config.length)[None, :]
    data = SequenceData(
        user_ids=np.arange(config.num_users, dtype=np.int64),
        item_ids=np.arange(1, config.num_items + 1, dtype=np.int64),
        items=tuple(row.astype(np.int64) for row in items),
        timestamps_s=tuple(row.astype(np.int64) for row in stamps),
    )
    return InterestWorld(
        config=config,
        data=data,
        catalog=catalog,
        item_cluster=item_cluster,
        popularity=popularity,
        user_clusters=user_clusters,
        user_weights=user_weights,
        interest_slots=tuple(slots),
    )


def next_item_probabilities(world: InterestWorld, user: int, position: int) -> FloatArray:
    """(N + 1,) the true law of ``user``'s item at ``position`` given the items before it.

    ``P(z = k | z_prev) = stay * [k == z_prev] + (1 - stay) * w_k`` (``w`` at position 0), then
    popularity among the cluster's items the user has not consumed before ``position``.
    """
    if not 0 <= user < world.data.num_users:
        raise DataError(f"user must be in [0, {world.data.num_users}); got {user}")
    length = len(world.data.items[user])
    if not 0 <= position < length:
        raise DataError(f"position must be in [0, {length}); got {position}")
    config, weights = world.config, world.user_weights[user]
    slot_law = weights.copy() if position == 0 else (1.0 - config.stay) * weights
    if position > 0:  # the last item's cluster names the current interest (clusters distinct)
        last_cluster = world.item_cluster[world.data.items[user][position - 1]]
        slot_law[int(np.flatnonzero(world.user_clusters[user] == last_cluster)[0])] += config.stay
    available = world.popularity.copy()
    available[world.data.items[user][:position]] = 0.0
    probabilities = np.zeros_like(available)
    for slot, cluster in enumerate(world.user_clusters[user]):
        inside = world.item_cluster == cluster
        probabilities[inside] = slot_law[slot] * available[inside] / available[inside].sum()
    return probabilities
