"""A small client of the feature server (``hymirec features serve``) that decodes long histories.

It needs only HTTP, JSON, base64 and numpy, and does what a client in any language does:

1. ``POST /get-online-features`` with ``{"features": ["user_history:long_codes", ...],
   "entities": {"user_id": [196]}}``. Feast answers one column per feature: ``results[i]`` has
   ``values`` (one per entity row; ``null`` where the status is ``NOT_FOUND``), in the order of
   ``metadata.feature_names``. ``long_codes`` is base64 of the packed codes.
2. Read ``codebook_meta`` for the row's ``codebook_version``: ``levels`` L, ``size`` K, ``dim`` D,
   ``code_bytes`` (1 or 2).
3. Read ``codebook_centroids:vector`` for every ``(codebook_version, level, code)``, level in
   0..L-1, code in 0..K (code K, "unknown item", is all zeros). A version's rows never change,
   so cache them by version.
4. Unpack ``long_codes``: little-endian unsigned integers of ``code_bytes`` bytes, L per item,
   items oldest first. Item t decodes to ``sum over l of vector[l, codes[t, l]]``, summed in
   level order in float64 and rounded to float32: what ``ResidualCodebook.decode`` gives.

A row coded with an older codebook decodes with that version's rows, which publishing a newer
codebook leaves in place (``features.codebook_publish``).
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from core.errors import CodebookError, FeatureStoreError

__all__ = ["CodebookTable", "FeatureServerClient", "HistoryRow", "feature_columns"]

HISTORY_FEATURES = [
    "recent_item_ids",
    "long_codes",
    "history_len",
    "last_ts_ms",
    "last_offset",
    "codebook_version",
]


@dataclass(frozen=True)
class HistoryRow:
    """One user's ``user_history`` row from the server (``long_codes`` base64-decoded)."""

    user_id: int
    recent_item_ids: list[int]
    long_codes: bytes
    history_len: int
    last_ts_ms: int
    last_offset: int
    codebook_version: str


@dataclass(frozen=True)
class CodebookTable:
    """One published codebook version: ``vectors[l, k]`` (L, K+1, D) float64, row K zeros."""

    version: str
    code_bytes: int
    vectors: npt.NDArray[np.float64]

    @property
    def levels(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def size(self) -> int:
        return int(self.vectors.shape[1]) - 1

    def unpack(self, long_codes: bytes) -> npt.NDArray[np.int64]:
        """Packed codes -> (T, L) int64."""
        item_bytes = self.code_bytes * self.levels
        if len(long_codes) % item_bytes:
            raise CodebookError(
                f"{len(long_codes)} bytes of codes are not whole items of {item_bytes} bytes"
            )
        codes = np.frombuffer(long_codes, dtype=f"<u{self.code_bytes}").astype(np.int64)
        if codes.size and codes.max() > self.size:
            raise CodebookError(f"code {codes.max()} is above the codebook's {self.size}")
        return codes.reshape(-1, self.levels)

    def decode(self, long_codes: bytes) -> npt.NDArray[np.float32]:
        """Packed codes -> (T, D) float32 approximate item embeddings, oldest item first."""
        codes = self.unpack(long_codes)
        out = np.zeros((codes.shape[0], self.vectors.shape[2]))
        for level in range(self.levels):
            out += self.vectors[level, codes[:, level]]
        return out.astype(np.float32)


def feature_columns(answer: dict[str, Any]) -> dict[str, list[Any]]:
    """Feast's ``/get-online-features`` answer as ``{feature name: values}``, absent values None."""
    names = answer["metadata"]["feature_names"]
    return {
        name: [
            v if s == "PRESENT" else None for v, s in zip(r["values"], r["statuses"], strict=True)
        ]
        for name, r in zip(names, answer["results"], strict=True)
    }


class FeatureServerClient:
    """Reads rows and codebooks from a feature server at ``base_url``; caches codebooks by version.

    ``chunk_rows`` bounds the entity rows of one request (the server refuses more than its
    ``max_rows``, 1,000 by default, with a 413).
    """

    def __init__(self, base_url: str, timeout_s: float = 10.0, chunk_rows: int = 500) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s)
        self.chunk_rows = chunk_rows
        self._codebooks: dict[str, CodebookTable] = {}
        self._lock = threading.Lock()

    def online(self, features: list[str], entities: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """One ``/get-online-features`` call; a non-200 answer raises FeatureStoreError."""
        try:
            response = self.http.post(
                "/get-online-features", json={"features": features, "entities": entities}
            )
        except httpx.HTTPError as exc:
            raise FeatureStoreError(f"feature server unreachable: {exc}") from exc
        if response.status_code != 200:
            raise FeatureStoreError(
                f"feature server answered {response.status_code}: {response.text}"
            )
        return feature_columns(response.json())

    def user_histories(self, user_ids: list[int]) -> dict[int, HistoryRow | None]:
        """Users' ``user_history`` rows (None: the user has none), ``chunk_rows`` users a call."""
        out: dict[int, HistoryRow | None] = {}
        features = [f"user_history:{name}" for name in HISTORY_FEATURES]
        for start in range(0, len(user_ids), self.chunk_rows):
            chunk = [int(u) for u in user_ids[start : start + self.chunk_rows]]
            data = self.online(features, {"user_id": chunk})
            for i, user in enumerate(chunk):
                if data["history_len"][i] is None:
                    out[user] = None
                    continue
                out[user] = HistoryRow(
                    user_id=user,
                    recent_item_ids=[int(x) for x in data["recent_item_ids"][i] or []],
                    long_codes=base64.b64decode(data["long_codes"][i] or ""),
                    history_len=int(data["history_len"][i]),
                    last_ts_ms=int(data["last_ts_ms"][i]),
                    last_offset=int(data["last_offset"][i]),
                    codebook_version=str(data["codebook_version"][i]),
                )
        return out

    def codebook(self, version: str) -> CodebookTable:
        """The published codebook ``version`` (read once, then from the cache)."""
        with self._lock:
            cached = self._codebooks.get(version)
        if cached is not None:
            return cached
        meta = self.online(
            ["codebook_meta:levels", "codebook_meta:size", "codebook_meta:dim",
             "codebook_meta:code_bytes"],
            {"codebook_version": [version]},
        )  # fmt: skip
        if meta["levels"][0] is None:
            raise CodebookError(f"codebook {version} is not published on the feature server")
        levels, size, dim = int(meta["levels"][0]), int(meta["size"][0]), int(meta["dim"][0])
        keys = [(level, code) for level in range(levels) for code in range(size + 1)]
        vectors: list[Any] = []
        for start in range(0, len(keys), self.chunk_rows):
            chunk = keys[start : start + self.chunk_rows]
            entities: dict[str, list[Any]] = {
                "codebook_version": [version] * len(chunk),
                "level": [level for level, _ in chunk],
                "code": [code for _, code in chunk],
            }
            vectors.extend(self.online(["codebook_centroids:vector"], entities)["vector"])
        if any(v is None or len(v) != dim for v in vectors):
            raise CodebookError(f"codebook {version} is published incompletely")
        table = CodebookTable(
            version=version,
            code_bytes=int(meta["code_bytes"][0]),
            vectors=np.asarray(vectors, dtype=np.float64).reshape(levels, size + 1, dim),
        )
        with self._lock:
            self._codebooks[version] = table
        return table

    def long_history(self, row: HistoryRow) -> npt.NDArray[np.float32]:
        """The row's long history decoded with the codebook version the row names: (T, D)."""
        return self.codebook(row.codebook_version).decode(row.long_codes)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FeatureServerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
