"""The traffic splitter: which experiment, variant and model a user gets. Pure: no I/O, no state.

The hash is GrowthBook's hashing v2 (``hash_v2`` below; its SDK conformance cases are in the tests):

    fnv1a32(s)            = 32-bit FNV-1a over the UTF-16 code units of s (offset basis
                            0x811c9dc5, prime 0x01000193), each unit XORed in whole
    bucket(seed, user_id) = fnv1a32(str(fnv1a32(seed + str(user_id)))) mod 10000

with ``str(user_id)`` the decimal digits; ``bucket / 10000`` is GrowthBook's ``hash(seed, value,
2)``. Code units, not UTF-8 bytes, because that is what the SDKs hash: the JavaScript SDK XORs
``str.charCodeAt(i)`` (a UTF-16 code unit, up to 0xFFFF) and the Python SDK ``ord(ch)``; for ASCII
both equal the bytes, but for the salt "sé" and user 1 UTF-8 bytes would give bucket 0.1719 where
every SDK gives 0.992. The two SDKs agree on every character up to U+FFFF; beyond it (surrogate
pairs in UTF-16) they differ, which is why ``abtest.experiments`` refuses such salts. The outer
hash of the inner hash's decimal text mixes the last input units into every output bit (plain
FNV-1a leaves sequential ids correlated across seeds). For one user, in this order (see
``abtest.experiments`` for the config):

1. holdout: ``bucket(holdout.salt, u) < percent * 100`` → held out of every experiment;
2. each layer: ``bucket(layer.salt, u)`` falls in at most one experiment's ``range`` (in buckets);
3. that experiment, if running (``start <= now < stop``) and its targeting admits ``u``:
   variant ``i`` such that ``bounds[i-1] <= bucket(experiment.salt, u) < bounds[i]``, where
   ``bounds`` are the cumulative weight shares times 10000, rounded.

``assign`` is the reference (one user, plain Python); ``assign_many`` is the vectorised numpy path
and the tests check it against ``assign``. Exposure is logged by the server that serves the user,
not here: an assignment that is never served is never logged.
"""

from __future__ import annotations

import sys
import time
from array import array
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from abtest.experiments import (
    BUCKETS,
    HOLDOUT,
    MAX_USER_ID,
    ExperimentConfig,
    ExperimentsConfig,
)
from core.errors import ExperimentConfigError

__all__ = [
    "Route",
    "Splitter",
    "fnv1a32",
    "hash_v2",
    "user_bucket",
    "user_buckets",
    "utf16_units",
]

FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193
_MASK32 = 0xFFFFFFFF
_POW10 = np.array([10**k for k in range(20)], dtype=np.uint64)  # uint64 holds up to 10**19


def utf16_units(text: str) -> array[int]:
    """The UTF-16 code units of ``text`` (JavaScript's ``charCodeAt`` over the string)."""
    units = array("H", text.encode("utf-16-le", "surrogatepass"))
    if sys.byteorder == "big":  # array reads native order; the bytes are little-endian
        units.byteswap()
    return units


def fnv1a32(data: str | bytes, state: int = FNV_OFFSET) -> int:
    """32-bit FNV-1a (Fowler–Noll–Vo), continuing from ``state``.

    A str is hashed unit by unit over its UTF-16 code units, as GrowthBook's SDKs do; bytes byte
    by byte (the textbook FNV-1a; the two agree on ASCII).
    """
    units = utf16_units(data) if isinstance(data, str) else data
    for unit in units:
        state = ((state ^ unit) * FNV_PRIME) & _MASK32
    return state


def hash_v2(seed: str, value: str) -> float:
    """GrowthBook's ``hash(seed, value, 2)`` in ``[0, 1)``, at a resolution of 1/10000."""
    return user_hash(seed + value) / BUCKETS


def user_hash(text: str) -> int:
    """``fnv1a32(str(fnv1a32(text))) mod BUCKETS``, the v2 bucket of an already joined text."""
    return fnv1a32(str(fnv1a32(text))) % BUCKETS


def user_bucket(seed: str, user_id: int) -> int:
    """``bucket(seed, user_id)`` in ``[0, BUCKETS)``: one user, plain Python (the reference)."""
    return user_hash(f"{seed}{user_id}")


def _fnv_decimal(state: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> Any:
    """FNV-1a continued over the decimal digits of each value, one digit position at a time."""
    digits = np.ones(values.shape, dtype=np.int64)
    for k in range(1, len(_POW10)):
        digits += values >= _POW10[k]
    prime, mask, zero = np.uint64(FNV_PRIME), np.uint64(_MASK32), np.uint64(ord("0"))
    for position in range(int(digits.max(initial=1)) - 1, -1, -1):
        digit = (values // _POW10[position]) % np.uint64(10)
        stepped = ((state ^ (digit + zero)) * prime) & mask  # < 2**32 * 2**25: no uint64 overflow
        state = np.where(digits > position, stepped, state)
    return state


def user_buckets(seed: str, user_ids: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """``bucket(seed, u)`` for every id of a non-negative integer array (vectorised)."""
    ids = np.asarray(user_ids).astype(np.uint64)
    seeded = np.full(ids.shape, fnv1a32(seed), dtype=np.uint64)
    inner = _fnv_decimal(seeded, ids)
    outer = _fnv_decimal(np.full(ids.shape, FNV_OFFSET, dtype=np.uint64), inner)
    return np.asarray(outer % np.uint64(BUCKETS), dtype=np.int64)


@dataclass(frozen=True)
class Route:
    """What to serve a user. ``experiment``/``variant`` are the assignment in the layer that
    chooses the model (None: in no experiment there, served ``default_model``); held-out users
    get ``experiment == variant == "holdout"`` so that their exposures are logged too. ``layers``
    maps every layer the user is in an experiment of to ``(experiment, variant)``; ``params``
    merges those variants' params (a key is set by one layer only)."""

    model: str
    experiment: str | None
    variant: str | None
    params: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def held_out(self) -> bool:
        return self.experiment == HOLDOUT

    def describe(self) -> str:
        where = f"{self.experiment}/{self.variant}" if self.experiment else "no experiment"
        lines = [f"model {self.model} ({where})"]
        lines += [f"  layer {name}: {exp}/{var}" for name, (exp, var) in self.layers.items()]
        if self.params:
            lines.append(f"  params {self.params}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Experiment:
    """An experiment compiled for fast lookups."""

    config: ExperimentConfig
    layer_salt: str
    low: int
    high: int
    bounds: tuple[int, ...]
    names: npt.NDArray[np.object_]
    include: frozenset[int] | None
    exclude: frozenset[int]

    def admits(self, user_id: int) -> bool:
        targeting = self.config.targeting
        if targeting is None:
            return True
        low, high = targeting.user_id_min, targeting.user_id_max
        return (
            (low is None or user_id >= low)
            and (high is None or user_id <= high)
            and (self.include is None or user_id in self.include)
            and user_id not in self.exclude
        )

    def admits_many(self, user_ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        keep = np.ones(user_ids.shape, dtype=bool)
        targeting = self.config.targeting
        if targeting is None:
            return keep
        if targeting.user_id_min is not None:
            keep &= user_ids >= np.uint64(targeting.user_id_min)
        if targeting.user_id_max is not None:
            keep &= user_ids <= np.uint64(targeting.user_id_max)
        if self.include is not None:
            keep &= np.isin(user_ids, np.fromiter(self.include, np.uint64, len(self.include)))
        if self.exclude:
            keep &= ~np.isin(user_ids, np.fromiter(self.exclude, np.uint64, len(self.exclude)))
        return keep

    def variant(self, user_id: int) -> str:
        index = bisect_right(self.bounds, user_bucket(self.config.salt, user_id))
        return str(self.names[index])


class Splitter:
    """Assignments and routes for a validated :class:`ExperimentsConfig`."""

    def __init__(self, config: ExperimentsConfig) -> None:
        self.config = config
        salts = {layer.name: layer.salt for layer in config.layers}
        self._experiments: dict[str, _Experiment] = {}
        for e in config.experiments:
            targeting = e.targeting
            include = targeting.include_user_ids if targeting else None
            self._experiments[e.name] = _Experiment(
                config=e,
                layer_salt=salts[e.layer],
                low=e.bucket_range[0],
                high=e.bucket_range[1],
                bounds=e.variant_bounds,
                names=np.array([v.name for v in e.variants], dtype=object),
                include=None if include is None else frozenset(include),
                exclude=frozenset(targeting.exclude_user_ids if targeting else ()),
            )
        # Per layer, its experiments sorted by range start, to find the one at a position.
        self._by_layer: dict[str, list[_Experiment]] = {
            layer.name: sorted(
                (c for c in self._experiments.values() if c.config.layer == layer.name),
                key=lambda c: c.low,
            )
            for layer in config.layers
        }
        self._lows = {name: [c.low for c in cs] for name, cs in self._by_layer.items()}

    def _compiled(self, experiment: str) -> _Experiment:
        compiled = self._experiments.get(experiment)
        if compiled is None:
            known = ", ".join(self._experiments) or "none"
            raise ExperimentConfigError(
                f"unknown experiment {experiment!r:.80}; the config defines: {known}"
            )
        return compiled

    def held_out(self, user_id: int) -> bool:
        holdout = self.config.holdout
        user = _user_id(user_id)
        return holdout is not None and user_bucket(holdout.salt, user) < holdout.buckets

    def assign(self, experiment: str, user_id: int, now_ms: int | None = None) -> str | None:
        """The user's variant, or None when not in the experiment (held out, another range of
        the layer, not targeted, or ``now_ms`` outside start/stop; None means now)."""
        compiled = self._compiled(experiment)
        user = _user_id(user_id)
        now = _now_ms() if now_ms is None else now_ms
        if not compiled.config.running(now) or self.held_out(user):
            return None
        position = user_bucket(compiled.layer_salt, user)
        if not compiled.low <= position < compiled.high or not compiled.admits(user):
            return None
        return compiled.variant(user)

    def assign_many(
        self, experiment: str, user_ids: npt.ArrayLike, now_ms: int | None = None
    ) -> npt.NDArray[np.object_]:
        """``assign`` for an array of ids, vectorised: an object array of variant names, ``""``
        where the user is not in the experiment."""
        compiled = self._compiled(experiment)
        ids = _user_ids(user_ids)
        out = np.full(ids.shape, "", dtype=object)
        now = _now_ms() if now_ms is None else now_ms
        if not compiled.config.running(now):
            return out
        positions = user_buckets(compiled.layer_salt, ids)
        member = (positions >= compiled.low) & (positions < compiled.high)
        holdout = self.config.holdout
        if holdout is not None and holdout.buckets > 0:
            member &= user_buckets(holdout.salt, ids) >= holdout.buckets
        member &= compiled.admits_many(ids)
        buckets = user_buckets(compiled.config.salt, ids[member])
        bounds = np.asarray(compiled.bounds, dtype=np.int64)
        out[member] = compiled.names[np.searchsorted(bounds, buckets, side="right")]
        return out

    def route(self, user_id: int, now_ms: int | None = None) -> Route:
        """The model, assignment and params to serve ``user_id`` (see :class:`Route`)."""
        user = _user_id(user_id)
        default = self.config.default_model
        if self.held_out(user):
            return Route(default, HOLDOUT, HOLDOUT)
        now = _now_ms() if now_ms is None else now_ms
        model, experiment, variant = default, None, None
        layers: dict[str, tuple[str, str]] = {}
        params: dict[str, Any] = {}
        for layer in self.config.layers:
            compiled = self._experiment_at(layer.name, user_bucket(layer.salt, user))
            if compiled is None or not compiled.config.running(now) or not compiled.admits(user):
                continue
            name = compiled.variant(user)
            layers[layer.name] = (compiled.config.name, name)
            chosen = next(v for v in compiled.config.variants if v.name == name)
            params.update(chosen.params)
            if chosen.model is not None:
                model, experiment, variant = chosen.model, compiled.config.name, name
        return Route(model, experiment, variant, params, layers)

    def _experiment_at(self, layer: str, position: int) -> _Experiment | None:
        experiments, lows = self._by_layer[layer], self._lows[layer]
        index = bisect_right(lows, position) - 1
        if index >= 0 and position < experiments[index].high:
            return experiments[index]
        return None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _user_id(user_id: int) -> int:
    if isinstance(user_id, bool) or not isinstance(user_id, int | np.integer):
        raise ExperimentConfigError(f"user_id must be an integer; got {type(user_id).__name__}")
    user = int(user_id)
    if not 0 <= user <= MAX_USER_ID:
        raise ExperimentConfigError(f"user_id must be in [0, 2**63 - 1]; got {user}")
    return user


def _user_ids(user_ids: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    ids = np.asarray(user_ids)
    if ids.dtype.kind not in "iu":
        raise ExperimentConfigError(f"user_ids must be an integer array; got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > MAX_USER_ID):
        raise ExperimentConfigError("user_ids must be in [0, 2**63 - 1]")
    return ids.astype(np.uint64)
