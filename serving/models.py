"""The models in service: one loaded version per model, ranking, and hot swaps from the registry.

A :class:`LoadedModel` is immutable: the weights of one registry version, in eval mode, with its
item embeddings computed once at load time. A user's interests depend only on their history, so
they are computed once per history: the version's :class:`InterestCache` keeps them under the
digest of everything the model reads (``UserHistory.key``: the recent ids and the long codes). A
request whose user's history has not changed since their last request (an impression does not
change it; a click or a play does) skips the model and only scores the catalogue; a changed
history misses the cache, and a cached entry is the very tensor a fresh computation gives. A miss
costs less too: HyMiRec's code table projected to the model width, which ``encode_long``
projects on every call, is projected once per version (:func:`encode_long`). Ranking takes the
top ``k`` with ``torch.topk`` and sorts only the items tied at the boundary, in the same order as
a stable sort of every score (:func:`top_k`).

:class:`ModelPool` holds the current one per model in a dict that is replaced, never mutated,
when a version is swapped in; a request takes its ``LoadedModel`` once at the start and uses it
to the end, so a swap never changes a request half-way and never blocks one. New versions are
found by polling ``LATEST`` (a cheap file read) every ``serve_registry_poll_s`` on a background
thread, which loads and warms the new version completely before the reference moves.

Cold start: users without a history get the ``popular`` model's ranking, from the registry when
the trainer publishes one, else :func:`movielens_popularity`, the ML-100K rating counts of the
catalogue items (a fixed prior that needs no training). The same fallback serves a variant whose
model has no published version yet, so a fresh deployment answers before the first version.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import HymirecError
from model.base import Batch, CatalogInfo, SequentialRecommender
from model.checkpoint import load_version_model
from model.checkpoint_registry import CheckpointRegistry, PublishedVersion
from model.hymirec_model import HyMiRec
from model.popularity import Config as PopularityConfig
from model.popularity import PopularityRecommender
from serving.features import UserHistory

__all__ = [
    "INTEREST_CACHE_USERS",
    "POPULAR",
    "PRIOR_VERSION",
    "InterestCache",
    "LoadedModel",
    "ModelPool",
    "encode_long",
    "load_model",
    "movielens_popularity",
    "top_k",
]

log = logging.getLogger(__name__)

POPULAR = "popular"
PRIOR_VERSION = "ml100k-prior"  # the version name of the built-in popularity fallback
# Users whose interests one version keeps (least recently served dropped first): ~1.1 KB each
# with HyMiRec's defaults (K = 4 x D = 64 floats, a 16-byte key), so ~55 MB at most.
INTEREST_CACHE_USERS = 50_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def top_k(scores: Tensor, k: int) -> list[int]:
    """The first ``k`` of ``torch.argsort(scores, descending=True, stable=True)`` (ties: lower
    index first), leaving out ``-inf``, without sorting every score.

    ``topk`` finds the k-th best value; the items at least that good are the only candidates
    (the ties at the boundary included), and a stable sort of those, in index order, ranks them
    as the full stable sort does. ``scores`` holds no NaN (``LoadedModel.scores`` maps it to -inf).
    """
    count = min(k, int(torch.isfinite(scores).sum()))
    if count <= 0:
        return []
    threshold = torch.topk(scores, count, sorted=False).values.min()
    candidates = torch.nonzero(scores >= threshold).flatten()  # ascending index
    order = torch.argsort(scores[candidates], descending=True, stable=True)
    ranked: list[int] = candidates[order[:count]].tolist()
    return ranked


def encode_long(model: HyMiRec, code_table: Tensor, codes: Tensor) -> Tensor:
    """``model.encode_long(codes)`` given ``code_table = F.linear(model.decoder.table,
    model.code_projection().weight)`` (``CodebookDecoder.forward`` recomputes that (levels,
    size + 1, D) table on every call: 0.36 ms of 0.58 here). Same operations on the same tensors,
    so the same result to the bit (``tests/serving/test_ranking.py``)."""
    tokens = model.code_projection().bias.expand(*codes.shape[:-1], -1)
    for level in range(code_table.shape[0]):
        tokens = tokens + code_table[level][codes[..., level]]
    return model.pool_long(tokens, codes)


class InterestCache:
    """Per user, the interests computed for the history last seen for them, under its key.

    One entry per user, so a user whose history moved replaces their entry; at most
    ``max_users`` entries, the least recently used dropped first. Thread-safe.
    """

    def __init__(self, max_users: int = INTEREST_CACHE_USERS) -> None:
        self.max_users = max_users
        self._entries: OrderedDict[int, tuple[bytes, Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user_id: int, key: bytes) -> Tensor | None:
        with self._lock:
            entry = self._entries.get(user_id)
            if entry is None or entry[0] != key:
                self.misses += 1
                return None
            self._entries.move_to_end(user_id)
            self.hits += 1
            return entry[1]

    def put(self, user_id: int, key: bytes, interests: Tensor) -> None:
        with self._lock:
            self._entries[user_id] = (key, interests)
            self._entries.move_to_end(user_id)
            while len(self._entries) > self.max_users:
                self._entries.popitem(last=False)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One model version ready to rank; never changed after construction."""

    name: str
    version: str
    model: SequentialRecommender
    item_vectors: Tensor  # (num_items + 1, D): ``model.item_embeddings()`` at load time
    num_items: int
    loaded_at_ms: int
    published_at_ms: int
    source: Literal["registry", "prior"]
    code_table: Tensor | None = field(default=None, repr=False)  # HyMiRec: see encode_long
    interest_cache: InterestCache = field(default_factory=InterestCache, repr=False)

    @classmethod
    def build(
        cls,
        name: str,
        version: str,
        model: SequentialRecommender,
        published_at_ms: int,
        source: Literal["registry", "prior"] = "registry",
    ) -> LoadedModel:
        model.eval()
        code_table = None
        with torch.inference_mode():
            vectors = model.item_embeddings().detach().float()
        if isinstance(model, HyMiRec):
            with torch.no_grad():  # not inference_mode: the table is used in later forwards
                code_table = F.linear(model.decoder.table, model.code_projection().weight)
        loaded = cls(
            name=name,
            version=version,
            model=model,
            item_vectors=vectors,
            num_items=vectors.shape[0] - 1,
            loaded_at_ms=_now_ms(),
            published_at_ms=published_at_ms,
            source=source,
            code_table=code_table,
        )
        # Warm up (first-call allocations) off the request path, with a one-item history.
        levels = int(getattr(model, "codes", torch.zeros(1, 1)).shape[-1])
        one = np.ones(1, dtype=np.int64)
        loaded.rank(UserHistory(0, one, np.zeros((0, levels), np.int64), 1, one), 1)
        return loaded

    def _known(self, item_ids: np.ndarray) -> Tensor:
        """Ids as a tensor, items this version does not know (newer than it) set to 0 (pad)."""
        ids = torch.from_numpy(np.asarray(item_ids, dtype=np.int64))
        return torch.where(ids <= self.num_items, ids, 0)

    def interests(self, history: UserHistory | None) -> Tensor:
        """(K, D) float the user's interests (an empty history for a cold start), from the
        cache when the user's history is the one they were computed for."""
        key = history.key if history is not None else b""
        if key:
            assert history is not None
            cached = self.interest_cache.get(history.user_id, key)
            if cached is not None:
                return cached
        with torch.inference_mode():  # no autograd bookkeeping; same kernels, same numbers
            interests = self._compute_interests(history).float()
        if key:
            assert history is not None
            self.interest_cache.put(history.user_id, key, interests)
        return interests

    def _compute_interests(self, history: UserHistory | None) -> Tensor:
        model = self.model
        recent_ids = history.recent_item_ids if history is not None else np.zeros(0, np.int64)
        if isinstance(model, HyMiRec):
            # The newest r rows of the long codes are the r recent ids; the older rows are the
            # long history. With r = min(model R, Feast R) this is exactly what the model's
            # ``user_interests`` does with the full id history (the test checks it).
            r = min(model.config.recent_len, len(recent_ids))
            codes = history.long_codes if history is not None else np.zeros((0, 1), np.int64)
            levels = model.decoder.table.shape[0]
            long_codes = torch.from_numpy(np.asarray(codes[: max(0, len(codes) - r)]))
            long_codes = long_codes.reshape(-1, levels).long()[None]
            if self.code_table is None:
                coarse = model.encode_long(long_codes)
            else:
                coarse = encode_long(model, self.code_table, long_codes)
            recent = self._known(recent_ids[len(recent_ids) - r :])
            return model.refine(coarse, recent[None])[0]
        history_ids = self._known(recent_ids)[None]
        zeros = torch.zeros_like(history_ids)
        batch = Batch(
            user_index=torch.zeros(1, dtype=torch.long),
            history=history_ids,
            history_ts=zeros,  # Feast keeps no per-item times: time-aware models see none
            targets=torch.zeros(1, 1, dtype=torch.long),
            target_ts=torch.zeros(1, 1, dtype=torch.long),
        )
        return model.user_interests(batch)[0]

    def scores(self, history: UserHistory | None) -> Tensor:
        """(num_items + 1,) the user's interests merged per item by the model's own rule (the
        max for single-embedding models, HyMiRec's ``Config.merge``); index 0 is -inf."""
        interests = self.interests(history)
        with torch.no_grad():
            scores = self.model.interest_scores(interests, self.item_vectors).float()
            scores = torch.nan_to_num(scores, nan=-torch.inf)
            scores[0] = -torch.inf
        return scores

    def rank(self, history: UserHistory | None, k: int) -> list[int]:
        """The top ``k`` item ids the user has not seen, best first (ties: lower id first)."""
        scores = self.scores(history)
        if history is not None and len(history.seen_item_ids):
            seen = history.seen_item_ids[history.seen_item_ids <= self.num_items]
            scores[torch.from_numpy(seen)] = -torch.inf
        return top_k(scores, k)

    def describe(self) -> dict[str, int | str]:
        return {
            "version": self.version,
            "loaded_at_ms": self.loaded_at_ms,
            "published_at_ms": self.published_at_ms,
            "source": self.source,
            "num_items": self.num_items,
        }


def load_model(published: PublishedVersion, catalog: CatalogInfo) -> LoadedModel:
    """A registry version, loaded and warmed up."""
    model = load_version_model(published, catalog)
    published_at = int(published.metadata.get("published_at_ms") or 0)
    return LoadedModel.build(published.model, published.version, model, published_at)


def movielens_popularity(catalog: CatalogInfo) -> LoadedModel:
    """The built-in cold-start ranking: ML-100K rating counts per catalogue item."""
    from core.movielens import load_ratings

    counts = np.bincount(
        load_ratings()["item_id"].to_numpy(dtype=np.int64), minlength=catalog.num_items + 1
    )[: catalog.num_items + 1]
    model = PopularityRecommender(catalog, PopularityConfig())
    model.fit(torch.from_numpy(counts.astype(np.float32)))
    return LoadedModel.build(POPULAR, PRIOR_VERSION, model, 0, source="prior")


SwapListener = Callable[[LoadedModel | None, LoadedModel], None]


class ModelPool:
    """The current version of each watched model, swapped atomically as the registry moves."""

    def __init__(
        self,
        registry: CheckpointRegistry,
        catalog: CatalogInfo,
        models: Iterable[str],
        prior: LoadedModel,
        on_swap: SwapListener | None = None,
    ) -> None:
        self.registry = registry
        self.catalog = catalog
        self.watched = tuple(sorted({*models, POPULAR}))
        self.prior = prior
        self.on_swap = on_swap
        self._current: dict[str, LoadedModel] = {}
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.load_failures = 0
        self.last_poll_ms: int | None = None
        self._retired_lookups: dict[str, tuple[int, int]] = {}  # of versions swapped out

    def get(self, name: str) -> LoadedModel | None:
        """The version in service for ``name`` (None before its first version)."""
        return self._current.get(name)

    def popular(self) -> LoadedModel:
        """The cold-start ranking: the registry's ``popular`` model, else the ML-100K prior."""
        return self._current.get(POPULAR) or self.prior

    def current(self) -> dict[str, LoadedModel]:
        return dict(self._current)

    def cache_lookups(self) -> dict[str, tuple[int, int]]:
        """(hits, misses) of the interest caches per model, every version served so far."""
        out = dict(self._retired_lookups)
        for loaded in [self.prior, *self._current.values()]:
            hits, misses = out.get(loaded.name, (0, 0))
            cache = loaded.interest_cache
            out[loaded.name] = (hits + cache.hits, misses + cache.misses)
        return out

    def refresh(self) -> list[LoadedModel]:
        """Load every watched model whose ``LATEST`` moved; return the versions swapped in.

        A version that fails to load is logged and counted; the one in service stays.
        """
        swapped = []
        with self._refresh_lock:
            for name in self.watched:
                try:
                    loaded = self._refresh_one(name)
                except Exception as exc:  # a bad version must not stop the others or the loop
                    self.load_failures += 1
                    expected = isinstance(exc, HymirecError)  # unreadable or pruned: no trace
                    log.error("cannot load the latest %s: %s", name, exc, exc_info=not expected)
                    continue
                if loaded is not None:
                    swapped.append(loaded)
            self.last_poll_ms = _now_ms()
        return swapped

    def _refresh_one(self, name: str) -> LoadedModel | None:
        old = self._current.get(name)
        latest = self.registry.latest_version(name)
        if latest is None or (old is not None and old.version == latest):
            return None
        opened = self.registry.open_latest(name, lambda p: load_model(p, self.catalog))
        if opened is None:
            return None
        loaded: LoadedModel = opened[1]
        if old is not None and old.version == loaded.version:
            return None
        self._current = {**self._current, name: loaded}  # one reference assignment: atomic
        if old is not None:
            hits, misses = self._retired_lookups.get(name, (0, 0))
            cache = old.interest_cache  # requests still on the old version may add a few more
            self._retired_lookups[name] = (hits + cache.hits, misses + cache.misses)
        log.info("serving %s %s (was %s)", name, loaded.version, old.version if old else "none")
        if self.on_swap is not None:
            self.on_swap(old, loaded)
        return loaded

    def start_polling(self, every_s: float) -> None:
        """Poll the registry every ``every_s`` seconds on a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.refresh()
                except Exception as exc:  # never let the poller die; refresh counts per model
                    log.error("registry poll failed: %s", exc, exc_info=True)

        self._thread = threading.Thread(target=loop, name="hymirec-registry-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
