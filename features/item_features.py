"""Item features: text embeddings → residual cosine codebook → per-item codes, online in Feast.

``build_item_features`` is the offline step the CLI runs before the stream starts: embed every
catalogue item (cached), fit the codebook, encode the catalogue, save both, register the Feast
definitions, write the item views (online and offline) and publish the codebook for clients
(``features.codebook_publish``). ``ItemCodeTable`` is what the stream
worker loads to turn item ids into codes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import CodebookError
from core.movielens import item_texts, load_items
from core.settings import Settings
from features.codebook import ResidualCodebook
from features.codebook_publish import publish_codebook
from features.item_embeddings import embed_item_texts
from features.store import FeatureStoreClient

__all__ = ["ItemCodeTable", "ItemFeatures", "build_item_features", "load_item_features"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemCodeTable:
    """Codes of every known item; unknown items get the codebook's reserved UNKNOWN code."""

    item_ids: np.ndarray  # (n,) int64, sorted
    codes: np.ndarray  # (n, L) codebook.code_dtype
    unknown: int

    def lookup(self, item_ids: list[int] | np.ndarray) -> np.ndarray:
        query = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, query)
        pos_clipped = np.minimum(pos, len(self.item_ids) - 1)
        found = self.item_ids[pos_clipped] == query
        out = np.full((len(query), self.codes.shape[1]), self.unknown, dtype=self.codes.dtype)
        out[found] = self.codes[pos_clipped[found]]
        return out


@dataclass(frozen=True)
class ItemFeatures:
    codebook: ResidualCodebook
    table: ItemCodeTable
    embeddings: np.ndarray  # (n, D) float32, rows aligned with table.item_ids


def build_item_features(
    settings: Settings, store: FeatureStoreClient | None = None
) -> ItemFeatures:
    """Embed, fit, encode, save, and publish the item views; returns what it built."""
    items = load_items()
    embeddings = embed_item_texts(
        item_texts(items),
        settings.embedding_cache_dir,
        batch_size=settings.features.embedding_batch_size,
    )
    codebook = ResidualCodebook.fit(
        embeddings,
        levels=settings.codebook.levels,
        size=settings.codebook.size,
        seed=settings.codebook.seed,
    )
    item_ids = items["item_id"].to_numpy(dtype=np.int64)
    codes = codebook.encode(embeddings)
    folder = settings.codebook_dir
    folder.mkdir(parents=True, exist_ok=True)
    codebook.save(folder)
    np.savez(folder / "item_codes.npz", item_ids=item_ids, codes=codes, embeddings=embeddings)
    cosine = codebook.reconstruction_cosine(embeddings, codes)
    (folder / "summary.json").write_text(
        json.dumps(
            {
                "version": codebook.version,
                "items": len(item_ids),
                "levels": codebook.levels,
                "size": codebook.size,
                "bytes_per_item": codebook.bytes_per_item,
                "mean_reconstruction_cosine": float(cosine.mean()),
            },
            indent=2,
        )
    )
    log.info(
        "codebook %s: %d items, %d bytes/item, mean reconstruction cosine %.3f",
        codebook.version, len(item_ids), codebook.bytes_per_item, float(cosine.mean()),
    )  # fmt: skip
    client = store or FeatureStoreClient(settings)
    client.apply_definitions()
    _publish_items(client, settings.feast_dir, items, codebook, codes)
    publish_codebook(client, settings.feast_dir, codebook)
    table = ItemCodeTable(item_ids=item_ids, codes=codes, unknown=codebook.size)
    return ItemFeatures(codebook=codebook, table=table, embeddings=embeddings)


def _publish_items(
    client: FeatureStoreClient,
    feast_dir: Path,
    items: pd.DataFrame,
    codebook: ResidualCodebook,
    codes: np.ndarray,
) -> None:
    stamp = datetime.now(UTC)
    codebook_frame = pd.DataFrame(
        {
            "item_id": items["item_id"].astype("int64"),
            "codes": [codebook.pack(row[None, :]) for row in codes],
            "codebook_version": codebook.version,
            "event_timestamp": stamp,
        }
    )
    metadata_frame = pd.DataFrame(
        {
            "item_id": items["item_id"].astype("int64"),
            "title": items["title"].astype(str),
            "year": items["year"].astype("int64"),
            "genres": [list(g) for g in items["genres"]],
            "event_timestamp": stamp,
        }
    )
    # The parquet files are the offline store's copy; the online store gets the same rows.
    codebook_frame.to_parquet(feast_dir / "offline" / "item_codebook.parquet", index=False)
    metadata_frame.to_parquet(feast_dir / "offline" / "item_metadata.parquet", index=False)
    client.push("item_codebook_push", codebook_frame)
    client.push("item_metadata_push", metadata_frame)


def load_item_features(settings: Settings) -> ItemFeatures:
    """Load what ``build_item_features`` saved; a clear error if it has not run."""
    folder = settings.codebook_dir
    if not (folder / "item_codes.npz").is_file():
        raise CodebookError(
            f"no item codes under {folder}: run `hymirec features build` (or `hymirec demo`) first"
        )
    codebook = ResidualCodebook.load(folder)
    data = np.load(folder / "item_codes.npz")
    table = ItemCodeTable(
        item_ids=data["item_ids"],
        codes=data["codes"].astype(codebook.code_dtype),
        unknown=codebook.size,
    )
    return ItemFeatures(codebook=codebook, table=table, embeddings=data["embeddings"])
