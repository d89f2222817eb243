"""Offline accuracy of every registered model on MovieLens-100K: full ranking, several seeds.

Trains each model the registry can build (models whose module does not exist yet are skipped with
a message) with the one harness, ``model.training.offline.train_and_evaluate``, for each seed;
prints a
markdown table of mean ± std (over seeds, ddof=1) of the test metrics and the cost of training,
and appends it with the date, the machine and the protocol to ``benchmarks/RESULTS.md``.

Beside leave-one-out it reports, for multi-interest models, every interest-merge rule on the same
trained weights (``model.interest_merge``), leave-one-out on the tie-free users, and a second
training per model and seed on the multi-target hold-out (``model.multi_target``: the last 10 items
as the target set; ``--multi-target 0`` skips it).

Run from the repository root: ``python -m benchmarks.offline_eval [--models ...] [--seeds 0 1 2]
[--epochs E] [--threads T] [--multi-target N] [--clusters world|genres] [--results PATH]
[--variants MODEL:KEY=VALUE,...] [--item-encoder minilm|smollm2] [--max-users N]``. A variant
(issue 22's ablations and W/K grid, e.g. ``hymirec:interests=1``, ``hymirec:max_len=50`` for no
long history, ``hymirec:target_window=10``, ``hymirec:codebook=trained``: ``benchmarks.variants``)
trains a model with config overrides beside the plain models, at the same budget, and gets its
own rows. The LLM backbone (issue 22 item 7): ``--item-encoder smollm2`` embeds item text with
SmolLM2-135M instead of MiniLM (only HyMiRec reads it); ``hymirec:refiner=llm`` makes the frozen
SmolLM2-135M (LoRA) HyMiRec's refiner, a GPU job (``benchmarks/gpu_check.sh``); the ``backbone``
column says what each row used. ``--max-users N`` keeps the first N users (smoke runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.report import append_section, device, machine
from benchmarks.variants import Variant, variant_argument
from core.errors import HymirecError
from core.movielens import load_ratings
from core.settings import Settings, load_settings
from model import zoo
from model.base import CatalogInfo
from model.data import (
    ITEM_ENCODERS,
    ItemTextEncoder,
    SequenceData,
    build_catalog,
    load_movielens_sequences,
)
from model.evaluate import genre_ids
from model.interest_merge import MERGES, Merge
from model.multi_target import evaluate_multi_target, holdout_data, tie_free_users
from model.training.offline import RunResult, evaluate_model
from simulator.grounded import grounded_population

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
- Training: `model.training.offline.train_and_evaluate`: AdamW (lr 1e-3, weight decay 0.01), \
each model's \
own loss (full softmax over all items); validation after every epoch, best NDCG@10 kept, stop \
after `patience` epochs without gain; the best weights are tested. Mean ± std over seeds (ddof=1).
- Cost: train s = epochs plus their validation passes; samples/s = training sequences per second \
of optimiser steps; peak MB = RSS growth over the run's start (CPU) or CUDA peak allocation."""

MULTI_PROTOCOL = """\
- Merge rules: a multi-interest model's K scores per item merged by max, tau*logsumexp(s/tau) at \
the training temperature, or a learned gate over interests (`model/interest_merge.py`), all on the \
same best-on-validation weights (selected with the model's configured merge).
- Tie-free users: those whose test and validation items have different timestamps (ML-100K \
stores seconds; ties are in file order, which no model can know); leave-one-out on them only.
- Multi-target hold-out: each user's last {n} items are the target set; the model is trained \
again (same seed and budget) on the rest, early-stopping on the item before the set; \
Recall@50 = hits/|set|, NDCG@50 over the set, interest coverage@50 = share of the set's item \
clusters ({clusters}) that the top 50 hit."""


def multi_protocol(multi_target: int, clusters: str) -> str:
    """The merge-rule notes, and the multi-target hold-out's unless it was skipped (0)."""
    text = MULTI_PROTOCOL.format(n=multi_target, clusters=CLUSTERS[clusters])
    return text if multi_target else text.split("\n- Multi-target", 1)[0]


CLUSTERS = {
    "world": "the grounded world's 20 item clusters, simulator/grounded.py",
    "genres": "genre sets",
}

ANCHORS = """\
Published anchors (a different data set, MovieLens-1M, with sampled-softmax training; context, \
not a target): Zhai et al. 2024, "Actions Speak Louder than Words: Trillion-Parameter Sequential \
Transducers for Generative Recommendations" (ICML), ML-1M full-corpus HR@10 / NDCG@10: SASRec \
0.2853 / 0.1603, HSTU 0.3097 / 0.1720, HSTU-large 0.3294 / 0.1893. Checked here against the ML-1M \
table in the authors' repository README (facebookresearch/generative-recommenders), which reports \
the paper's results; the paper's own table was not opened."""


def machine_now() -> str:
    """The machine and the 1-minute load average now."""
    return f"{machine()}, device {device()}, load {os.getloadavg()[0]:.2f}"


def mean_std(values: list[float], digits: int = 4) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


ENCODER_NAMES: dict[str, str] = {"minilm": "MiniLM-L6", "smollm2": "SmolLM2-135M"}


def backbone_of(config: dict[str, Any], item_encoder: str) -> str:
    """Which refiner and item-text encoder a run used: HyMiRec reads item text, the others
    learn from item ids only."""
    if "refiner" not in config:
        return "ids only"
    if config["refiner"] == "llm":
        blocks = f", {config['llm_layers']} blocks" if config.get("llm_layers") else ""
        refiner = f"SmolLM2-135M refiner (LoRA r{config['llm_lora_rank']}{blocks})"
    else:
        refiner = "transformer refiner"
    return f"{refiner}; {ENCODER_NAMES[item_encoder]} item text"


def table(runs: dict[str, list[RunResult]], item_encoder: str = "minilm") -> str:
    head = ["model", "backbone", *(label for label, _ in METRICS)]
    head += ["best/run epochs", "train s", "samples/s", "peak MB", "device"]
    lines = ["| " + " | ".join(head) + " |", "|---|---" + "|---:" * (len(head) - 3) + "|---|"]
    for name, results in runs.items():
        cells = [name, backbone_of(results[0].config, item_encoder)]
        cells += [mean_std([r.test[key] for r in results]) for _, key in METRICS]
        cells.append(", ".join(f"{r.best_epoch}/{r.epochs_run}" for r in results))
        cells.append(mean_std([r.train_time_s for r in results], 1))
        trained = any(r.epochs_run for r in results)  # popular is counted, not trained
        cells.append(mean_std([r.samples_per_s for r in results], 1) if trained else "-")
        cells.append(mean_std([r.peak_memory_mb for r in results], 0))
        cells.append(results[0].device)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


Extras = dict[
    str, dict[str, float]
]  # "valid/max", "test/gate", "tie_free/logsumexp", ... -> metrics


def item_clusters(
    kind: str, catalog: CatalogInfo, data: SequenceData, settings: Settings
) -> Tensor:
    """(N + 1,) int64 cluster per item index: the grounded world's item clusters, or genre sets."""
    if kind == "genres":
        return genre_ids(catalog.genres)
    world = grounded_population(load_ratings(), seed=0, cache_dir=settings.embedding_cache_dir)
    labels = world.clusters.labels[world.rows(data.item_ids)]
    return torch.from_numpy(np.concatenate([[0], labels]).astype(np.int64))


def merges_of(run: RunResult) -> tuple[Merge | None, ...]:
    """The merge rules worth comparing for this model (None = the model's own, one interest)."""
    return MERGES if run.model.num_interests > 1 else (None,)


def leave_one_out_extras(run: RunResult, data: SequenceData, catalog: CatalogInfo) -> Extras:
    """Valid and test metrics under each merge rule, and test on the tie-free users."""
    max_len, tie_free, out = int(run.options["max_len"]), tie_free_users(data), {}
    for merge in merges_of(run):
        rule = merge or "own"
        for split in ("valid", "test"):
            out[f"{split}/{rule}"] = evaluate_model(
                run.model,
                data,
                catalog.genres,
                split,
                max_len,
                merge=merge,
            )
        out[f"tie_free/{rule}"] = evaluate_model(
            run.model,
            data,
            catalog.genres,
            "test",
            max_len,
            merge=merge,
            users=tie_free,
        )
    return out


def merge_table(extras: dict[str, list[Extras]]) -> str:
    head = "| model | merge | valid R@50 | valid NDCG@10 | test R@50 | test NDCG@10 |"
    head += " tie-free R@50 | tie-free NDCG@10 |"
    lines = [head, "|---|---" + "|---:" * 6 + "|"]
    for name, runs in extras.items():
        rules = sorted({key.split("/")[1] for key in runs[0]}, key=lambda r: (r != "own", r))
        for rule in rules:
            cells = [name, rule]
            for part in ("valid", "test", "tie_free"):
                for metric in ("recall@50", "ndcg@10"):
                    cells.append(mean_std([r[f"{part}/{rule}"][metric] for r in runs]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MULTI_METRICS = [
    ("Recall@50", "recall@50"),
    ("NDCG@50", "ndcg@50"),
    ("HR@50", "hr@50"),
    ("interest cov@50", "interest_coverage@50"),
    ("Recall@10", "recall@10"),
]


def multi_target_table(extras: dict[str, list[Extras]]) -> str:
    head = ["model", "merge", *(label for label, _ in MULTI_METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|---|---" + "|---:" * len(MULTI_METRICS) + "|"]
    for name, runs in extras.items():
        for rule in sorted({key.split("/")[1] for key in runs[0]}, key=lambda r: (r != "own", r)):
            cells = [name, rule]
            cells += [mean_std([r[f"multi/{rule}"][key] for r in runs]) for _, key in MULTI_METRICS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def multi_target_extras(
    variant: Variant,
    args: argparse.Namespace,
    seed: int,
    catalog: CatalogInfo,
    data: SequenceData,
    clusters: Tensor,
) -> Extras:
    """Train ``variant`` again on the multi-target hold-out; its set metrics under each merge."""
    run = variant.train(catalog, holdout_data(data, args.multi_target), seed, args)
    max_len = int(run.options["max_len"])
    return {
        f"multi/{merge or 'own'}": evaluate_multi_target(
            run.model,
            data,
            clusters,
            max_len,
            args.multi_target,
            merge=merge,
        )
        for merge in merges_of(run)
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", nargs="*", default=list(zoo.MODEL_NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="at most, per run")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--multi-target", type=int, default=10, help="target set size; 0: skip")
    parser.add_argument("--clusters", choices=sorted(CLUSTERS), default="world")
    parser.add_argument(
        "--item-encoder",
        choices=ITEM_ENCODERS,
        default="minilm",
        help="item-text encoder of the catalogue (smollm2: the LLM backbone)",
    )
    parser.add_argument("--max-users", type=int, default=0, help="keep the first N users; 0: all")
    parser.add_argument(
        "--variants",
        nargs="*",
        type=variant_argument,
        default=[],
        help="extra runs, MODEL:KEY=VALUE,... (e.g. hymirec:interests=1 hymirec:max_len=50)",
    )
    return parser.parse_args(argv)


def first_users(data: SequenceData, args: argparse.Namespace) -> SequenceData:
    """The first ``args.max_users`` users of ``data`` (all when 0)."""
    keep = args.max_users or data.num_users
    if keep >= data.num_users:
        return data
    return SequenceData(
        data.user_ids[:keep], data.item_ids, data.items[:keep], data.timestamps_s[:keep]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = machine_now()

    settings = load_settings()
    args.llm_cache_dir = settings.embedding_cache_dir
    encoder: ItemTextEncoder = args.item_encoder
    catalog, data = build_catalog(settings, encoder), first_users(load_movielens_sequences(), args)
    clusters = item_clusters(args.clusters, catalog, data, settings) if args.multi_target else None
    runs: dict[str, list[RunResult]] = {}
    loo_extras: dict[str, list[Extras]] = {}
    multi_extras: dict[str, list[Extras]] = {}
    skipped: list[str] = []
    for variant in [*map(Variant, args.models), *args.variants]:
        name = variant.label
        if not zoo.is_available(variant.name):
            module = zoo.module_name(variant.name)
            skipped.append(f"{name} ({module} does not exist yet)")
            print(f"skip {name}: {module} does not exist yet", file=sys.stderr)
            continue
        for seed in args.seeds:
            tick = time.perf_counter()
            try:
                run = variant.train(catalog, data, seed, args)
            except (ImportError, HymirecError) as exc:
                skipped.append(f"{name} ({type(exc).__name__}: {exc})")
                print(f"skip {name}: {exc}", file=sys.stderr)
                break
            runs.setdefault(name, []).append(run)
            loo_extras.setdefault(name, []).append(leave_one_out_extras(run, data, catalog))
            if clusters is not None:
                multi = multi_target_extras(variant, args, seed, catalog, data, clusters)
                multi_extras.setdefault(name, []).append(multi)
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
        f"threads; {ENCODER_NAMES[encoder]} item text; {data.num_users} users; 1-minute load at "
        f"the end: {os.getloadavg()[0]:.2f})",
        "",
        PROTOCOL,
        "",
        table(runs, encoder),
        "",
        multi_protocol(args.multi_target, args.clusters),
        "",
        f"Leave-one-out by merge rule ({int(tie_free_users(data).sum())} of {data.num_users} "
        "users tie-free):",
        "",
        merge_table(loo_extras),
        "",
    ]
    if multi_extras:
        parts += [f"Multi-target hold-out (last {args.multi_target} items):", ""]
        parts += [multi_target_table(multi_extras), ""]
    if skipped:
        parts += [f"Skipped: {'; '.join(skipped)}.", ""]
    parts += [ANCHORS, ""]
    report = "\n".join(parts)
    print(report)
    append_section(args.results, report)


if __name__ == "__main__":
    main()
