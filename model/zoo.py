"""Every model the harness can train, by name, and how each wants its data cut.

Each model lives in ``model/<module>.py`` with a ``Config`` dataclass and
``build_model(catalog, config=None) -> SequentialRecommender``. Modules are imported lazily, so a
model whose file does not exist yet only fails when it is asked for (:func:`is_available` says
whether it can be built).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from core.errors import ConfigError
from model.base import CatalogInfo, SequentialRecommender

__all__ = [
    "MODEL_NAMES",
    "TRAINING_DEFAULTS",
    "TrainingDefaults",
    "build",
    "config_from_dict",
    "default_max_len",
    "is_available",
    "make_config",
    "module_name",
    "training_defaults",
]

MODEL_NAMES = ("popular", "sasrec", "hstu", "hymirec", "persrec", "fuxi_mme")

_MODULES = {
    "popular": "model.popularity",
    "sasrec": "model.sasrec",
    "hstu": "model.hstu",
    "hymirec": "model.hymirec_model",
    "persrec": "model.persrec",
    "fuxi_mme": "model.fuxi_mme",
}


@dataclass(frozen=True)
class TrainingDefaults:
    """How the harness cuts training samples for a model (see ``model.data.training_batches``).

    ``max_len``: the longest history the model sees (HyMiRec and PerSRec model long histories,
    up to 1000 items; ML-100K's longest user has 737). ``target_window``: W, the next-W-items
    targets. ``cut``/``samples_per_user``: which prefixes are sampled each epoch.
    """

    max_len: int
    target_window: int = 1
    cut: Literal["uniform", "last"] = "uniform"
    samples_per_user: int = 1


TRAINING_DEFAULTS: dict[str, TrainingDefaults] = {
    "popular": TrainingDefaults(max_len=200, cut="last"),
    # Next-item prediction at every position: the longest prefix teaches every transition.
    "sasrec": TrainingDefaults(max_len=200, cut="last"),
    "hstu": TrainingDefaults(max_len=200, cut="last"),
    # Multi-interest models learn from the next W items after a random prefix.
    "hymirec": TrainingDefaults(max_len=1000, target_window=5, cut="uniform", samples_per_user=4),
    "persrec": TrainingDefaults(max_len=1000, target_window=5, cut="uniform", samples_per_user=4),
    "fuxi_mme": TrainingDefaults(max_len=200, target_window=5, cut="uniform", samples_per_user=4),
}


def module_name(name: str) -> str:
    """``model.<module>`` for a model name; ConfigError naming the known models otherwise."""
    try:
        return _MODULES[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}"
        ) from None


def is_available(name: str) -> bool:
    """Whether the model's module exists (it may still fail to import)."""
    return importlib.util.find_spec(module_name(name)) is not None


def _module(name: str) -> ModuleType:
    path = module_name(name)
    if importlib.util.find_spec(path) is None:
        raise ConfigError(
            f"model {name!r} is not available: {path.replace('.', '/')}.py is missing"
        )
    return importlib.import_module(path)


def config_from_dict(cls: type[Any], values: dict[str, Any]) -> Any:
    """Rebuild a (possibly nested) config dataclass from ``dataclasses.asdict`` output."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{cls.__module__}.Config has no fields {unknown}; fields: {sorted(fields)}"
        )
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        current = getattr(defaults, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = config_from_dict(type(current), value)
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return dataclasses.replace(defaults, **kwargs)


def make_config(name: str, **overrides: Any) -> Any:
    """The model's ``Config()`` with ``overrides`` applied (unknown fields are a ConfigError)."""
    return config_from_dict(_module(name).Config, overrides)


def build(name: str, catalog: CatalogInfo, **overrides: Any) -> SequentialRecommender:
    """Build model ``name`` for ``catalog`` with its default config plus ``overrides``."""
    module = _module(name)
    model = module.build_model(catalog, make_config(name, **overrides))
    if not isinstance(model, SequentialRecommender):
        raise ConfigError(f"{module.__name__}.build_model returned {type(model).__name__}")
    return model


def training_defaults(name: str) -> TrainingDefaults:
    """How the harness cuts training samples for model ``name``."""
    module_name(name)
    return TRAINING_DEFAULTS[name]


def default_max_len(name: str) -> int:
    """The longest history the harness feeds model ``name`` by default."""
    return training_defaults(name).max_len
