"""The paper's stage 1, by analogy: a residual cosine codebook fitted on *trained* item embeddings.

HyMiRec's long history is read from codes only. By default they are the codes of the item-text
embeddings (``model.data.build_catalog``: what the feature store publishes). Here a first model is
trained, its item embeddings (text adapter plus item ID, model width) get a codebook of the same
shape (``features.codebook.ResidualCodebook``, same levels and size, so the same bytes per item),
and a second model reads its long history through those codes, with the long branch's own
projection (``Config(long_projection="own")``: the centroids live in the first model's space,
not the text encoder's).

An offline experiment (``benchmarks.offline_eval``'s ``codebook=trained`` variant key): the
streaming pipeline still publishes the text codebook's codes, so a model trained this way is not
served.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from features.codebook import ResidualCodebook
from model.base import CatalogInfo

__all__ = ["with_trained_codebook"]


def with_trained_codebook(
    catalog: CatalogInfo, item_vectors: Tensor, seed: int = 0
) -> tuple[CatalogInfo, float]:
    """``catalog`` with its codes, centroids and scales replaced by a codebook of the same levels
    and size fitted on ``item_vectors`` (N + 1, D) (row 0, the pad, is left out and stays
    UNKNOWN); and the mean reconstruction cosine of the items under the new codebook."""
    levels, size = (int(n) for n in catalog.codebook_centroids.shape[:2])
    if item_vectors.shape[0] != catalog.num_items + 1:
        raise ValueError(
            f"item_vectors has {item_vectors.shape[0]} rows; the catalogue needs "
            f"{catalog.num_items + 1} (row 0 = pad)"
        )
    vectors = item_vectors[1:].detach().float().cpu().numpy()
    codebook = ResidualCodebook.fit(vectors, levels=levels, size=size, seed=seed)
    item_codes = codebook.encode(vectors).astype(np.int64)
    codes = np.full((catalog.num_items + 1, levels), codebook.UNKNOWN, dtype=np.int64)
    codes[1:] = item_codes
    cosine = float(codebook.reconstruction_cosine(vectors, item_codes).mean())
    replaced = dataclasses.replace(
        catalog,
        codes=torch.from_numpy(codes),
        codebook_centroids=torch.from_numpy(np.array(codebook.centroids, dtype=np.float32)),
        codebook_scales=torch.from_numpy(np.array(codebook.scales, dtype=np.float32)),
    )
    return replaced, cosine
