"""Offline accuracy of every registered model on MovieLens-100K: full ranking, several seeds.

Trains each model the registry can build (models whose module does not exist yet are skipped with
a message) with the one harness, ``model.train.train_and_evaluate``, for each seed; prints a
markdown table of mean ± std (over seeds, ddof=1) of the test metrics and the cost of training,
and appends it with the date, the machine and the protocol to ``benchmarks/RESULTS.md``.

Run from the repository root: ``python -m benchmarks.offline_eval [--models ...] [--seeds 0 1 2]
[--epochs E]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import append_section, machine
from hymirec.errors import HymirecError
from hymirec.settings import load_settings
from model import registry
from model.data import build_catalog, load_movielens_sequences
from model.train import RunResult, train_and_evaluate

METRICS = [
    ("Recall@10", "recall@10"),
    ("Recall@50", "recall@50"),
    ("NDCG@10", "ndcg@10"),
    ("NDCG@50", "ndcg@50"),
    ("HR@10", "hr@10"),
    ("HR@50", "hr@50"),
    ("Div@50", "diversity@50"),
    ("Cov@50", "coverage@50"),
]

PROTOCOL = """\
- Data: ML-100K (943 users, 1,682 items), leave-one-out by time (test = last item, validation = \
second-to-last, training = the rest); every item ranked, the user's earlier items masked; one \
target, so Recall@K = HR@K; Div@50 = share of top-50 pairs with unequal genre sets, Cov@50 = \
share of items in any user's top-50.
- Training: `model.train.train_and_evaluate`: AdamW (lr 1e-3, weight decay 0.01), each model's \
own loss (full softmax over all items); validation after every epoch, best NDCG@10 kept, stop \
after `patience` epochs without gain; the best weights are tested. Mean ± std over seeds (ddof=1).
- Cost: train s = epochs plus their validation passes; samples/s = training sequences per second \
of optimiser steps; peak MB = RSS growth over the run's start (CPU) or CUDA peak allocation."""

ANCHORS = """\
Published anchors (a different data set, MovieLens-1M, with sampled-softmax training; context, \
not a target): Zhai et al. 2024, "Actions Speak Louder than Words: Trillion-Parameter Sequential \
Transducers for Generative Recommendations" (ICML), ML-1M full-corpus HR@10 / NDCG@10: SASRec \
0.2853 / 0.1603, HSTU 0.3097 / 0.1720, HSTU-large 0.3294 / 0.1893. Checked here against the ML-1M \
table in the authors' repository README (facebookresearch/generative-recommenders), which reports \
the paper's results; the paper's own table was not opened."""


def machine_now() -> str:
    """The machine and the 1-minute load average now."""
    return f"{machine()}, load {os.getloadavg()[0]:.2f}"


def mean_std(values: list[float], digits: int = 4) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(runs: dict[str, list[RunResult]]) -> str:
    head = ["model", *(label for label, _ in METRICS)]
    head += ["best/run epochs", "train s", "samples/s", "peak MB", "device"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 2) + "|---|"]
    for name, results in runs.items():
        cells = [name]
        cells += [mean_std([r.test[key] for r in results]) for _, key in METRICS]
        cells.append(", ".join(f"{r.best_epoch}/{r.epochs_run}" for r in results))
        cells.append(mean_std([r.train_time_s for r in results], 1))
        trained = any(r.epochs_run for r in results)  # popular is counted, not trained
        cells.append(mean_std([r.samples_per_s for r in results], 1) if trained else "-")
        cells.append(mean_std([r.peak_memory_mb for r in results], 0))
        cells.append(results[0].device)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", default=list(registry.MODEL_NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="at most, per run")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = machine_now()

    settings = load_settings()
    catalog, data = build_catalog(settings), load_movielens_sequences()
    runs: dict[str, list[RunResult]] = {}
    skipped: list[str] = []
    for name in args.models:
        if not registry.is_available(name):
            skipped.append(f"{name} ({registry.module_name(name)} does not exist yet)")
            print(f"skip {name}: {registry.module_name(name)} does not exist yet", file=sys.stderr)
            continue
        for seed in args.seeds:
            tick = time.perf_counter()
            try:
                run = train_and_evaluate(
                    name,
                    catalog,
                    data,
                    seed=seed,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    patience=args.patience,
                )
            except (ImportError, HymirecError) as exc:
                skipped.append(f"{name} ({type(exc).__name__}: {exc})")
                print(f"skip {name}: {exc}", file=sys.stderr)
                break
            runs.setdefault(name, []).append(run)
            print(
                f"{name} seed {seed}: test ndcg@10 {run.test['ndcg@10']:.4f} "
                f"(best epoch {run.best_epoch}/{run.epochs_run}, "
                f"{time.perf_counter() - tick:.0f} s)",
                file=sys.stderr,
            )

    command = " ".join(["python -m benchmarks.offline_eval", *(argv or sys.argv[1:])])
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        f"## Offline evaluation, ML-100K full ranking — {when} — {started}",
        "",
        f"Command: `{command}` (seeds {', '.join(map(str, args.seeds))}; at most {args.epochs} "
        f"epochs, patience {args.patience}, batch {args.batch_size}, {args.threads} torch "
        f"threads; 1-minute load at the end: {os.getloadavg()[0]:.2f})",
        "",
        PROTOCOL,
        "",
        table(runs),
        "",
    ]
    if skipped:
        parts += [f"Skipped: {'; '.join(skipped)}.", ""]
    parts += [ANCHORS, ""]
    report = "\n".join(parts)
    print(report)
    append_section(args.results, report)


if __name__ == "__main__":
    main()
