"""Tiny catalogues and sequence data for the offline-evaluation tests (no ML-100K needed)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model.base import Batch, CatalogInfo
from model.data import SequenceData

GENRES = ("Action", "Comedy", "Drama", "Horror")


def tiny_catalog(num_items: int, text_dim: int = 16, levels: int = 2, size: int = 8) -> CatalogInfo:
    """Random unit text embeddings, random codes, one or two genres per item (seeded)."""
    gen = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(num_items + 1, text_dim, generator=gen), dim=-1)
    text[0] = 0.0
    codes = torch.randint(0, size, (num_items + 1, levels), generator=gen)
    codes[0] = size  # UNKNOWN
    centroids = F.normalize(torch.randn(levels, size, text_dim, generator=gen), dim=-1)
    genres = [frozenset[str]()] + [
        frozenset({GENRES[i % 4], GENRES[(i * 7) % 4]}) for i in range(1, num_items + 1)
    ]
    scales = torch.rand(levels, size, generator=gen)
    return CatalogInfo(num_items, text, codes, centroids, scales, genres)


def cyclic_data(num_users: int, num_items: int, length: int, seed: int = 0) -> SequenceData:
    """Each user walks the catalogue in order from a random start: item i is followed by i + 1
    (wrapping), one item a minute. A sequence model can learn this; popularity cannot."""
    rng = np.random.default_rng(seed)
    items, stamps = [], []
    for _ in range(num_users):
        start = int(rng.integers(num_items))
        items.append((start + np.arange(length)) % num_items + 1)
        stamps.append(1_000_000 + 60 * np.arange(length, dtype=np.int64))
    return SequenceData(
        np.arange(num_users, dtype=np.int64),
        np.arange(100, 100 + num_items, dtype=np.int64),
        tuple(np.asarray(i, dtype=np.int64) for i in items),
        tuple(stamps),
    )


def batch_of(history: torch.Tensor, history_ts: torch.Tensor | None = None) -> Batch:
    """A batch with the given left-padded histories and one dummy target each."""
    if history_ts is None:
        history_ts = torch.where(history > 0, 1_000_000 + 60 * torch.arange(history.shape[1]), 0)
    zeros = torch.zeros(history.shape[0], 1, dtype=torch.int64)
    return Batch(torch.arange(history.shape[0]), history, history_ts, zeros, zeros.clone())
