"""Item text embeddings from the LLM backbone (SmolLM2-135M-Instruct), cached like MiniLM's.

The paper's stage 1 encodes each item's text with the LLM once and freezes the result. Here an
item's vector is the mean, over its tokens, of the backbone's last hidden states (after the final
RMSNorm), L2-normalised (:func:`encode_texts`), then centred on the catalogue's mean and
normalised again (:func:`embed_item_texts_llm`): float32 (n, 576). The texts are the ones
MiniLM embeds (``core.movielens.item_texts``: title, year, genres), so the two encoders are
compared on the same input. Results are cached as one ``.npy`` keyed by a hash of the backbone,
the pooling and the texts (``features.item_embeddings`` does the same for MiniLM).

This lives in ``model/`` rather than ``features/`` because it needs ``model.llm_backbone``, and
``features`` may not import ``model`` (tests/test_layers.py); ``model.data`` selects it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from core.errors import DataError
from core.movielens import item_texts, load_items
from features.item_embeddings import read_cache, write_cache
from model.llm_backbone import BACKBONE_NAME, Backbone, load_backbone

__all__ = [
    "LLM_EMBEDDING_DIM",
    "embed_item_texts_llm",
    "embed_movielens_items_llm",
    "encode_texts",
    "llm_embedding_cache_path",
]

LLM_EMBEDDING_DIM = 576
POOLING = "mean of last hidden states, centred on the catalogue mean"


@torch.no_grad()
def encode_texts(backbone: Backbone, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(len(texts), hidden) unit vectors: each text's mean last hidden state over its tokens.

    Texts are batched by token count (less padding) and returned in the given order; padded
    positions are masked out of attention and out of the mean, so a text's vector does not
    depend on its batch-mates beyond float rounding.
    """
    if not texts:
        raise DataError("no texts to encode")
    tokens = backbone.tokenizer(texts)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(tokens[i]))
    out = torch.empty(len(texts), backbone.hidden_size)
    device = next(backbone.model.parameters()).device
    pad = int(backbone.tokenizer.pad_token_id)
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(tokens[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, : len(tokens[i])] = torch.tensor(tokens[i])
            mask[j, : len(tokens[i])] = 1
        hidden = backbone.model(
            input_ids=ids.to(device), attention_mask=mask.to(device)
        ).last_hidden_state.float()
        weights = mask.to(device=device, dtype=hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        out[torch.tensor(rows)] = pooled.cpu()
    norms = out.norm(dim=1, keepdim=True)
    if not bool((norms > 0).all()):
        raise DataError("the LLM returned a zero vector; cannot normalise")
    unit: torch.Tensor = out / norms
    return unit


def llm_embedding_cache_path(texts: list[str], cache_dir: Path) -> Path:
    """``item_embeddings_llm_<16 hex of sha256(backbone, pooling, texts)>.npy``."""
    key = json.dumps([BACKBONE_NAME, POOLING, texts]).encode("utf-8")
    return Path(cache_dir) / f"item_embeddings_llm_{hashlib.sha256(key).hexdigest()[:16]}.npy"


def embed_item_texts_llm(
    texts: list[str], cache_dir: Path, batch_size: int = 64, weights_dir: Path | None = None
) -> npt.NDArray[np.float32]:
    """Unit-norm float32 LLM embeddings (len(texts), 576) of ``texts`` taken together (they are
    centred on their mean), from or into the cache in ``cache_dir``; the backbone's
    de-quantised weights are cached in ``weights_dir`` (default: ``cache_dir``)."""
    if not texts:
        raise DataError("no texts to embed")
    path = llm_embedding_cache_path(texts, cache_dir)
    cached = read_cache(path, (len(texts), LLM_EMBEDDING_DIM))
    if cached is not None:
        return cached
    backbone = load_backbone(weights_dir if weights_dir is not None else cache_dir)
    raw = encode_texts(backbone, texts, batch_size).double()
    # The raw vectors share one dominant direction (on ML-100K the mean pairwise cosine is 0.95,
    # MiniLM's 0.46): centre them on their mean before normalising, which leaves the neighbour
    # structure as it was but spreads the vectors over the sphere for the cosine codebook.
    centred = raw - raw.mean(dim=0) if len(texts) > 1 else raw
    norms = centred.norm(dim=1, keepdim=True)
    if not bool((norms > 0).all()):
        raise DataError("an item's LLM vector equals the mean of all items; cannot normalise")
    embeddings: npt.NDArray[np.float32] = (centred / norms).numpy().astype(np.float32)
    if embeddings.shape != (len(texts), LLM_EMBEDDING_DIM):
        raise DataError(f"LLM embeddings have shape {embeddings.shape}; expected (n, 576)")
    write_cache(path, embeddings)
    return embeddings


def embed_movielens_items_llm(
    cache_dir: Path, batch_size: int = 64
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(item_ids, LLM embeddings) for every MovieLens-100K item, ordered by item_id."""
    items = load_items()
    item_ids = items["item_id"].to_numpy(dtype=np.int64)
    embeddings = embed_item_texts_llm(item_texts(items), cache_dir, batch_size)
    return item_ids, embeddings
