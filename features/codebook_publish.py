"""The codebook published for clients of the feature server, one immutable set of rows per version.

A ``user_history`` row carries ``long_codes`` (packed codes, ``code_bytes`` little-endian unsigned
bytes per code, ``levels`` codes per item, oldest item first) and the ``codebook_version`` that
coded them. Two feature views, both keyed by that version, let a client outside Python decode it:

- ``codebook_meta`` (key ``codebook_version``): ``levels``, ``size``, ``dim``, ``code_bytes``;
- ``codebook_centroids`` (keys ``codebook_version``, ``level``, ``code``): ``vector``, the D floats
  ``scales[level, code] * centroids[level, code]``, with ``code == size`` (UNKNOWN) as zeros.

An item's decoded embedding is the sum over levels of ``vector[level, code]``, added in level order
in float64 and rounded to float32 at the end: exactly :meth:`ResidualCodebook.decode`. Because the
rows are keyed by version, publishing a new codebook adds rows and never replaces an older
version's, so a client holding a row coded with the older version still decodes it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from features.codebook import ResidualCodebook
from features.store import FeatureStoreClient

__all__ = ["codebook_frames", "decode_vectors", "publish_codebook"]

log = logging.getLogger(__name__)

_META_FILE = "codebook_meta.parquet"
_CENTROIDS_FILE = "codebook_centroids.parquet"


def decode_vectors(codebook: ResidualCodebook) -> np.ndarray:
    """(L, K+1, D) float64: row ``[l, k]`` is what code ``k`` at level ``l`` adds to a decode."""
    table = np.zeros((codebook.levels, codebook.size + 1, codebook.dim))
    table[:, : codebook.size] = codebook.scales[..., None].astype(np.float64) * codebook.centroids
    return table


def codebook_frames(
    codebook: ResidualCodebook, now: datetime | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The push frames of ``codebook_meta`` (one row) and ``codebook_centroids`` (L x (K+1))."""
    stamp = now or datetime.now(UTC)
    version = codebook.version
    meta = pd.DataFrame(
        {
            "codebook_version": [version],
            "levels": [codebook.levels],
            "size": [codebook.size],
            "dim": [codebook.dim],
            "code_bytes": [codebook.code_dtype.itemsize],
            "event_timestamp": [stamp],
        }
    )
    table = decode_vectors(codebook)
    levels, codes = np.meshgrid(
        np.arange(codebook.levels, dtype=np.int64),
        np.arange(codebook.size + 1, dtype=np.int64),
        indexing="ij",
    )
    centroids = pd.DataFrame(
        {
            "codebook_version": version,
            "level": levels.ravel(),
            "code": codes.ravel(),
            "vector": list(table.reshape(-1, codebook.dim)),
            "event_timestamp": stamp,
        }
    )
    return meta, centroids


def _append_offline(path: Path, frame: pd.DataFrame) -> None:
    """Keep every version in the offline parquet: this version's rows replace its earlier ones."""
    if path.is_file():
        earlier = pd.read_parquet(path)
        earlier = earlier[earlier["codebook_version"] != frame["codebook_version"].iloc[0]]
        frame = pd.concat([earlier, frame], ignore_index=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def publish_codebook(
    client: FeatureStoreClient, feast_dir: Path, codebook: ResidualCodebook
) -> str:
    """Write the codebook's rows online (and to the offline parquet); returns its version.

    Publishing the same codebook again rewrites identical rows; the centroids go first, so a
    client that finds a version in ``codebook_meta`` finds all its centroids too.
    """
    meta, centroids = codebook_frames(codebook)
    offline = feast_dir / "offline"
    offline.mkdir(parents=True, exist_ok=True)
    _append_offline(offline / _CENTROIDS_FILE, centroids)
    _append_offline(offline / _META_FILE, meta)
    client.push("codebook_centroids_push", centroids)
    client.push("codebook_meta_push", meta)
    log.info("published codebook %s (%d centroid rows)", codebook.version, len(centroids))
    return codebook.version
