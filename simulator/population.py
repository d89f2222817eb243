"""Simulated users with several drifting latent interests, and how they respond to a ranked list.

The pure core of the closed-loop simulator (numpy only, no I/O). It is the ground truth of the
online experiments: every probability it samples from is also available in closed form.

**Catalogue.** The item embeddings are centred (the catalogue mean subtracted, rows re-normalised):
sentence-encoder vectors share a large common direction (MiniLM title cosines all lie in about
0.3-0.8), which would make every cluster look like every other (Mu & Viswanath 2018,
"All-but-the-top"). Items are then grouped by spherical k-means (cosine; Dhillon & Modha 2001)
seeded with k-means++ (Arthur & Vassilvitskii 2007). Cosines below are in the centred space.

**Interests.** A user's *draw* is a sparse mixture: ``interests_per_user`` distinct clusters
(uniform among the clusters with at least ``min_cluster_size`` items) with Dirichlet(``alpha``)
weights, and one anchor item per cluster. The interest vector is
``normalise(centroid + anchor_weight * e_anchor)``, so two users of one cluster like different
corners of it. Draw ``j`` of user ``u`` is a pure function of ``(seed, u, j)``.

**Drift.** With ``drift_per_hour = d > 0`` time is cut into segments of ``1/d`` hours; at time
``t`` in segment ``j`` (fraction ``f`` into it) the mixture is ``(1 - f) draw_j + f draw_{j+1}``:
the weights move a share ``d`` of the way to a fresh draw per hour. ``d = 0`` keeps ``draw_0``.

**Relevance** of item ``i`` to interest ``v``: ``r = sigmoid((cos(e_i, v) - q_v) / (tau * sd_v))``
with ``q_v`` the ``1 - relevant_share`` quantile and ``sd_v`` the standard deviation of
``cos(., v)`` over the catalogue, so about ``relevant_share`` of the items suit each interest
whatever the embedding's cosine scale.

**Response** (:class:`ClickModel`). A request is one visit with one intent ``z ~ Cat(weights)``,
as in intent-aware ranking (Agrawal et al. 2009, "Diversifying search results"). The user scans the
list top-down as in the dependent click model (DCM; Guo, Liu & Wang 2009; Chuklin, Markov &
de Rijke 2015, "Click Models for Web Search", ch. 3): position 0 is examined; an examined item is
clicked with attraction ``a = floor + (max - floor) * r_z``; after a click the user goes on with
probability ``continue_after_click``, after a skip with ``continue_after_skip``. That is the
position bias, and it gives within-list satiation, so a list that covers several interests earns
more clicks than one that repeats the strongest. A clicked item is played with probability
``r_z`` (the user liked what they opened). Exactly, per intent ``z``::

    P(E_0) = 1,   P(E_{p+1}) = P(E_p) (a_p continue_after_click + (1 - a_p) continue_after_skip)
    P(C_p) = sum_z w_z P_z(E_p) a_z(i_p),  P(play_p) = sum_z w_z P_z(E_p) a_z(i_p) r_z(i_p)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.errors import ConfigError, SimulatorError
from simulator.clusters import ItemClusters, spherical_kmeans

__all__ = [
    "SIM_USER_ID_BASE",
    "Arrival",
    "ClickModel",
    "Diversity",
    "ExpectedOutcomes",
    "Interests",
    "Outcome",
    "SimulatedPopulation",
    "poisson_arrivals",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Simulated user ids start here, far above ML-100K's 1..943, so the two never collide.
SIM_USER_ID_BASE = 100_000
_CACHE_LIMIT = 200_000  # cached draws / interest statistics before the caches are cleared


@dataclass(frozen=True)
class ClickModel:
    """Dependent click model parameters (see the module docstring); all are probabilities."""

    attraction_max: float = 0.6
    attraction_floor: float = 0.01
    continue_after_click: float = 0.3
    continue_after_skip: float = 0.9

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"ClickModel.{name} must be in [0, 1]; got {value}")
        if self.attraction_floor > self.attraction_max:
            raise ConfigError("ClickModel.attraction_floor must not exceed attraction_max")

    def attraction(self, relevance: FloatArray) -> FloatArray:
        return self.attraction_floor + (self.attraction_max - self.attraction_floor) * relevance

    def continuation(self, attraction: FloatArray) -> FloatArray:
        """P(examine the next position | examined this one), per intent."""
        return attraction * self.continue_after_click + (1 - attraction) * self.continue_after_skip


@dataclass(frozen=True, eq=False)
class Interests:
    """A user's interests at one time: ``m`` interest vectors and their weights (sum 1)."""

    anchors: IntArray  # (m,) interest keys (the anchor items' catalogue rows, by default)
    clusters: IntArray  # (m,) the interests' item clusters
    weights: FloatArray  # (m,)
    vectors: FloatArray  # (m, D) unit interest vectors


@dataclass(frozen=True)
class Outcome:
    """What the user did with the item at ``position`` (0-based) of one list."""

    position: int
    item_id: int
    examined: bool
    clicked: bool
    played: bool


@dataclass(frozen=True, eq=False)
class ExpectedOutcomes:
    """Exact per-position probabilities of one list for one user at one time."""

    examine: FloatArray  # (L,)
    click: FloatArray  # (L,)
    play: FloatArray  # (L,)

    @property
    def ctr(self) -> float:
        """Expected clicks per item shown (clicks / impressions); 0 for an empty list."""
        return float(self.click.mean()) if len(self.click) else 0.0


@dataclass(frozen=True)
class Diversity:
    """Diversity of a set of consumed items: distinct clusters, and the intra-list distance (the
    mean pairwise cosine distance of the distinct items; Ziegler et al. 2005), 0 below 2 items."""

    items: int
    distinct_clusters: int
    intra_list_distance: float


@dataclass(frozen=True)
class Arrival:
    """A request at simulated time ``t_s`` (seconds since the start) by user index ``user``."""

    t_s: float
    user: int


def poisson_arrivals(
    rate_per_s: float, num_users: int, rng: np.random.Generator, start_s: float = 0.0
) -> Iterator[Arrival]:
    """Endless Poisson arrivals (exponential gaps of mean ``1/rate_per_s``), each by a user drawn
    uniformly from ``0..num_users-1`` (every simulated user is equally active)."""
    if not rate_per_s > 0 or num_users < 1:
        raise ConfigError(f"need rate_per_s > 0 and num_users >= 1; got {rate_per_s}, {num_users}")
    t_s = start_s
    while True:
        t_s += float(rng.exponential(1.0 / rate_per_s))
        yield Arrival(t_s, int(rng.integers(num_users)))


class SimulatedPopulation:
    """``num_users`` simulated users over a catalogue of unit item embeddings (rows = items)."""

    def __init__(
        self,
        item_embeddings: npt.ArrayLike,
        item_ids: npt.ArrayLike | None = None,
        *,
        num_users: int,
        interests_per_user: int = 3,
        drift_per_hour: float = 0.05,
        seed: int = 0,
        num_clusters: int = 30,
        min_cluster_size: int = 10,
        dirichlet_alpha: float = 1.0,
        anchor_weight: float = 0.5,
        relevant_share: float = 0.03,
        temperature: float = 0.25,
        click_model: ClickModel | None = None,
        centre: bool = True,
        clusters: ItemClusters | None = None,
    ) -> None:
        raw = np.asarray(item_embeddings, dtype=np.float64)
        if raw.ndim != 2 or len(raw) < 2:
            raise ConfigError(f"item_embeddings must be (items >= 2, dim); got shape {raw.shape}")
        if not np.all(np.linalg.norm(raw, axis=1) > 0):
            raise ConfigError("item_embeddings has a zero row (is row 0 a padding row?)")
        if centre:
            raw = raw - raw.mean(axis=0)
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        if not np.all(norms > 1e-12):
            raise ConfigError("item_embeddings has a row equal to the catalogue mean")
        self.embeddings: FloatArray = raw / norms
        ids = np.arange(1, len(raw) + 1) if item_ids is None else np.asarray(item_ids)
        self.item_ids: IntArray = ids.astype(np.int64)
        if self.item_ids.shape != (len(raw),) or np.any(np.diff(self.item_ids) <= 0):
            raise ConfigError("item_ids must be sorted, unique and one per embedding row")
        checks: dict[str, tuple[float, bool]] = {
            "num_users >= 1": (num_users, num_users >= 1),
            "interests_per_user >= 1": (interests_per_user, interests_per_user >= 1),
            "0 <= drift_per_hour < inf": (drift_per_hour, 0 <= drift_per_hour < math.inf),
            "seed >= 0": (seed, seed >= 0),
            "dirichlet_alpha > 0": (dirichlet_alpha, dirichlet_alpha > 0),
            "anchor_weight >= 0": (anchor_weight, anchor_weight >= 0),
            "0 < relevant_share < 1": (relevant_share, 0 < relevant_share < 1),
            "temperature > 0": (temperature, temperature > 0),
        }
        for rule, (value, ok) in checks.items():
            if not ok:
                raise ConfigError(f"SimulatedPopulation needs {rule}; got {value!r}")
        self.num_users = num_users
        self.interests_per_user = interests_per_user
        self.drift_per_hour = drift_per_hour
        self.seed = seed
        self.dirichlet_alpha = dirichlet_alpha
        self.anchor_weight = anchor_weight
        self.relevant_share = relevant_share
        self.temperature = temperature
        self.click_model = click_model or ClickModel()
        self.clusters = clusters or spherical_kmeans(self.embeddings, num_clusters, seed)
        if self.clusters.labels.shape != (len(raw),):
            raise ConfigError(f"clusters label {len(self.clusters.labels)} rows, not {len(raw)}")
        sizes = np.bincount(self.clusters.labels, minlength=self.clusters.num_clusters)
        self.eligible_clusters: IntArray = np.flatnonzero(sizes >= min_cluster_size)
        if len(self.eligible_clusters) < interests_per_user:
            raise ConfigError(
                f"only {len(self.eligible_clusters)} clusters have >= {min_cluster_size} items; "
                f"interests_per_user={interests_per_user} needs more (lower min_cluster_size or "
                "raise num_clusters)"
            )
        self._members = [np.flatnonzero(self.clusters.labels == c) for c in range(len(sizes))]
        self._draws: dict[tuple[int, int], tuple[IntArray, FloatArray]] = {}
        self._anchor_stats: dict[int, tuple[FloatArray, float, float]] = {}

    # -- users and their interests -------------------------------------------------------------

    user_id_base = SIM_USER_ID_BASE  # user index u is user id ``user_id_base + u``

    def user_id(self, user: int) -> int:
        return self.user_id_base + self._check_user(user)

    def user_index(self, user_id: int) -> int:
        return self._check_user(user_id - self.user_id_base)

    def _check_user(self, user: int) -> int:
        if not 0 <= user < self.num_users:
            raise SimulatorError(f"user index {user} is outside 0..{self.num_users - 1}")
        return int(user)

    def _draw(self, user: int, segment: int) -> tuple[IntArray, FloatArray]:
        """Draw ``segment`` of ``user``: (interest keys, weights); here a key is an anchor row."""
        key = (user, segment)
        if key not in self._draws:
            if len(self._draws) >= _CACHE_LIMIT:
                self._draws.clear()
            rng = np.random.default_rng([self.seed, user, segment])
            chosen = rng.choice(self.eligible_clusters, self.interests_per_user, replace=False)
            anchors = np.array([rng.choice(self._members[c]) for c in chosen], dtype=np.int64)
            weights = rng.dirichlet(np.full(self.interests_per_user, self.dirichlet_alpha))
            self._draws[key] = (anchors, weights)
        return self._draws[key]

    def _interest_vector(self, key: int) -> FloatArray:
        """The unit interest vector of an interest key (here: an anchor item's row)."""
        centroid = self.clusters.centroids[self.clusters.labels[key]]
        vector = centroid + self.anchor_weight * self.embeddings[key]
        return np.asarray(vector / np.linalg.norm(vector))

    def _key_clusters(self, keys: IntArray) -> IntArray:
        """The item cluster of each interest key."""
        return np.asarray(self.clusters.labels[keys], dtype=np.int64)

    def _anchor(self, anchor: int) -> tuple[FloatArray, float, float]:
        """Interest vector of the key ``anchor`` and its catalogue cosine quantile and spread."""
        if anchor not in self._anchor_stats:
            if len(self._anchor_stats) >= _CACHE_LIMIT:
                self._anchor_stats.clear()
            vector = self._interest_vector(anchor)
            cosines = self.embeddings @ vector
            quantile = float(np.quantile(cosines, 1.0 - self.relevant_share))
            spread = max(float(cosines.std()), 1e-9)
            self._anchor_stats[anchor] = (vector, quantile, spread)
        return self._anchor_stats[anchor]

    def interests(self, user: int, t_s: float) -> Interests:
        """The user's interests at simulated time ``t_s`` (seconds, >= 0)."""
        user = self._check_user(user)
        if not t_s >= 0:
            raise SimulatorError(f"simulated time must be >= 0 s; got {t_s}")
        if self.drift_per_hour == 0:
            anchors, weights = self._draw(user, 0)
        else:
            position = t_s / 3600.0 * self.drift_per_hour  # in segments
            segment = math.floor(position)
            share = position - segment
            first, second = self._draw(user, segment), self._draw(user, segment + 1)
            anchors = np.concatenate([first[0], second[0]])
            weights = np.concatenate([(1 - share) * first[1], share * second[1]])
            keep = weights > 0
            anchors, weights = anchors[keep], weights[keep]
        vectors = np.stack([self._anchor(int(a))[0] for a in anchors])
        return Interests(anchors, self._key_clusters(anchors), weights / weights.sum(), vectors)

    def cluster_weights(self, user: int, t_s: float) -> FloatArray:
        """(num_clusters,) the user's mixture weight on each item cluster at ``t_s``."""
        found = self.interests(user, t_s)
        out = np.zeros(self.clusters.num_clusters)
        np.add.at(out, found.clusters, found.weights)
        return out

    # -- relevance and responses ---------------------------------------------------------------

    def rows(self, item_ids: Sequence[int] | npt.ArrayLike) -> IntArray:
        """Catalogue rows of ``item_ids``; an unknown id is a :class:`SimulatorError`."""
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        rows = np.searchsorted(self.item_ids, ids)
        clipped = np.minimum(rows, len(self.item_ids) - 1)
        unknown = ids[self.item_ids[clipped] != ids]
        if len(unknown):
            raise SimulatorError(
                f"unknown item ids {sorted(set(unknown.tolist()))[:5]}: the simulator's catalogue "
                f"holds {len(self.item_ids)} items, ids {self.item_ids[0]}..{self.item_ids[-1]}"
            )
        return clipped.astype(np.int64)

    def _relevance_rows(self, rows: IntArray, found: Interests) -> FloatArray:
        """(len(rows), m) relevance of catalogue rows to each interest (module docstring)."""
        stats = [self._anchor(int(a)) for a in found.anchors]
        quantile = np.array([s[1] for s in stats])
        spread = np.array([s[2] for s in stats])
        cosines = self.embeddings[rows] @ found.vectors.T
        z = (cosines - quantile) / (self.temperature * spread)
        return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)))  # the logistic sigmoid, overflow-free

    def intent_relevance(self, user: int, item_ids: Sequence[int], t_s: float) -> FloatArray:
        """(L, m) relevance of each item to each of the user's current interests, in (0, 1)."""
        return self._relevance_rows(self.rows(item_ids), self.interests(user, t_s))

    def relevance(self, user: int, item_ids: Sequence[int], t_s: float) -> FloatArray:
        """(L,) expected relevance over the visit's intent: ``sum_z w_z r_z(i)``, in (0, 1)."""
        found = self.interests(user, t_s)
        return self._relevance_rows(self.rows(item_ids), found) @ found.weights

    def expected(self, user: int, item_ids: Sequence[int], t_s: float) -> ExpectedOutcomes:
        """Exact examination, click and play probability of each position (module docstring)."""
        found = self.interests(user, t_s)
        relevance = self._relevance_rows(self.rows(item_ids), found)
        attraction = self.click_model.attraction(relevance)
        examine_z = np.ones(len(found.weights))
        examine, click, play = (np.zeros(len(relevance)) for _ in range(3))
        for p in range(len(relevance)):
            examine[p] = examine_z @ found.weights
            click[p] = (examine_z * attraction[p]) @ found.weights
            play[p] = (examine_z * attraction[p] * relevance[p]) @ found.weights
            examine_z = examine_z * self.click_model.continuation(attraction[p])
        return ExpectedOutcomes(examine, click, play)

    def expected_ctr(self, user: int, item_ids: Sequence[int], t_s: float) -> float:
        """Exact expected clicks per shown item of this list for this user at ``t_s``."""
        return self.expected(user, item_ids, t_s).ctr

    def respond(
        self, user: int, item_ids: Sequence[int], t_s: float, rng: np.random.Generator
    ) -> list[Outcome]:
        """One visit: draw the intent, then scan, click, play and stop as the DCM says."""
        found = self.interests(user, t_s)
        relevance = self._relevance_rows(self.rows(item_ids), found)
        attraction = self.click_model.attraction(relevance)
        intent = int(rng.choice(len(found.weights), p=found.weights))
        outcomes, examining = [], True
        for p, item_id in enumerate(item_ids):
            clicked = played = False
            if examining:
                clicked = bool(rng.random() < attraction[p, intent])
                played = clicked and bool(rng.random() < relevance[p, intent])
                model = self.click_model
                go_on = model.continue_after_click if clicked else model.continue_after_skip
                examined, examining = True, bool(rng.random() < go_on)
            else:
                examined = False
            outcomes.append(Outcome(p, int(item_id), examined, clicked, played))
        return outcomes

    # -- ground-truth lists and measures -------------------------------------------------------

    def oracle_items(self, user: int, k: int, t_s: float) -> IntArray:
        """A near-best list of ``k`` items for expected clicks: greedy by marginal gain, as
        IA-Select (Agrawal et al. 2009) does for intent-aware utility. After a likely click on
        one interest's item, examination under that intent drops, so the next picks cover the
        other interests."""
        found = self.interests(user, t_s)
        everything = np.arange(len(self.item_ids))
        attraction = self.click_model.attraction(self._relevance_rows(everything, found))
        examine_z = np.ones(len(found.weights))
        chosen: list[int] = []
        for _ in range(min(k, len(everything))):
            gain = attraction @ (found.weights * examine_z)
            gain[chosen] = -np.inf
            best = int(np.argmax(gain))
            chosen.append(best)
            examine_z = examine_z * self.click_model.continuation(attraction[best])
        return self.item_ids[chosen]

    def mean_embedding_items(self, user: int, k: int, t_s: float) -> IntArray:
        """The ``k`` items closest to the user's weighted mean interest vector: the best list a
        single-embedding retriever could make if it knew the user's true average taste."""
        found = self.interests(user, t_s)
        scores = self.embeddings @ (found.weights @ found.vectors)
        return self.item_ids[np.argsort(-scores, kind="stable")[:k]]

    def random_items(self, k: int, rng: np.random.Generator) -> IntArray:
        """``k`` distinct items uniformly at random (the no-information baseline)."""
        return np.asarray(rng.choice(self.item_ids, size=k, replace=False), dtype=np.int64)

    def consumed_diversity(self, item_ids: Sequence[int]) -> Diversity:
        """Diversity of the items a user consumed (repeats count once)."""
        rows = np.unique(self.rows(item_ids))
        clusters = len(np.unique(self.clusters.labels[rows]))
        if len(rows) < 2:
            return Diversity(len(rows), clusters, 0.0)
        vectors = self.embeddings[rows]
        similarity = vectors @ vectors.T
        pairs = len(rows) * (len(rows) - 1)
        mean_similarity = (similarity.sum() - np.trace(similarity)) / pairs
        return Diversity(len(rows), clusters, float(1.0 - mean_similarity))
