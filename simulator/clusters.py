"""Spherical k-means over unit item embeddings: the item clusters that users' interests live in.

Spherical k-means (Dhillon & Modha 2001) assigns each unit vector to the centroid of highest
cosine and re-estimates each centroid as the normalised mean of its members; seeding is
k-means++ (Arthur & Vassilvitskii 2007) on the cosine distance ``1 - cos``. Deterministic given
the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.errors import ConfigError

__all__ = ["ItemClusters", "spherical_kmeans"]


@dataclass(frozen=True, eq=False)
class ItemClusters:
    """``centroids`` (k, D) unit vectors; ``labels`` (n,) the cluster of each catalogue row."""

    centroids: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]

    @property
    def num_clusters(self) -> int:
        return len(self.centroids)


def _normalise(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.asarray(rows / np.where(norms > 0, norms, 1.0))


def spherical_kmeans(
    embeddings: npt.ArrayLike, num_clusters: int, seed: int, max_iterations: int = 100
) -> ItemClusters:
    """Cluster the rows of ``embeddings`` (normalised here) into ``num_clusters`` groups."""
    points = _normalise(np.asarray(embeddings, dtype=np.float64))
    n = len(points)
    if not 1 <= num_clusters <= n:
        raise ConfigError(
            f"num_clusters must be in 1..{n} (the number of items); got {num_clusters}"
        )
    rng = np.random.default_rng(seed)
    # k-means++: each next seed is drawn with probability proportional to its distance from the
    # nearest seed so far (the cosine distance; the squared one changes little on the sphere).
    chosen = [int(rng.integers(n))]
    nearest = 1.0 - points @ points[chosen[0]]
    for _ in range(1, num_clusters):
        weights = np.clip(nearest, 0.0, None)
        total = weights.sum()
        pick = int(rng.choice(n, p=weights / total)) if total > 0 else int(rng.integers(n))
        chosen.append(pick)
        nearest = np.minimum(nearest, 1.0 - points @ points[pick])
    centroids = points[chosen].copy()
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(max_iterations):
        similarity = points @ centroids.T
        new_labels = np.argmax(similarity, axis=1).astype(np.int64)
        for cluster in range(num_clusters):
            members = new_labels == cluster
            if members.any():
                centroids[cluster] = _normalise(points[members].sum(axis=0))
            else:
                # An empty cluster takes the point that fits its own centroid worst.
                worst = int(np.argmin(similarity[np.arange(n), new_labels]))
                new_labels[worst] = cluster
                centroids[cluster] = points[worst]
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return ItemClusters(centroids, labels)
