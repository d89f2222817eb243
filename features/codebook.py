"""HyMiRec's residual cosine codebook: item embeddings as a few small integer codes.

Each level holds ``size`` unit-norm centroids. An item is coded level by level: pick the centroid
of highest cosine with the current residual ``r``, record the coefficient ``a = <r, c>``, and remove
the projection onto that centroid, ``r <- r - a c`` (so the next residual is orthogonal to ``c``).
Decoding sums ``scales[l, k] * centroids[l, k]`` over levels, where ``scales[l, k]`` is the mean
coefficient of the training items coded ``k`` at level ``l``. This is residual quantisation (Juang &
Gray 1982; RQ-VAE, Lee et al. 2022) with cosine assignment and projection residuals, the residual
cosine codebook HyMiRec uses to compress long user histories.

Each level is fitted with **balanced spherical k-means**: every cluster holds at most ``ceil(n/K)``
items during fitting, so codes spread over the whole codebook. The balanced assignment is the
global greedy one (take (item, centroid) pairs by cosine, highest first, while the item is free and
the centroid has room), computed in vectorised rounds of deferred acceptance (Gale & Shapley 1962):
with one similarity shared by both sides the stable matching is unique and equals that greedy.

The code value ``UNKNOWN == size`` is reserved for "item not in the codebook"; it decodes to zero.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.errors import CodebookError

__all__ = ["EncodeTrace", "ResidualCodebook", "balanced_assignment", "spherical_balanced_kmeans"]

FloatArray = npt.NDArray[np.floating[Any]]
IntArray = npt.NDArray[np.integer[Any]]

_ARRAYS_FILE = "codebook.npz"
_META_FILE = "codebook.json"
_CHUNK_CELLS = 1 << 22  # rows x centroids per chunk when ranking preferences (bounds temporaries)


def _validate_embeddings(embeddings: Any, dim: int | None = None) -> npt.NDArray[np.float64]:
    """A finite 2-D float matrix (n, D), as float64; names the problem otherwise."""
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise CodebookError(f"embeddings must be a 2-D array (n, dim); got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise CodebookError(f"embeddings must be real numbers; got dtype {array.dtype}")
    if dim is not None and array.shape[1] != dim:
        raise CodebookError(f"embeddings have dim {array.shape[1]}; this codebook expects {dim}")
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array).all(axis=1)))
        raise CodebookError(f"embeddings contain NaN or inf values ({bad} rows)")
    return array.astype(np.float64, copy=False)


def _positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or a CodebookError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise CodebookError(f"{name} must be an integer >= 1; got {value!r}")
    return int(value)


def _unit_rows(vectors: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Rows scaled to unit norm; zero rows stay zero (their cosine with anything is 0)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out = np.zeros_like(vectors)
    np.divide(vectors, norms, out=out, where=norms > 0)
    return out


def balanced_assignment(similarities: FloatArray, capacity: int) -> npt.NDArray[np.int64]:
    """Greedy balanced assignment of n items to K clusters with at most ``capacity`` each.

    Equals the global greedy (pairs by similarity, descending; ties by item, then centroid index),
    computed by item-proposing deferred acceptance: every free item proposes to its best centroid
    not yet tried; each centroid keeps its ``capacity`` most similar proposers and frees the rest.
    """
    sims = np.asarray(similarities, dtype=np.float64)
    n, k = sims.shape
    if capacity * k < n:
        raise CodebookError(f"capacity {capacity} x {k} clusters cannot hold {n} items")
    # Each item's centroids from most to least similar (stable: ties by centroid index).
    order = np.empty((n, k), dtype=np.int32)
    step = max(1, _CHUNK_CELLS // max(k, 1))
    for start in range(0, n, step):
        order[start : start + step] = np.argsort(-sims[start : start + step], axis=1, kind="stable")
    tried = np.zeros(n, dtype=np.int64)
    assigned = np.full(n, -1, dtype=np.int64)
    free = np.arange(n)
    while free.size:
        proposals = order[free, tried[free]]
        tried[free] += 1
        held = np.flatnonzero(assigned >= 0)
        items = np.concatenate([held, free])
        cents = np.concatenate([assigned[held], proposals])
        ranked = np.lexsort((items, -sims[items, cents], cents))  # by centroid, best first
        cents_sorted = cents[ranked]
        rank = np.arange(ranked.size) - np.searchsorted(cents_sorted, cents_sorted, side="left")
        keep = rank < capacity
        assigned[items[ranked[~keep]]] = -1
        assigned[items[ranked[keep]]] = cents_sorted[keep]
        free = np.sort(items[ranked[~keep]])
    return assigned


def spherical_balanced_kmeans(
    directions: FloatArray, size: int, iters: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Balanced spherical k-means over unit (or zero) rows: (unit centroids (K, D), fit assignment).

    Centroids start at ``size`` distinct random rows; each iteration assigns with
    :func:`balanced_assignment` (capacity ``ceil(n/K)``), sets each centroid to the normalised mean
    of its members, and re-seeds empty clusters from the worst-fitting items (lowest cosine).
    """
    x = np.asarray(directions, dtype=np.float64)
    n, dim = x.shape
    capacity = math.ceil(n / size)
    centroids = x[rng.choice(n, size=size, replace=False)].copy()
    centroids = _fill_zero_rows(centroids, rng)
    assignment = np.zeros(n, dtype=np.int64)
    for _ in range(max(iters, 1)):
        sims = x @ centroids.T
        assignment = balanced_assignment(sims, capacity)
        sums = np.zeros((size, dim))
        np.add.at(sums, assignment, x)
        means = _unit_rows(sums)
        moved = np.linalg.norm(means, axis=1) > 0
        centroids[moved] = means[moved]
        empty = np.flatnonzero(np.bincount(assignment, minlength=size) == 0)
        if empty.size:
            fit = sims[np.arange(n), assignment]
            fit[np.linalg.norm(x, axis=1) == 0] = np.inf  # a zero row cannot seed a direction
            worst = np.argsort(fit, kind="stable")[: empty.size]
            centroids[empty[: worst.size]] = x[worst]
        centroids = _fill_zero_rows(centroids, rng)
    return centroids, assignment


def _fill_zero_rows(
    centroids: npt.NDArray[np.float64], rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """Replace zero rows (from zero residuals) by random unit directions, so centroids stay unit."""
    zero = np.linalg.norm(centroids, axis=1) == 0
    if zero.any():
        centroids[zero] = _unit_rows(rng.standard_normal((int(zero.sum()), centroids.shape[1])))
    return _unit_rows(centroids)


def _directions(centroids: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Stored float32 centroids renormalised in float64, so projections remove them exactly."""
    flat = centroids.astype(np.float64).reshape(-1, centroids.shape[-1])
    return _unit_rows(flat).reshape(centroids.shape)


@dataclass(frozen=True)
class EncodeTrace:
    """Everything one encode computes: codes (n, L), coefficients a (n, L), residuals (L+1, n, D).

    ``residuals[0]`` is the input; ``residuals[l+1] = residuals[l] - a[:, l] * c_l[codes[:, l]]``.
    """

    codes: npt.NDArray[np.int64]
    coefficients: npt.NDArray[np.float64]
    residuals: npt.NDArray[np.float64]


def _trace(
    x: npt.NDArray[np.float64], centroids: npt.NDArray[np.float64], keep_residuals: bool = True
) -> EncodeTrace:
    """Greedy residual coding: argmax cosine per level, then remove the projection on the winner.

    Without ``keep_residuals`` only the final residual is kept (``residuals`` has one entry).
    """
    levels, n = centroids.shape[0], x.shape[0]
    codes = np.empty((n, levels), dtype=np.int64)
    coefficients = np.empty((n, levels))
    rows = np.arange(n)
    residual = x
    kept = [x]
    for level in range(levels):
        dots = residual @ centroids[level].T  # cosine x ||r|| (unit centroids): same argmax
        codes[:, level] = np.argmax(dots, axis=1)
        coefficients[:, level] = dots[rows, codes[:, level]]
        residual = residual - coefficients[:, level, None] * centroids[level][codes[:, level]]
        kept = [*kept, residual] if keep_residuals else [residual]
    return EncodeTrace(codes, coefficients, np.stack(kept))


@dataclass(frozen=True, eq=False)
class ResidualCodebook:
    """A fitted residual cosine codebook: ``centroids`` (L, K, D) unit rows, ``scales`` (L, K)."""

    centroids: npt.NDArray[np.float32]
    scales: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        centroids = np.array(self.centroids, dtype=np.float32)
        scales = np.array(self.scales, dtype=np.float32)
        if centroids.ndim != 3 or 0 in centroids.shape:
            raise CodebookError(f"centroids must be (levels, size, dim); got {centroids.shape}")
        if scales.shape != centroids.shape[:2]:
            raise CodebookError(f"scales must be {centroids.shape[:2]}; got shape {scales.shape}")
        if centroids.shape[1] > np.iinfo(np.uint16).max:
            raise CodebookError(f"size {centroids.shape[1]} exceeds the largest supported, 65535")
        if not (np.all(np.isfinite(centroids)) and np.all(np.isfinite(scales))):
            raise CodebookError("centroids and scales must be finite")
        centroids.setflags(write=False)
        scales.setflags(write=False)
        object.__setattr__(self, "centroids", centroids)
        object.__setattr__(self, "scales", scales)

    @property
    def levels(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def size(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[2])

    @property
    def UNKNOWN(self) -> int:
        """The reserved code for "item not in the codebook" (``== size``); decodes to zero."""
        return self.size

    @property
    def code_dtype(self) -> np.dtype[Any]:
        """Smallest unsigned int that holds 0..size inclusive (size itself is UNKNOWN)."""
        return np.dtype(np.uint8) if self.size <= np.iinfo(np.uint8).max else np.dtype(np.uint16)

    @property
    def bytes_per_item(self) -> int:
        return self.levels * self.code_dtype.itemsize

    @property
    def version(self) -> str:
        """Short sha256 of the arrays: equal codebooks have equal versions."""
        digest = hashlib.sha256()
        digest.update(np.asarray(self.centroids.shape, dtype="<i8").tobytes())
        digest.update(self.centroids.astype("<f4").tobytes())
        digest.update(self.scales.astype("<f4").tobytes())
        return digest.hexdigest()[:16]

    @classmethod
    def fit(
        cls, embeddings: Any, levels: int, size: int, iters: int = 20, seed: int = 0
    ) -> ResidualCodebook:
        """Fit ``levels`` levels of ``size`` centroids each; deterministic for a given ``seed``.

        Level ``l`` uses its own generator seeded with ``(seed, l)``, so the first levels of a
        deeper codebook equal a shallower one fitted with the same seed.
        """
        x = _validate_embeddings(embeddings)
        n, dim = x.shape
        if n == 0 or dim == 0:
            raise CodebookError(f"embeddings must be non-empty; got shape {x.shape}")
        levels = _positive_int("levels", levels)
        size = _positive_int("size", size)
        iters = _positive_int("iters", iters)
        if size > n:
            raise CodebookError(f"size {size} exceeds the number of embeddings {n}; lower size")
        if size > np.iinfo(np.uint16).max:
            raise CodebookError(f"size {size} exceeds the largest supported, 65535")
        centroids = np.empty((levels, size, dim), dtype=np.float32)
        scales = np.zeros((levels, size))
        residual = x
        for level in range(levels):
            rng = np.random.default_rng([seed, level])
            fitted, _ = spherical_balanced_kmeans(_unit_rows(residual), size, iters, rng)
            centroids[level] = fitted
            # Code with the stored float32 centroids, as encode will, so scales match encode.
            step = _trace(residual, _directions(centroids[level : level + 1]))
            counts = np.bincount(step.codes[:, 0], minlength=size)
            sums = np.bincount(step.codes[:, 0], weights=step.coefficients[:, 0], minlength=size)
            scales[level] = np.divide(sums, counts, out=np.zeros(size), where=counts > 0)
            residual = step.residuals[1]
        return cls(centroids, scales.astype(np.float32))

    def trace(self, embeddings: Any) -> EncodeTrace:
        """Codes, coefficients and every residual of :meth:`encode` (for inspection and tests)."""
        x = _validate_embeddings(embeddings, self.dim)
        return _trace(x, _directions(self.centroids))

    def encode(self, embeddings: Any) -> npt.NDArray[np.unsignedinteger[Any]]:
        """Codes (n, L) of ``code_dtype``: argmax cosine per level on projection residuals."""
        x = _validate_embeddings(embeddings, self.dim)
        codes = _trace(x, _directions(self.centroids), keep_residuals=False).codes
        return codes.astype(self.code_dtype)

    def _validate_codes(self, codes: Any) -> IntArray:
        array = np.asarray(codes)
        if array.ndim != 2 or array.shape[1] != self.levels:
            raise CodebookError(f"codes must be (n, {self.levels}); got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise CodebookError(f"codes must be integers; got dtype {array.dtype}")
        if array.size and (array.min() < 0 or array.max() > self.UNKNOWN):
            raise CodebookError(
                f"codes must lie in 0..{self.UNKNOWN} ({self.UNKNOWN} = UNKNOWN); "
                f"got values {array.min()}..{array.max()}"
            )
        return array.astype(np.int64)

    def decode(self, codes: Any) -> npt.NDArray[np.float32]:
        """Approximate embeddings (n, D): sum over levels of ``scales[l, k] * centroids[l, k]``."""
        array = self._validate_codes(codes)
        table = np.zeros((self.levels, self.size + 1, self.dim))  # row ``size`` = UNKNOWN = zero
        table[:, : self.size] = self.scales[..., None].astype(np.float64) * self.centroids
        out = np.zeros((array.shape[0], self.dim))
        for level in range(self.levels):
            out += table[level, array[:, level]]
        return out.astype(np.float32)

    def reconstruction_cosine(self, embeddings: Any, codes: Any) -> npt.NDArray[np.float64]:
        """Per-item cosine between each embedding and its decoded codes (0 where either is zero)."""
        x = _validate_embeddings(embeddings, self.dim)
        decoded = self.decode(codes).astype(np.float64)
        if decoded.shape[0] != x.shape[0]:
            raise CodebookError(f"{x.shape[0]} embeddings but {decoded.shape[0]} code rows")
        return np.asarray(np.sum(_unit_rows(x) * _unit_rows(decoded), axis=1))

    def pack(self, codes: Any) -> bytes:
        """Codes (n, L) as little-endian bytes, row-major (one feature-store Bytes value)."""
        array = self._validate_codes(codes)
        return array.astype(self.code_dtype.newbyteorder("<")).tobytes()

    def unpack(self, data: bytes) -> npt.NDArray[np.unsignedinteger[Any]]:
        """Inverse of :meth:`pack`; the length must be a whole number of items."""
        if len(data) % self.bytes_per_item:
            raise CodebookError(
                f"packed codes have {len(data)} bytes, not a multiple of {self.bytes_per_item} "
                f"({self.levels} levels x {self.code_dtype.itemsize} bytes)"
            )
        wire = np.frombuffer(data, dtype=self.code_dtype.newbyteorder("<"))
        codes = wire.astype(self.code_dtype).reshape(-1, self.levels)
        if codes.size and codes.max() > self.UNKNOWN:
            raise CodebookError(f"packed codes hold {codes.max()} > UNKNOWN ({self.UNKNOWN})")
        return codes

    def save(self, folder: Path) -> None:
        """Write ``codebook.npz`` and ``codebook.json`` (levels, size, dim, version) atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"levels": self.levels, "size": self.size, "dim": self.dim, "version": self.version}
        # Each file is written beside its target and renamed, so a reader never sees half a file.
        arrays_tmp = folder / f".{_ARRAYS_FILE}.{os.getpid()}.tmp"
        with arrays_tmp.open("wb") as handle:
            np.savez(handle, centroids=self.centroids, scales=self.scales)
        os.replace(arrays_tmp, folder / _ARRAYS_FILE)
        meta_tmp = folder / f".{_META_FILE}.{os.getpid()}.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=2))
        os.replace(meta_tmp, folder / _META_FILE)

    @classmethod
    def load(cls, folder: Path) -> ResidualCodebook:
        """Read what :meth:`save` wrote; the recomputed version must match the recorded one."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / _META_FILE).read_text())
            with np.load(folder / _ARRAYS_FILE) as arrays:
                codebook = cls(arrays["centroids"], arrays["scales"])
        except (OSError, KeyError, ValueError) as exc:
            raise CodebookError(f"cannot load a codebook from {folder}: {exc}") from exc
        found = {"levels": codebook.levels, "size": codebook.size, "dim": codebook.dim}
        expected = {key: meta.get(key) for key in found}
        if found != expected or meta.get("version") != codebook.version:
            raise CodebookError(
                f"codebook in {folder} does not match its {_META_FILE}: arrays give "
                f"{found | {'version': codebook.version}}, metadata says {meta}"
            )
        return codebook
