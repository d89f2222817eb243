"""Offline-trained starting points for the online models (pretrain offline, fine-tune online).

:func:`pretrained_checkpoint` trains a model with the offline harness
(``model.training.offline``: AdamW,
validation early stopping on NDCG@10, the best weights kept) and saves it as an offline
checkpoint. The file is cached under ``<cache_dir>/pretrained/`` by a key over everything that
decides the result: the training sequences, the catalogue (text embeddings and codebook codes),
the model name, seed and budget, and the source of ``model/``'s
models and offline harness (so a code change there retrains). A
second call with the same inputs loads the file and trains nothing.

The online trainer starts from such a file (``hymirec trainer --init-from DIR``, see
``model.training.stream_loop``); the demo trains them once and caches them.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from core.errors import ConfigError
from model import zoo
from model.base import CatalogInfo
from model.data import SequenceData
from model.training.offline import save_checkpoint, train_and_evaluate

__all__ = [
    "PRETRAIN_EPOCHS",
    "ProgressBar",
    "pretrain_key",
    "pretrained_checkpoint",
    "pretrained_filename",
]

log = logging.getLogger(__name__)

# The demo's offline budget per model (at most; early stopping on validation, patience 3).
# SASRec and HSTU take ~2-4 s an epoch on 2 cores, HyMiRec ~5 s, PerSRec and Fuxi-MME ~20-25 s
# (benchmarks/RESULTS.md, offline evaluation).
PRETRAIN_EPOCHS = {
    "popular": 0,
    "sasrec": 15,
    "hstu": 15,
    "hymirec": 10,
    "persrec": 5,
    "fuxi_mme": 5,
}
_MODEL_SOURCES = Path(__file__).resolve().parent.parent  # model/


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for array in arrays:
        h.update(str(array.dtype).encode() + str(array.shape).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


# The online side of model/ does not change what offline training produces.
_ONLINE_ONLY = {
    "training/online.py",
    "training/online_core.py",
    "training/online_metrics.py",
    "training/stream_loop.py",
    "training/pretrain.py",
    "checkpoint.py",
    "checkpoint_registry.py",
}


def _code_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(_MODEL_SOURCES.rglob("*.py")):
        name = path.relative_to(_MODEL_SOURCES).as_posix()
        if name not in _ONLINE_ONLY:
            h.update(name.encode() + path.read_bytes())
    return h.hexdigest()


def pretrain_key(
    name: str, catalog: CatalogInfo, data: SequenceData, seed: int, epochs: int
) -> str:
    """The cache key of one offline run (see the module docstring)."""
    h = hashlib.sha256()
    h.update(f"{name}|{seed}|{epochs}|{torch.__version__}".encode())
    h.update(_digest(data.user_ids, data.item_ids, *data.items).encode())
    h.update(_digest(catalog.text_embeddings.numpy(), catalog.codes.numpy()).encode())
    h.update(_code_digest().encode())
    return h.hexdigest()[:20]


def pretrained_filename(name: str) -> str:
    """The name a pretrained model has in an ``--init-from`` folder."""
    return f"{name}.pt"


class ProgressBar:
    """A one-line text progress bar per model on a stream (a terminal or a log)."""

    def __init__(
        self, name: str, total: int, stream: TextIO | None = None, width: int = 30
    ) -> None:
        self.name, self.total, self.width = name, max(total, 1), width
        self.stream = stream or sys.stdout
        self.started = time.monotonic()

    def __call__(self, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        done = min(epoch, self.total)
        filled = round(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        ndcg = metrics.get("ndcg@10", float("nan"))
        line = (
            f"[pretrain] {self.name:<8} [{bar}] epoch {epoch}/{epochs}  valid NDCG@10 {ndcg:.4f}  "
            f"{time.monotonic() - self.started:.0f} s"
        )
        print(line, file=self.stream, flush=True)


def pretrained_checkpoint(
    name: str,
    catalog: CatalogInfo,
    data: SequenceData,
    cache_dir: Path,
    *,
    seed: int = 0,
    epochs: int | None = None,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[Path, bool]:
    """The cached offline checkpoint of ``name`` (trained now if missing); and whether it came
    from the cache."""
    zoo.module_name(name)  # an unknown model is a ConfigError naming the known ones
    budget = PRETRAIN_EPOCHS.get(name, 5) if epochs is None else epochs
    if budget < 0:
        raise ConfigError(f"epochs must be >= 0; got {budget}")
    key = pretrain_key(name, catalog, data, seed, budget)
    path = Path(cache_dir) / "pretrained" / f"{name}-seed{seed}-{key}.pt"
    if path.is_file():
        return path, True
    started = time.monotonic()
    run = train_and_evaluate(name, catalog, data, seed=seed, epochs=budget, on_epoch=on_epoch)
    save_checkpoint(run, path)
    log.info(
        "pretrained %s in %.0f s: best epoch %d of %d, valid %s",
        name,
        time.monotonic() - started,
        run.best_epoch,
        run.epochs_run,
        {k: round(v, 4) for k, v in run.valid.items()},
    )
    return path, False
