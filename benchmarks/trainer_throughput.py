"""The online trainer alone: samples/s of ``ModelTrainer.learn`` for the served models together.

ML-100K ratings become training samples as the stream worker makes them (``seq`` = position in
the user's history, the last 50 items as ``recent_item_ids``), in two orders: timestamp order
(the replay order, few users per micro-batch) and users interleaved round-robin (about one sample
per user per micro-batch, the most users a micro-batch can hold). Every model learns every
micro-batch in process, no broker, as ``model.training.stream_loop`` drives them; the figure is
samples
learned by all models together per second of wall time. Two settings: a quiet machine with two
torch threads, and one torch thread beside two busy CPU-burning processes (the demo's neighbours).
Each run starts fresh models, seeded, so the settings learn the same samples the same way.

    .venv/bin/python -m benchmarks.trainer_throughput [--samples 20000] [--models ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import append_section, machine
from core.settings import Settings
from model.base import CatalogInfo
from model.data import build_catalog, load_movielens_sequences
from model.training.online import PREQUENTIAL_SAMPLE, ModelTrainer, StreamRecord, TrainerOptions
from streaming.schema import TrainingSample
from tests.conftest import EMBEDDING_CACHE

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ORDERS = ("timestamp", "interleaved")


@dataclass(frozen=True)
class Run:
    order: str
    setting: str  # "quiet" or "contended"
    threads: int
    samples: int
    wall_s: float
    per_model_ms: dict[str, float]  # mean ms per micro-batch, by model
    metric: dict[str, tuple[float, float]]  # model -> (prequential recall@50, examples ranked)
    load: tuple[str, str]  # 1-minute load average at the start and at the end of the run

    @property
    def rate(self) -> float:
        return self.samples / self.wall_s


def stream(order: str, count: int) -> list[StreamRecord]:
    """The first ``count`` samples of ML-100K in ``order``; item index == ML-100K item id."""
    data = load_movielens_sequences()
    assert np.array_equal(data.item_ids, np.arange(1, data.num_items + 1))
    rows: list[tuple[int, int, int]] = []  # (user row, seq, sort key)
    for row, (items, stamps) in enumerate(zip(data.items, data.timestamps_s, strict=True)):
        for seq in range(len(items)):
            rows.append((row, seq, int(stamps[seq])))
    if order == "timestamp":
        rows.sort(key=lambda r: r[2])  # stable: a user's own samples stay in order
    else:
        rows.sort(key=lambda r: (r[1], r[0]))  # round-robin: every user's n-th, then the n+1-th
    now_ms = int(time.time() * 1000)
    records = []
    for offset, (row, seq, ts_s) in enumerate(rows[:count]):
        items = data.items[row]
        sample = TrainingSample(
            event_id=uuid.uuid4(),
            user_id=int(data.user_ids[row]),
            item_id=int(items[seq]),
            event_type="rating",
            ts_ms=ts_s * 1000,
            seq=seq,
            recent_item_ids=[int(i) for i in items[max(0, seq - 50) : seq]],
            ingest_ts_ms=now_ms,
        )
        records.append(StreamRecord(0, offset, sample, now_ms))
    return records


@contextmanager
def busy_neighbours(count: int) -> Iterator[None]:
    """``count`` processes that each burn a core until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let them get going
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def learn_all(
    records: list[StreamRecord],
    catalog: CatalogInfo,
    models: list[str],
    options: TrainerOptions,
    batch: int,
) -> tuple[float, dict[str, float], dict[str, tuple[float, float]]]:
    """Wall seconds for every model to learn ``records`` in micro-batches of ``batch``."""
    trainers = [ModelTrainer(name, catalog, options) for name in models]
    spent = dict.fromkeys(models, 0.0)
    start = time.perf_counter()
    for first in range(0, len(records), batch):
        chunk = records[first : first + batch]
        for trainer in trainers:
            began = time.perf_counter()
            trainer.learn(chunk)
            spent[trainer.name] += time.perf_counter() - began
    wall = time.perf_counter() - start
    batches = -(-len(records) // batch)
    metric = {}
    for trainer in trainers:
        assert trainer.samples_seen == len(records), trainer.name
        scores = trainer.metrics()
        metric[trainer.name] = (
            scores.get("prequential_recall@50", float("nan")),
            scores.get("prequential_examples", 0.0),
        )
    return wall, {n: 1000 * s / batches for n, s in spent.items()}, metric


def run(
    order: str,
    setting: str,
    records: list[StreamRecord],
    catalog: CatalogInfo,
    models: list[str],
    options: TrainerOptions,
    batch: int,
) -> Run:
    threads = 2 if setting == "quiet" else 1
    torch.set_num_threads(threads)
    load_start = load_average()
    if setting == "quiet":
        wall, per_model, metric = learn_all(records, catalog, models, options, batch)
    else:
        with busy_neighbours(2):
            wall, per_model, metric = learn_all(records, catalog, models, options, batch)
    load = (load_start, load_average())
    return Run(order, setting, threads, len(records), wall, per_model, metric, load)


def load_average() -> str:
    """The 1-minute load average, as /proc/loadavg has it."""
    return Path("/proc/loadavg").read_text().split()[0]


def row(result: Run, models: list[str]) -> str:
    per_model = " | ".join(f"{result.per_model_ms[m]:.0f}" for m in models)
    metric = " | ".join(f"{result.metric[m][0]:.3f} ({result.metric[m][1]:,.0f})" for m in models)
    return (
        f"| {result.order} | {result.setting} | {result.threads} | {result.samples:,} | "
        f"{result.wall_s:.1f} | {result.rate:,.0f} | {per_model} | {metric} | "
        f"{result.load[0]} -> {result.load[1]} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="sasrec,hymirec,popular")
    parser.add_argument("--samples", type=int, default=20_000, help="samples per run")
    parser.add_argument("--batch", type=int, default=256, help="records per micro-batch")
    parser.add_argument("--orders", default=",".join(ORDERS))
    parser.add_argument("--settings", default="quiet,contended")
    parser.add_argument(
        "--prequential-sample",
        type=int,
        default=PREQUENTIAL_SAMPLE,
        help="probes ranked per micro-batch, at most (0: every probe)",
    )
    parser.add_argument(
        "--reference-ranking",
        action="store_true",
        help="rank with the plain reference path (one forward, padded to the longest probe)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    options = TrainerOptions(
        prequential_sample=args.prequential_sample or None,
        prequential_bucket=None if args.reference_ranking else TrainerOptions.prequential_bucket,
    )
    with tempfile.TemporaryDirectory(prefix="hymirec-trainer-bench-") as folder:
        catalog = build_catalog(Settings(data_dir=Path(folder), cache_dir=EMBEDDING_CACHE))
    rows = []
    for order in orders:
        records = stream(order, args.samples)
        torch.set_num_threads(2)
        learn_all(records[: args.batch], catalog, models, options, args.batch)  # warm-up
        for setting in settings:
            result = run(order, setting, records, catalog, models, options, args.batch)
            rows.append(row(result, models))
            print(rows[-1], flush=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    ranking = (
        "every probe"
        if options.prequential_sample is None
        else f"at most {options.prequential_sample} probes per micro-batch"
    )
    path = (
        "the plain reference path (one forward, padded to the longest probe)"
        if options.prequential_bucket is None
        else f"length buckets (1-{options.prequential_bucket} items, then doubling)"
    )
    command = " ".join(["python -m benchmarks.trainer_throughput", *sys.argv[1:]])
    report = (
        f"## Online trainer throughput ({stamp})\n\n"
        f"Machine: {machine()}; device cpu (torch {torch.__version__}); `{command}`.\n\n"
        f"`ModelTrainer.learn` in process (no broker) for {', '.join(models)} together on the "
        f"first {args.samples:,} ML-100K samples in each order, micro-batches of {args.batch}, "
        f"fresh seeded models per run; test-then-train ranking of {ranking}, by {path}. "
        "Quiet: 2 torch threads; contended: 1 torch thread beside two "
        "`python -c 'while True: pass'` processes. ms/batch: mean time of one model's `learn` "
        "per micro-batch; preq. recall@50: the prequential estimate over the whole run, with "
        "the probes it ranked.\n\n"
        "| order | setting | torch threads | samples | wall s | samples/s | "
        + " | ".join(f"{m} ms/batch" for m in models)
        + " | "
        + " | ".join(f"{m} preq. recall@50 (ranked)" for m in models)
        + " | load 1-min (start -> end) |\n|---|---|---:|---:|---:|---:|"
        + "---:|" * (2 * len(models))
        + "---|\n"
        + "\n".join(rows)
        + "\n"
    )
    print(report)
    append_section(args.results, report)


if __name__ == "__main__":
    main()
