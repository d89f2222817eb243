"""Variants for the offline benchmarks: a model trained with config overrides and harness keys.

``model:key=value,key=value`` (values as Python literals, else strings). Keys the harness takes
(``max_len``, ``target_window``, ``samples_per_user``: integers >= 1; ``cut``: ``uniform`` or
``last``, ``model.data.training_batches``) go to ``train_and_evaluate``. ``codebook=trained``
(HyMiRec only) first trains the same variant on the text codebook, fits a codebook of the same
shape on its item embeddings (``model.stage1_codebook``), then trains the variant again, from
scratch and with the same seed, reading its long history through the new codes (the paper's
stage 1, by analogy). Every other key is a field of the model's Config.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from typing import Any

from core.errors import ConfigError
from model import zoo
from model.base import CatalogInfo
from model.data import SequenceData
from model.stage1_codebook import with_trained_codebook
from model.training.offline import RunResult, train_and_evaluate

__all__ = ["HARNESS_KEYS", "Variant", "parse_variant", "variant_argument"]

HARNESS_KEYS = ("max_len", "target_window", "samples_per_user")  # keys for the harness
CUTS = ("uniform", "last")  # model.data.training_batches
CODEBOOKS = ("text", "trained")  # where the long history's codes come from


@dataclass(frozen=True)
class Variant:
    """A model trained with config ``overrides`` and harness arguments (``max_len``, ...)."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    harness: dict[str, Any] = field(default_factory=dict)
    codebook: str = "text"

    @property
    def label(self) -> str:
        settings = {**self.overrides, **self.harness}
        if self.codebook != "text":
            settings["codebook"] = self.codebook
        if not settings:
            return self.name
        return f"{self.name} ({', '.join(f'{k}={v}' for k, v in settings.items())})"

    def train(self, catalog: CatalogInfo, data: SequenceData, seed: int, args: Any) -> RunResult:
        overrides = dict(self.overrides)
        cache = getattr(args, "llm_cache_dir", None)  # de-quantise the LLM once, then read it
        if overrides.get("refiner") == "llm" and cache is not None:
            overrides.setdefault("llm_cache_dir", str(cache))
        if self.codebook == "trained":
            stage1 = self._train(catalog, data, seed, args, overrides)
            catalog, cosine = with_trained_codebook(catalog, stage1.model.item_embeddings(), seed)
            print(
                f"{self.label} seed {seed}: stage 1 test ndcg@10 {stage1.test['ndcg@10']:.4f}; "
                f"codebook of its item embeddings, mean reconstruction cosine {cosine:.3f}",
                file=sys.stderr,
            )
            overrides["long_projection"] = "own"
        return self._train(catalog, data, seed, args, overrides)

    def _train(
        self,
        catalog: CatalogInfo,
        data: SequenceData,
        seed: int,
        args: Any,
        overrides: dict[str, Any],
    ) -> RunResult:
        return train_and_evaluate(
            self.name,
            catalog,
            data,
            seed=seed,
            epochs=args.epochs,
            batch_size=args.batch_size,
            patience=args.patience,
            overrides=overrides or None,
            max_len=self.harness.get("max_len"),
            target_window=self.harness.get("target_window"),
            samples_per_user=self.harness.get("samples_per_user"),
            cut=self.harness.get("cut"),
        )


def parse_variant(spec: str) -> Variant:
    """``model:key=value,key=value`` (values as Python literals, else strings); unknown models
    or config fields are a ConfigError naming them."""
    name, _, body = spec.partition(":")
    overrides: dict[str, Any] = {}
    harness: dict[str, Any] = {}
    codebook = "text"
    for pair in filter(None, body.split(",")):
        key, sep, text = pair.partition("=")
        if not sep:
            raise ConfigError(f"variant {spec!r}: {pair!r} is not key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        key = key.strip()
        if key == "codebook":
            if value not in CODEBOOKS or name != "hymirec":
                raise ConfigError(
                    f"variant {spec!r}: codebook must be one of {CODEBOOKS}, for hymirec only"
                )
            codebook = str(value)
            continue
        if key == "cut":
            if value not in CUTS:
                raise ConfigError(f"variant {spec!r}: cut must be one of {CUTS}; got {text!r}")
            harness[key] = value
            continue
        if key in HARNESS_KEYS and not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"variant {spec!r}: {key} must be an integer >= 1; got {text!r}")
        (harness if key in HARNESS_KEYS else overrides)[key] = value
    zoo.make_config(name, **overrides)  # unknown model or field: ConfigError now, not mid-run
    return Variant(name, overrides, harness, codebook)


def variant_argument(spec: str) -> Variant:
    """:func:`parse_variant` for argparse (its errors become a usage message)."""
    try:
        return parse_variant(spec)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
