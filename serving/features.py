"""A user's online features, read from Feast and turned into what the models take.

The stream worker keeps, per user, the last R item ids verbatim (``recent_item_ids``) and the last
P items as packed residual-codebook codes (``long_codes``, one row per item, oldest first; the last
R rows are the codes of the recent ids). So:

- HyMiRec is served from the codes directly: its long history only ever goes through the codebook
  (``HyMiRec.encode_long``), and its recent window is the verbatim ids;
- single-embedding models (SASRec, HSTU, ...) take item ids, so they see the R recent ids only;
- the items a user has seen, which the ranking leaves out, are the R recent ids plus every long-
  history item whose code row identifies one catalogue item (a code row that several items share,
  or one that is all UNKNOWN, says only "one of these": those items are not filtered).

Rows written with another codebook (``codebook_version`` differs from the catalogue's) cannot be
decoded: their long history is dropped and only the recent ids are used (counted in
``UserFeatureReader.stale_codebook_rows``).

Rows are read with :class:`serving.feast_rows.HistoryRows` (the online store's own read, without
``get_online_features``' generic response building). Each decoded history carries ``key``, a
digest of everything a model reads from it (the recent ids and the long codes): what the models
cache a user's interests under (``serving.models``), so a history that changed is never served
from a stale cache entry.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.errors import CodebookError
from features.codebook import ResidualCodebook
from features.store import FeatureStoreClient, UserHistoryFeatures
from model.base import CatalogInfo
from serving.feast_rows import HistoryRows

__all__ = ["CodeIndex", "UserFeatureReader", "UserHistory", "catalog_codebook"]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]


def catalog_codebook(catalog: CatalogInfo) -> ResidualCodebook:
    """The codebook the catalogue's codes (and so the models) were built with."""
    return ResidualCodebook(catalog.codebook_centroids.numpy(), catalog.codebook_scales.numpy())


class CodeIndex:
    """Code rows -> item ids, for the code rows that exactly one catalogue item has."""

    def __init__(self, item_codes: IntArray, unknown: int) -> None:
        """``item_codes`` (N + 1, levels): row ``i`` holds item ``i``'s codes (row 0 is padding)."""
        codes = np.asarray(item_codes, dtype=np.int64)
        self.base = unknown + 1
        self.unknown = unknown
        keys = self._keys(codes[1:])
        item_ids = np.arange(1, len(codes), dtype=np.int64)
        known = ~(codes[1:] == unknown).all(axis=1)
        unique_keys, first, counts = np.unique(keys[known], return_index=True, return_counts=True)
        single = counts == 1
        self.keys = unique_keys[single]
        self.item_ids = item_ids[known][first[single]]
        self.ambiguous_items = int(known.sum() - single.sum())

    def _keys(self, codes: IntArray) -> IntArray:
        """One integer per code row: the codes as digits in base ``unknown + 1``."""
        keys = np.zeros(len(codes), dtype=np.int64)
        for level in range(codes.shape[1]):
            keys = keys * self.base + codes[:, level]
        return keys

    def items(self, codes: IntArray) -> IntArray:
        """The item ids of the code rows that identify one item (others are left out)."""
        if len(codes) == 0 or len(self.keys) == 0:
            return np.zeros(0, dtype=np.int64)
        keys = self._keys(np.asarray(codes, dtype=np.int64))
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[pos] == keys
        return np.asarray(self.item_ids[pos[found]], dtype=np.int64)


@dataclass(frozen=True)
class UserHistory:
    """One user's history as the models take it.

    ``recent_item_ids`` (R,) oldest first; ``long_codes`` (T, levels) the codes of the last T
    items, oldest first, the last ``len(recent_item_ids)`` rows being the recent items' codes
    (empty when the row's codebook is not the catalogue's); ``seen_item_ids`` what the ranking
    leaves out; ``key`` a digest of ``recent_item_ids`` and ``long_codes`` (empty: not known,
    nothing is cached for the history).
    """

    user_id: int
    recent_item_ids: IntArray
    long_codes: IntArray
    history_len: int
    seen_item_ids: IntArray
    key: bytes = b""


class UserFeatureReader:
    """Reads users' online rows from Feast and decodes them with the catalogue's codebook."""

    def __init__(self, store: FeatureStoreClient, catalog: CatalogInfo) -> None:
        self.store = store
        self.rows = HistoryRows(store)
        self.codebook = catalog_codebook(catalog)
        self.codebook_version = self.codebook.version
        self.code_index = CodeIndex(catalog.codes.numpy(), self.codebook.UNKNOWN)
        self._lock = threading.Lock()
        self.stale_codebook_rows = 0
        self.bad_rows = 0

    def read(self, user_id: int) -> UserHistory | None:
        """The user's history, or None when the user has none online (a cold start)."""
        return self.read_many([user_id])[0]

    def read_many(self, user_ids: list[int]) -> list[UserHistory | None]:
        """Each user's history (None: a cold start), in one online-store read."""
        rows = self.rows.read(user_ids)
        return [
            self.decode(row) if row is not None and row.recent_item_ids else None
            for row in (rows[int(u)] for u in user_ids)
        ]

    def decode(self, row: UserHistoryFeatures) -> UserHistory:
        recent = np.asarray(row.recent_item_ids, dtype=np.int64)
        levels = self.codebook.levels
        long_codes = np.zeros((0, levels), dtype=np.int64)
        if row.codebook_version != self.codebook_version:
            with self._lock:
                self.stale_codebook_rows += 1
            log.warning(
                "user %d: online row uses codebook %s, the catalogue %s; its long history is "
                "not used", row.user_id, row.codebook_version, self.codebook_version,
            )  # fmt: skip
        else:
            try:
                long_codes = self.codebook.unpack(row.long_codes).astype(np.int64)
            except CodebookError as exc:
                with self._lock:
                    self.bad_rows += 1
                log.warning("user %d: unreadable long_codes (%s); not used", row.user_id, exc)
            if len(long_codes) < len(recent):
                # Not the worker's row shape (the codes cover every recent item): do not guess
                # which rows line up with which ids.
                long_codes = np.zeros((0, levels), dtype=np.int64)
        seen = np.union1d(recent, self.code_index.items(long_codes))
        digest = hashlib.blake2b(digest_size=16, person=b"user-history")
        for part in (recent.tobytes(), row.long_codes if len(long_codes) else b""):
            digest.update(len(part).to_bytes(8, "little") + part)  # long_codes from those bytes
        return UserHistory(
            user_id=row.user_id,
            recent_item_ids=recent,
            long_codes=long_codes,
            history_len=row.history_len,
            seen_item_ids=seen[seen > 0],
            key=digest.digest(),
        )
