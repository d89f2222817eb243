"""Experiments as configuration: layers, experiments, variants and a holdout, from one YAML file.

The file (``abtest/experiments.yaml`` by default, ``Settings.experiments_file``) is validated with
pydantic at load time; any problem raises :class:`ExperimentConfigError` whose message names the
field (``experiments[0].variants[1].model``) and the fix. The splitter (``abtest.splitter``) turns a
valid config into assignments.

How traffic is divided (the hash is documented in ``abtest.splitter``):

- the **holdout** (optional) takes ``percent`` % of all users out of every experiment, by its own
  salt; they are served ``default_model``;
- a **layer** hashes each user (layer salt) to a position in ``[0, 1)``. Each of its experiments
  owns an explicit ``range: [start, end)`` of that space; ranges in a layer never overlap, so its
  experiments are mutually exclusive, and adding, removing or resizing one never moves the users
  of another. Layers use different salts, so they are independent of each other;
- inside its range an experiment hashes the user again (experiment salt) against the cumulative
  variant weights. Changing an experiment's variants reshuffles its own users only (give it a new
  salt when you start a new phase).

Positions and weights have a resolution of 1/``BUCKETS``: a range end must be a multiple of 0.0001,
the holdout percent a multiple of 0.01, and every variant must get at least one bucket.

Only one layer may serve models (its variants set ``model``); other layers carry ``params`` only,
and a param key may be set by one layer only, so the layers a user is in never disagree.

A salt with a character beyond U+FFFF is refused: GrowthBook's SDKs disagree on how to hash it
(``abtest.splitter``). An experiment's optional ``sequential`` block fixes the readout's
sequential τ once (``abtest.sequential_looks``): from ``horizon_users_per_arm``, or a stated
``tau`` per metric; the readout refuses a change mid-experiment.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from core.errors import ExperimentConfigError
from model.zoo import MODEL_NAMES

__all__ = [
    "BUCKETS",
    "HOLDOUT",
    "MAX_USER_ID",
    "ExperimentConfig",
    "ExperimentsConfig",
    "HoldoutConfig",
    "LayerConfig",
    "SequentialConfig",
    "TargetingConfig",
    "VariantConfig",
    "experiments_from_dict",
    "load_experiments",
    "parse_experiments",
    "trained_models",
]

BUCKETS = 10_000  # hash resolution: positions, ranges and weights are multiples of 1/BUCKETS
HOLDOUT = "holdout"  # reserved: the experiment and variant name logged for held-out users
MAX_USER_ID = 2**63 - 1  # as in the event schema
MAX_FILE_BYTES = 1 << 20
_SAFE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_PARAM_KEY = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _safe_name(value: str) -> str:
    if not _SAFE_NAME.fullmatch(value):
        raise ValueError(
            f"{value[:80]!r} is not a safe name: use 1-64 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit (names end up in ClickHouse queries and Kafka events)"
        )
    return value


def _param_key(value: str) -> str:
    if not _PARAM_KEY.fullmatch(value):
        raise ValueError(
            f"param key {value[:80]!r} is not allowed: use 1-64 characters of a-z, 0-9 and '_', "
            "starting with a letter or '_'"
        )
    return value


def _salt(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the salt must be valid Unicode text (no lone surrogates)") from None
    beyond = sorted({c for c in value if ord(c) > 0xFFFF})
    if beyond:
        raise ValueError(
            f"the salt contains {', '.join(f'U+{ord(c):X}' for c in beyond)}: GrowthBook's SDKs "
            "hash characters beyond U+FFFF differently, so no assignment would match theirs; "
            "use characters up to U+FFFF"
        )
    return value


def _model(value: str) -> str:
    if value not in MODEL_NAMES:
        raise ValueError(f"unknown model {value[:80]!r}; choose one of {', '.join(MODEL_NAMES)}")
    return value


def _on_grid(value: float, scale: int, what: str) -> int:
    units = round(value * scale)
    if abs(value * scale - units) > 1e-6:
        raise ValueError(f"{what} {value} is not a multiple of {1 / scale:g}; round it")
    return units


SafeName = Annotated[str, Field(strict=True), AfterValidator(_safe_name)]
Salt = Annotated[str, Field(strict=True, min_length=1, max_length=128), AfterValidator(_salt)]
ModelName = Annotated[str, Field(strict=True), AfterValidator(_model)]
ParamKey = Annotated[str, Field(strict=True), AfterValidator(_param_key)]
ParamValue = (
    Annotated[str, Field(strict=True, max_length=1024)]
    | bool
    | int
    | Annotated[float, Field(allow_inf_nan=False)]
)
Fraction = Annotated[float, Field(strict=True, ge=0, le=1)]
UserId = Annotated[int, Field(strict=True, ge=0, le=MAX_USER_ID)]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HoldoutConfig(_Config):
    """Users held out of every experiment (served ``default_model``): a long-term control."""

    salt: Salt
    percent: Annotated[float, Field(strict=True, ge=0, lt=100)] = 0.0

    @model_validator(mode="after")
    def _grid(self) -> HoldoutConfig:
        _on_grid(self.percent, BUCKETS // 100, "percent")
        return self

    @property
    def buckets(self) -> int:
        """Held-out users are those whose holdout bucket is below this."""
        return round(self.percent * BUCKETS / 100)


class LayerConfig(_Config):
    """A namespace: its experiments are mutually exclusive; layers are independent."""

    name: SafeName
    salt: Salt


class SequentialConfig(_Config):
    """How the readout's sequential test fixes τ (see the module docstring); set before start."""

    horizon_users_per_arm: Annotated[int, Field(strict=True, ge=2)] = 10_000
    min_users_per_arm: Annotated[int, Field(strict=True, ge=2)] = 100
    tau: dict[SafeName, Annotated[float, Field(strict=False, gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict
    )


class VariantConfig(_Config):
    name: SafeName
    weight: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
    model: ModelName | None = None
    params: dict[ParamKey, ParamValue] = Field(default_factory=dict)


class TargetingConfig(_Config):
    """Who may enter an experiment, by user id (all conditions must hold).

    User ids are issued in sign-up order, so ``user_id_min``/``user_id_max`` (inclusive) select a
    sign-up cohort; ``include_user_ids`` is an allow-list (e.g. internal testers), and
    ``exclude_user_ids`` a deny-list. A user who fails targeting is in no experiment of that layer.
    """

    user_id_min: UserId | None = None
    user_id_max: UserId | None = None
    include_user_ids: list[UserId] | None = None
    exclude_user_ids: list[UserId] = Field(default_factory=list)

    @model_validator(mode="after")
    def _order(self) -> TargetingConfig:
        low, high = self.user_id_min, self.user_id_max
        if low is not None and high is not None and low > high:
            raise ValueError(f"user_id_min ({low}) is above user_id_max ({high}); swap them")
        return self


class ExperimentConfig(_Config):
    name: SafeName
    layer: SafeName
    salt: Salt
    range: tuple[Fraction, Fraction]
    variants: list[VariantConfig] = Field(min_length=2)
    start: AwareDatetime | None = None
    stop: AwareDatetime | None = None
    targeting: TargetingConfig | None = None
    description: Annotated[str, Field(strict=True, max_length=2000)] = ""
    sequential: SequentialConfig = Field(default_factory=SequentialConfig)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.name == HOLDOUT:
            raise ValueError(f"name: {HOLDOUT!r} is reserved for held-out users; rename it")
        low, high = (_on_grid(x, BUCKETS, "range end") for x in self.range)
        if low >= high:
            raise ValueError(f"range: start {self.range[0]} must be below end {self.range[1]}")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be unique within an experiment; got {names}")
        with_model = [v.model is not None for v in self.variants]
        if any(with_model) and not all(with_model):
            raise ValueError("variants: set model on every variant or on none")
        if not math.isfinite(sum(v.weight for v in self.variants)):
            raise ValueError("variants: the weights are too large to add up; scale them down")
        bounds = self.variant_bounds
        for variant, lo, hi in zip(self.variants, (0, *bounds[:-1]), bounds, strict=True):
            if hi <= lo:
                raise ValueError(
                    f"variants: {variant.name!r} gets no traffic (its share of the weights is "
                    f"below 1/{BUCKETS}); raise its weight"
                )
        if self.start is not None and self.stop is not None and self.start >= self.stop:
            raise ValueError(f"start ({self.start}) must be before stop ({self.stop})")
        return self

    @property
    def bucket_range(self) -> tuple[int, int]:
        """The experiment's slice ``[lo, hi)`` of its layer, in buckets."""
        return round(self.range[0] * BUCKETS), round(self.range[1] * BUCKETS)

    @property
    def variant_bounds(self) -> tuple[int, ...]:
        """Cumulative upper bucket of each variant: variant i owns ``[bounds[i-1], bounds[i])``."""
        total = sum(v.weight for v in self.variants)
        cumulative = accumulate(v.weight for v in self.variants)
        bounds = [round(c / total * BUCKETS) for c in cumulative]
        bounds[-1] = BUCKETS
        return tuple(bounds)

    @property
    def start_ms(self) -> int | None:
        return None if self.start is None else (self.start - _EPOCH) // timedelta(milliseconds=1)

    @property
    def stop_ms(self) -> int | None:
        return None if self.stop is None else (self.stop - _EPOCH) // timedelta(milliseconds=1)

    def running(self, now_ms: int) -> bool:
        """Inside ``[start, stop)`` (an open end is unbounded)."""
        start, stop = self.start_ms, self.stop_ms
        return (start is None or now_ms >= start) and (stop is None or now_ms < stop)

    def variant_shares(self) -> dict[str, float]:
        """The share of the experiment's users each variant gets (weights on the bucket grid)."""
        bounds = self.variant_bounds
        return {
            v.name: (hi - lo) / BUCKETS
            for v, lo, hi in zip(self.variants, (0, *bounds[:-1]), bounds, strict=True)
        }


class ExperimentsConfig(_Config):
    default_model: ModelName
    holdout: HoldoutConfig | None = None
    layers: list[LayerConfig] = Field(default_factory=list)
    experiments: list[ExperimentConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentsConfig:
        layers = [layer.name for layer in self.layers]
        _unique(layers, "layers", "layer names")
        _unique([e.name for e in self.experiments], "experiments", "experiment names")
        self._unique_salts()
        for i, experiment in enumerate(self.experiments):
            if experiment.layer not in layers:
                raise ValueError(
                    f"experiments[{i}].layer: unknown layer {experiment.layer!r}; declare it under "
                    f"layers (declared: {', '.join(layers) or 'none'})"
                )
        for layer in layers:
            _disjoint([e for e in self.experiments if e.layer == layer], layer)
        model_layers = sorted({e.layer for e in self.experiments if e.variants[0].model})
        if len(model_layers) > 1:
            raise ValueError(
                f"experiments: variants in layers {model_layers} all set a model; a user is in one "
                "experiment per layer, so only one layer may choose the model: move those "
                "experiments into one layer"
            )
        param_layer: dict[str, str] = {}
        for e in self.experiments:
            for key in sorted({k for v in e.variants for k in v.params}):
                if param_layer.setdefault(key, e.layer) != e.layer:
                    raise ValueError(
                        f"experiments: param {key!r} is set in layers {param_layer[key]!r} and "
                        f"{e.layer!r}; a user can be in both, so a param may be set by one layer "
                        "only: rename one"
                    )
        return self

    def _unique_salts(self) -> None:
        owners = [("holdout.salt", self.holdout.salt)] if self.holdout else []
        owners += [(f"layers[{i}].salt", layer.salt) for i, layer in enumerate(self.layers)]
        owners += [(f"experiments[{i}].salt", e.salt) for i, e in enumerate(self.experiments)]
        seen: dict[str, str] = {}
        for where, salt in owners:
            if salt in seen:
                raise ValueError(
                    f"{where}: {salt!r:.80} is also {seen[salt]}; every salt must be unique, or "
                    "their assignments are correlated: change one"
                )
            seen[salt] = where

    @property
    def model_layer(self) -> str | None:
        """The layer whose variants choose the model, if any."""
        return next((e.layer for e in self.experiments if e.variants[0].model is not None), None)

    def models(self) -> set[str]:
        """Every model a user can be served: ``default_model`` and each variant's model."""
        served = {v.model for e in self.experiments for v in e.variants if v.model}
        return served | {self.default_model}

    def experiment(self, name: str) -> ExperimentConfig:
        for experiment in self.experiments:
            if experiment.name == name:
                return experiment
        known = ", ".join(e.name for e in self.experiments) or "none"
        raise ExperimentConfigError(f"unknown experiment {name!r:.80}; the config defines: {known}")

    def summary(self) -> str:
        """A few readable lines: the holdout, then each layer and its experiments."""
        held = self.holdout.percent if self.holdout else 0.0
        lines = [f"default model {self.default_model}; holdout {held:g}% of users"]
        for layer in self.layers:
            lines.append(f"layer {layer.name} (salt {layer.salt!r})")
            for e in (e for e in self.experiments if e.layer == layer.name):
                window = f"{e.start or '-∞'} .. {e.stop or '∞'}"
                lines.append(f"  {e.name}: range [{e.range[0]:g}, {e.range[1]:g}), {window}")
                shares = e.variant_shares()
                for v in e.variants:
                    served = f" serves {v.model}" if v.model else ""
                    lines.append(f"    {v.name}: {shares[v.name]:.2%}{served} {v.params or ''}")
        return "\n".join(line.rstrip() for line in lines)


def _unique(names: list[str], field: str, what: str) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{field}: {what} must be unique; {duplicates} appear more than once")


def _disjoint(experiments: list[ExperimentConfig], layer: str) -> None:
    ordered = sorted(experiments, key=lambda e: e.bucket_range)
    for before, after in pairwise(ordered):
        if after.bucket_range[0] < before.bucket_range[1]:
            raise ValueError(
                f"experiments: the ranges of {before.name!r} {list(before.range)} and "
                f"{after.name!r} {list(after.range)} overlap in layer {layer!r}; make them "
                "disjoint (a user is in at most one experiment per layer)"
            )


_HINTS = {
    "missing": "add it",
    "extra_forbidden": "remove it or fix its spelling",
    "timezone_aware": "add a UTC offset, e.g. 2025-01-01T00:00:00Z",
    "too_short": "add more entries",
}


def _format_errors(source: str, exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    lines = [f"{source}: invalid experiments config ({len(errors)} problem(s)):"]
    for error in errors[:10]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        hint = _HINTS.get(error["type"], "")
        given = error.get("input")
        quiet = isinstance(given, dict | list) or error["type"] in ("missing", "value_error")
        got = "" if quiet else f" (got {given!r:.80})"
        fix = f"; {hint}" if hint else ""
        where = where.lstrip(".")
        lines.append(f"  {where}: {message}{got}{fix}" if where else f"  {message}{got}{fix}")
    if len(errors) > 10:
        lines.append(f"  ... and {len(errors) - 10} more")
    return "\n".join(lines)


def experiments_from_dict(data: Any, source: str = "<config>") -> ExperimentsConfig:
    """Validate already-parsed data; any problem is an :class:`ExperimentConfigError`."""
    if not isinstance(data, dict):
        raise ExperimentConfigError(
            f"{source}: the top level must be a mapping with default_model, layers and "
            f"experiments (got {type(data).__name__})"
        )
    try:
        return ExperimentsConfig.model_validate(data)
    except ValidationError as exc:
        raise ExperimentConfigError(_format_errors(source, exc)) from None


def parse_experiments(text: str, source: str = "<text>") -> ExperimentsConfig:
    """Parse and validate YAML text."""
    if len(text) > MAX_FILE_BYTES:
        raise ExperimentConfigError(f"{source}: larger than {MAX_FILE_BYTES} bytes; trim it")
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # PyYAML raises ValueError for an impossible date (2025-13-01), RecursionError when nested
        # too deep.
        raise ExperimentConfigError(f"{source}: not valid YAML: {exc}"[:2000]) from None
    return experiments_from_dict(data, source)


def load_experiments(path: Path) -> ExperimentsConfig:
    """Read and validate an experiments file (the only I/O of the experiments code)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExperimentConfigError(
            f"{path}: no such experiments file; set HYMIREC_EXPERIMENTS_FILE or pass --file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentConfigError(f"{path}: cannot read the experiments file: {exc}") from None
    return parse_experiments(text, source=str(path))


def trained_models(path: Path) -> list[str]:
    """The models the trainer keeps fresh for an experiments file: every model it serves, plus
    ``popular`` (the service's answer for users without history)."""
    return sorted(load_experiments(path).models() | {"popular"})
