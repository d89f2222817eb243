"""HyMiRec against single-embedding models on data with K known interleaved interests.

For each K (default 1, 2, 4, 8) and seed, draws a world with ``model.synthetic_interests`` (the
seed draws the world and seeds training), trains every model with the one harness
(``model.training.offline.train_and_evaluate``) at the same budget (epochs cap, patience, batch
size, learning rate; each model's own sampling defaults from ``model/zoo.py``), and reports
leave-one-out test Recall@50 / NDCG@10 and interest coverage@50 (share of a user's K clusters
that its top 50 reach), mean ± std over seeds, beside the Bayes-optimal ranking (the true
next-item law, ``next_item_probabilities``), and each model's gain over SASRec per K (paired by
seed). Appends the tables with the date, the machine, the load and the protocol to
``benchmarks/RESULTS.md``.

Run from the repository root: ``python -m benchmarks.controlled_interests [--interests 1 2 4 8]
[--seeds 0 1 2] [--models sasrec hymirec hymirec:interests=8] [--epochs E] [--patience P]
[--users U] [--stay S] [--spread X] [--results PATH]``; a model may be a variant with config
overrides, as in ``benchmarks.offline_eval --variants``. Torch runs on one thread (the machine's
cores are shared). Sized for 2 CPU cores: SASRec and HyMiRec on the 12 worlds took 23 min
(``--stay 0``), SASRec, HSTU and HyMiRec 26 min (the defaults), each beside two other runs at a
1-minute load of 2.5-3.6 (2026-12-05).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmarks.offline_eval import machine_now, mean_std
from benchmarks.report import append_section
from benchmarks.variants import Variant, variant_argument
from model.base import Batch
from model.data import evaluation_batches
from model.evaluate import RankingAccumulator, masked_scores, top_items
from model.synthetic_interests import (
    InterestWorld,
    InterestWorldConfig,
    generate_interest_world,
    next_item_probabilities,
)

COVERAGE_N = 50
METRICS = (("R@50", "recall@50"), ("NDCG@10", "ndcg@10"), ("cov@50", "coverage"))
ORACLE = "oracle"
Cell = dict[str, float]  # one (model, K, seed): test metrics, coverage, epochs, seconds
ScoreFn = Callable[[Batch, Tensor], Tensor]  # (batch, user indices) -> (B, N + 1) scores

PROTOCOL = """\
- Data: `model/synthetic_interests.py`, one world per (K, seed): {users} users, {clusters} \
clusters of {per_cluster} items (Zipf popularity inside a cluster, exponent {exponent}), {length} \
items per user; each user holds K distinct clusters with equal shares; the interest of each next \
item is kept with probability {stay}, else drawn afresh from the shares; items are drawn by \
popularity among the cluster's items the user has not consumed. Item "text" = a unit vector near \
its cluster's random centre (noise norm {spread}, {text_dim}-d), coded by a {levels}-level, \
{size}-centroid residual codebook for HyMiRec's long history; SASRec and HSTU use item IDs only.
- Split and metrics as for ML-100K (`benchmarks.offline_eval`): leave-one-out by time, every item \
ranked, the user's earlier items masked; test figures of the best-on-validation epoch. \
cov@50 = share of the user's K clusters that its top 50 reach. `oracle` ranks by the true \
next-item law (the Bayes-optimal ranking; an upper bound for any model).
- Budget, the same for every model: at most {epochs} epochs, patience {patience} on validation \
NDCG@10, batch {batch}, AdamW lr 1e-3, weight decay 0.01, each model's default config and sampling \
(`model/zoo.py`: SASRec/HSTU learn every transition of the longest prefix; HyMiRec 4 random \
prefixes per user and epoch, W = 5 next items). CPU, torch on 1 thread. Mean ± std over seeds \
(ddof=1); gains are paired by seed (same world)."""


@torch.no_grad()
def interest_coverage(world: InterestWorld, scores_of: ScoreFn, max_len: int) -> float:
    """Mean over users of the share of their K clusters among their top-50 test items."""
    clusters = torch.from_numpy(world.item_cluster)
    num_clusters, k = world.config.num_clusters, world.config.interests
    total = 0.0
    for chunk in evaluation_batches(world.data, "test", max_len, 256):
        users = chunk.batch.user_index
        top = top_items(masked_scores(scores_of(chunk.batch, users), chunk.seen), COVERAGE_N)
        reached = torch.zeros(len(users), num_clusters, dtype=torch.bool)
        reached.scatter_(1, clusters[top], True)
        held = torch.from_numpy(world.user_clusters[users.numpy()])
        total += float(reached.gather(1, held).sum()) / k
    return total / world.data.num_users


def oracle_scores(world: InterestWorld) -> ScoreFn:
    """Scores of the true law of each user's test item (the last), given everything before."""

    def scores(batch: Batch, users: Tensor) -> Tensor:
        rows = [
            next_item_probabilities(world, user, len(world.data.items[user]) - 1)
            for user in users.tolist()
        ]
        return torch.from_numpy(np.stack(rows))

    return scores


def oracle_cell(world: InterestWorld) -> Cell:
    """The Bayes-optimal ranking's test metrics and coverage."""
    scores_of = oracle_scores(world)
    accumulator = RankingAccumulator(world.catalog.genres)
    longest = max(len(items) for items in world.data.items)
    for chunk in evaluation_batches(world.data, "test", longest, 256):
        scores = scores_of(chunk.batch, chunk.batch.user_index)
        accumulator.add(scores, chunk.target, chunk.seen)
    metrics = accumulator.result()
    metrics["coverage"] = interest_coverage(world, scores_of, longest)
    return metrics


def model_cell(variant: Variant, world: InterestWorld, seed: int, args: argparse.Namespace) -> Cell:
    """Train ``variant`` on the world with the shared budget; its test metrics and costs."""
    run = variant.train(world.catalog, world.data, seed, args)
    model = run.model.eval()
    metrics = dict(run.test)
    metrics["coverage"] = interest_coverage(
        world, lambda batch, _: model.score_all(batch), int(run.options["max_len"])
    )
    metrics.update(best_epoch=run.best_epoch, epochs_run=run.epochs_run, train_s=run.train_time_s)
    return metrics


def world_config(args: argparse.Namespace, interests: int, seed: int) -> InterestWorldConfig:
    return InterestWorldConfig(
        interests=interests,
        num_users=args.users,
        num_clusters=args.clusters,
        items_per_cluster=args.items_per_cluster,
        length=args.length,
        stay=args.stay,
        cluster_spread=args.spread,
        seed=seed,
    )


Results = dict[tuple[str, int], list[Cell]]  # (model or "oracle", K) -> one cell per seed


def metrics_table(results: Results, names: list[str], ks: list[int]) -> str:
    head = ["K", "model", *(label for label, _ in METRICS), "best/run epochs", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|---:|---" + "|---:" * (len(head) - 2) + "|"]
    for k in ks:
        for name in [*names, ORACLE]:
            cells = results[(name, k)]
            row = [str(k), name, *(mean_std([c[key] for c in cells]) for _, key in METRICS)]
            if name == ORACLE:
                row += ["-", "-"]
            else:
                row.append(", ".join(f"{c['best_epoch']:.0f}/{c['epochs_run']:.0f}" for c in cells))
                row.append(mean_std([c["train_s"] for c in cells], 1))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def gain_table(results: Results, names: list[str], ks: list[int], base: str = "sasrec") -> str:
    """Each model's gain over ``base`` per K, paired by seed; the oracle's headroom beside."""
    others = [n for n in names if n != base]
    head = ["K", *(f"{n} − {base} {label}" for n in others for label, _ in METRICS)]
    head += [f"oracle − {base} {label}" for label, _ in METRICS[:2]]
    lines = ["| " + " | ".join(head) + " |", "|---:" + "|---:" * (len(head) - 1) + "|"]
    for k in ks:
        row = [str(k)]
        for name in [*others, ORACLE]:
            keys = METRICS if name != ORACLE else METRICS[:2]
            for _, key in keys:
                pairs = zip(results[(name, k)], results[(base, k)], strict=True)
                row.append(mean_std([a[key] - b[key] for a, b in pairs], 4))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = InterestWorldConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--interests", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--models",
        nargs="+",
        type=variant_argument,
        default=[Variant("sasrec"), Variant("hymirec")],
        help="model names or variants MODEL:KEY=VALUE,... (as benchmarks.offline_eval)",
    )
    parser.add_argument("--epochs", type=int, default=30, help="at most, per run")
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--users", type=int, default=defaults.num_users)
    parser.add_argument("--clusters", type=int, default=defaults.num_clusters)
    parser.add_argument("--items-per-cluster", type=int, default=defaults.items_per_cluster)
    parser.add_argument("--length", type=int, default=defaults.length)
    parser.add_argument("--stay", type=float, default=defaults.stay)
    parser.add_argument(
        "--spread",
        type=float,
        default=defaults.cluster_spread,
        help="item text noise around the cluster centre (large: text says nothing of clusters)",
    )
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if Variant("sasrec") not in args.models:
        args.models.insert(0, Variant("sasrec"))  # the gains are over SASRec
    labels = [variant.label for variant in args.models]
    torch.set_num_threads(1)
    started, tick = machine_now(), time.perf_counter()
    results: Results = {}
    for k in args.interests:
        for seed in args.seeds:
            world = generate_interest_world(world_config(args, k, seed))
            results.setdefault((ORACLE, k), []).append(oracle_cell(world))
            for variant in args.models:
                cell = model_cell(variant, world, seed, args)
                results.setdefault((variant.label, k), []).append(cell)
                print(
                    f"K={k} seed {seed} {variant.label}: R@50 {cell['recall@50']:.4f} NDCG@10 "
                    f"{cell['ndcg@10']:.4f} cov {cell['coverage']:.3f} ({cell['train_s']:.0f} s, "
                    f"{time.perf_counter() - tick:.0f} s in all)",
                    file=sys.stderr,
                )
    config = world_config(args, 1, 0)
    command = " ".join(["python -m benchmarks.controlled_interests", *(argv or sys.argv[1:])])
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    protocol = PROTOCOL.format(
        users=config.num_users,
        clusters=config.num_clusters,
        per_cluster=config.items_per_cluster,
        exponent=config.popularity_exponent,
        length=config.length,
        stay=config.stay,
        spread=config.cluster_spread,
        text_dim=config.text_dim,
        levels=config.codebook_levels,
        size=config.codebook_size,
        epochs=args.epochs,
        patience=args.patience,
        batch=args.batch_size,
    )
    report = "\n".join(
        [
            f"## Controlled multi-interest data, K = {', '.join(map(str, args.interests))} "
            f"— {when} — {started}",
            "",
            f"Command: `{command}` (seeds {', '.join(map(str, args.seeds))}; "
            f"{time.perf_counter() - tick:.0f} s wall; 1-minute load at the start "
            f"{started.rsplit('load ', 1)[-1]}, at the end {os.getloadavg()[0]:.2f}; "
            "1 torch thread)",
            "",
            protocol,
            "",
            metrics_table(results, labels, args.interests),
            "",
            "Gain over SASRec (paired by seed; positive = better than SASRec):",
            "",
            gain_table(results, labels, args.interests),
            "",
        ]
    )
    print(report)
    append_section(args.results, report)


if __name__ == "__main__":
    main()
