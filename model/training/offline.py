"""The one training harness for every model: train, early-stop on validation, test, checkpoint.

``train_and_evaluate`` is nanoGPT's ``train.py`` loop without the framework: AdamW steps over
``model.data.training_batches``; after every epoch a full-ranking validation pass; the weights
with the best validation NDCG@10 are kept, and training stops after ``patience`` epochs without
improvement; those best weights are then evaluated on the test targets. Epoch 0 is the untrained
model, so a run can never return weights worse (on validation) than its initialisation. The
popularity baseline is fitted by counting and skips the loop (the ``epochs=0`` path).

Reproducible on CPU: a run seeds Python, NumPy and torch from ``seed``, draws its data order from
``numpy.random.default_rng(seed)`` and runs under ``torch.use_deterministic_algorithms`` (with
cuDNN's deterministic kernels and no autotuning on CUDA), so two runs with the same seed, data,
torch build and thread count give the same weights and metrics
(``tests/model/test_reproducible.py``). The thread count is recorded in the run's options: a
different count may sum in another order.

Timing: ``train_time_s`` is the wall time from the first step to the chosen model (training
epochs and their validation passes); ``samples_per_s`` counts training sequences per second of
optimisation steps alone. Memory: on CUDA ``torch.cuda.max_memory_allocated`` (tensors only); on
CPU the increase of the process's resident set size over its value at the start of training,
sampled every 20 ms from ``/proc/self/statm`` (``resource.getrusage`` peak RSS where /proc is
missing; that is a process-lifetime high-water mark, so it under-reports later runs).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import ConfigError, DataError
from model import zoo
from model.base import Batch, CatalogInfo, SequentialRecommender
from model.data import Cut, SequenceData, Split, evaluation_batches, training_batches
from model.evaluate import RankingAccumulator
from model.interest_merge import Merge
from model.popularity import PopularityRecommender
from model.training.peak_memory import PeakMemory

__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadedCheckpoint",
    "RunResult",
    "checkpoint_path",
    "evaluate_checkpoint",
    "evaluate_model",
    "format_metrics",
    "load_checkpoint",
    "save_checkpoint",
    "train_and_evaluate",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "hymirec-offline-checkpoint/1"
SELECTION_METRIC = "ndcg@10"


@dataclass
class RunResult:
    """What one training run produced: the best-on-validation model and every measurement."""

    name: str
    seed: int
    model: SequentialRecommender
    config: dict[str, Any]  # dataclasses.asdict of the model's Config
    options: dict[str, Any]  # data and optimiser settings of the run
    valid: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    epochs_run: int
    train_time_s: float
    samples_per_s: float
    peak_memory_mb: float
    memory_method: str
    device: str
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch (0 = untrained)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Torch's deterministic kernels inside the block (warn where an op has none), restored after.

    On CUDA, cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` set before the process starts to be
    deterministic; without it torch warns and the run may differ in the last bits."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = was_cudnn


@torch.no_grad()
def evaluate_model(
    model: SequentialRecommender,
    data: SequenceData,
    genres: list[frozenset[str]],
    split: Split,
    max_len: int,
    batch_size: int = 256,
    device: torch.device | None = None,
    *,
    merge: Merge | None = None,
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of ``model`` on one split (float32, eval mode).

    ``merge`` overrides the model's interest-merge rule; ``users`` (num_users,) bool keeps only
    those users (e.g. ``model.multi_target.tie_free_users``)."""
    if device is None:
        device = next(itertools.chain(model.parameters(), model.buffers())).device
    was_training = model.training
    model.eval()
    accumulator = RankingAccumulator(genres)
    for chunk in evaluation_batches(data, split, max_len, batch_size):
        batch, target, seen = chunk.batch, chunk.target, chunk.seen
        if users is not None:
            keep = torch.from_numpy(users[batch.user_index.numpy()])
            if not keep.any():
                continue
            batch = Batch(*(t[keep] for t in vars(batch).values()))
            target, seen = target[keep], seen[keep]
        scores = model.score_all(batch.to(device), merge)
        accumulator.add(scores.float(), target.to(device), seen.to(device))
    model.train(was_training)
    return accumulator.result()


def _config_dict(config: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ConfigError(f"a model Config must be a dataclass instance; got {type(config)}")
    return dataclasses.asdict(config)


@deterministic_algorithms()
def _build(
    name: str, catalog: CatalogInfo, max_len: int, overrides: dict[str, Any] | None
) -> tuple[Any, SequentialRecommender]:
    """The model's Config and the model (a Config with ``max_len`` gets the harness's unless
    ``overrides`` sets it)."""
    values = dict(overrides or {})
    if "max_len" in {f.name for f in dataclasses.fields(zoo.make_config(name))}:
        values.setdefault("max_len", max_len)
    return zoo.make_config(name, **values), zoo.build(name, catalog, **values)


def _options(
    defaults: zoo.TrainingDefaults,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    patience: int,
    max_len: int,
    window: int,
) -> dict[str, Any]:
    """The run's options as its result and checkpoint record them."""
    return {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "patience": patience,
        "max_len": max_len,
        "target_window": window,
        "cut": defaults.cut,
        "samples_per_user": defaults.samples_per_user,
        "selection": SELECTION_METRIC,
        "torch_threads": torch.get_num_threads(),
        "deterministic": True,
    }


def _train_epoch(
    model: SequentialRecommender,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    device: torch.device,
) -> tuple[list[float], int]:
    """One pass over ``batches``: each batch's loss and the number of samples trained on."""
    model.train()
    losses, samples = [], 0
    for batch in batches:
        batch = batch.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
        losses.append(float(loss.detach()))
        samples += int(batch.history.shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait before timing
    return losses, samples


@dataclass(frozen=True)
class _FitOptions:
    epochs: int
    patience: int
    lr: float
    weight_decay: float
    device: torch.device
    label: str  # for the log: "<model> seed <seed>"


@dataclass
class _Fit:
    """The best validation metrics, their epoch and weights, and what training took."""

    best: dict[str, float]
    best_epoch: int
    best_state: dict[str, Any]
    history: list[dict[str, float]]
    epochs_run: int = 0
    step_time_s: float = 0.0
    samples: int = 0


def _fit(
    model: SequentialRecommender,
    validate: Callable[[], dict[str, float]],
    batches: Callable[[], Iterable[Batch]],
    options: _FitOptions,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None,
) -> _Fit:
    """Train epoch after epoch, validating after each, until ``patience`` epochs bring no better
    validation NDCG@10 (or ``epochs`` ran); keep the best epoch's weights."""
    best = validate()
    fit = _Fit(
        best,
        0,
        copy.deepcopy(model.state_dict()),
        [{"epoch": 0.0, "loss": float("nan"), SELECTION_METRIC: best[SELECTION_METRIC]}],
    )
    if not options.epochs:
        return fit
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=options.lr, weight_decay=options.weight_decay
    )
    for epoch in range(1, options.epochs + 1):
        tick = time.perf_counter()
        losses, seen = _train_epoch(model, optimizer, batches(), options.device)
        fit.samples += seen
        fit.step_time_s += time.perf_counter() - tick
        fit.epochs_run = epoch
        metrics = validate()
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        fit.history.append({"epoch": float(epoch), "loss": mean_loss, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, options.epochs, fit.history[-1])
        log.info("%s epoch %d: loss %.4f", options.label, epoch, mean_loss)
        if metrics[SELECTION_METRIC] > fit.best[SELECTION_METRIC]:
            fit.best, fit.best_epoch = metrics, epoch
            fit.best_state = copy.deepcopy(model.state_dict())
        elif epoch - fit.best_epoch >= options.patience:
            break
    return fit


def _defaults(name: str, samples_per_user: int | None, cut: Cut | None) -> zoo.TrainingDefaults:
    """The model's training defaults, with ``samples_per_user`` and ``cut`` when given (a bad
    ``cut`` is refused by ``training_batches``)."""
    if samples_per_user is not None and samples_per_user < 1:
        raise ConfigError(f"samples_per_user must be >= 1; got {samples_per_user}")
    own = zoo.training_defaults(name)
    samples, chosen = samples_per_user or own.samples_per_user, cut or own.cut
    return dataclasses.replace(own, samples_per_user=samples, cut=chosen)


def train_and_evaluate(
    name: str,
    catalog: CatalogInfo,
    data: SequenceData,
    seed: int,
    epochs: int,
    device: torch.device | str | None = None,
    *,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    patience: int = 3,
    max_len: int | None = None,
    target_window: int | None = None,
    samples_per_user: int | None = None,
    cut: Cut | None = None,
    overrides: dict[str, Any] | None = None,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Train model ``name`` on ``data`` (seeded), early-stop on validation NDCG@10, test the best.

    ``max_len``/``target_window``/``samples_per_user`` (prefixes per user and epoch)/``cut``
    (``model.data.training_batches``) default to the registry's per-model choices; a model Config
    with a ``max_len`` field gets the harness's ``max_len`` unless ``overrides`` sets it.
    ``on_epoch`` is called after every epoch's validation with (epoch, at most epochs, that
    epoch's metrics and loss), for a progress display.
    """
    if data.num_items != catalog.num_items:
        raise DataError(f"data has {data.num_items} items but the catalogue {catalog.num_items}")
    if epochs < 0 or patience < 1:
        raise ConfigError("epochs must be >= 0 and patience >= 1")
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = _defaults(name, samples_per_user, cut)
    max_len = max_len or defaults.max_len
    window = target_window or defaults.target_window
    _seed_everything(seed)
    config, model = _build(name, catalog, max_len, overrides)
    model = model.to(chosen)
    rng = np.random.default_rng(seed)
    options = _options(defaults, epochs, batch_size, lr, weight_decay, patience, max_len, window)

    def validate() -> dict[str, float]:
        return evaluate_model(model, data, catalog.genres, "valid", max_len, device=chosen)

    with PeakMemory(chosen) as memory:
        start = time.perf_counter()
        if isinstance(model, PopularityRecommender):
            model.fit(torch.from_numpy(data.training_item_counts()).float())
            epochs = 0
        fit = _fit(
            model,
            validate,
            lambda: training_batches(
                data, max_len, batch_size, rng, window, defaults.cut, defaults.samples_per_user
            ),
            _FitOptions(epochs, patience, lr, weight_decay, chosen, f"{name} seed {seed}"),
            on_epoch,
        )
        train_time_s = time.perf_counter() - start
    model.load_state_dict(fit.best_state)
    test = evaluate_model(model, data, catalog.genres, "test", max_len, device=chosen)
    return RunResult(
        name=name,
        seed=seed,
        model=model,
        config=_config_dict(config),
        options=options,
        valid=fit.best,
        test=test,
        best_epoch=fit.best_epoch,
        epochs_run=fit.epochs_run,
        train_time_s=train_time_s,
        samples_per_s=fit.samples / fit.step_time_s if fit.step_time_s > 0 else 0.0,
        peak_memory_mb=memory.peak_bytes / 2**20,
        memory_method=memory.method,
        device=str(chosen),
        history=fit.history,
    )


def save_checkpoint(run: RunResult, path: Path) -> None:
    """Write a self-describing checkpoint: weights, config, name, seed, options, metrics.

    Written beside ``path`` and renamed into place, so a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": run.name,
        "config": run.config,
        "seed": run.seed,
        "options": run.options,
        "best_epoch": run.best_epoch,
        "metrics": {"valid": run.valid, "test": run.test},
        "state_dict": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
    }
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, partial)
    os.replace(partial, path)


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: SequentialRecommender
    name: str
    seed: int
    options: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    config: dict[str, Any] = field(default_factory=dict)  # the model Config, as saved


def load_checkpoint(
    path: Path, catalog: CatalogInfo, device: torch.device | str = "cpu"
) -> LoadedCheckpoint:
    """Rebuild the model a :func:`save_checkpoint` file describes and load its weights."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no checkpoint at {path}; train one with `hymirec train`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable files
        raise DataError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    name = str(payload["model_name"])
    model = zoo.build(name, catalog, **payload["config"])
    model.load_state_dict(payload["state_dict"])
    return LoadedCheckpoint(
        model=model.to(device).eval(),
        name=name,
        seed=int(payload["seed"]),
        options=dict(payload["options"]),
        metrics=dict(payload["metrics"]),
        config=dict(payload["config"]),
    )


def checkpoint_path(data_dir: Path, name: str, seed: int) -> Path:
    """Where ``hymirec train`` keeps a model: ``<data_dir>/models/<name>/seed<seed>.pt``."""
    return Path(data_dir) / "models" / name / f"seed{seed}.pt"


def evaluate_checkpoint(
    path: Path, catalog: CatalogInfo, data: SequenceData, device: torch.device | str | None = None
) -> dict[str, float]:
    """Test metrics of a saved model, with the history length it was trained with."""
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_checkpoint(path, catalog, chosen)
    max_len = int(loaded.options["max_len"])
    return evaluate_model(loaded.model, data, catalog.genres, "test", max_len, device=chosen)


def format_metrics(metrics: dict[str, float]) -> str:
    """``name value`` pairs on one line, four decimals, in a fixed order."""
    return "  ".join(f"{name} {metrics[name]:.4f}" for name in sorted(metrics))
