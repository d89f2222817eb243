"""Recommendation latency and throughput of ``hymirec serve``, next to bare Feast online reads.

Starts its own noida-db broker on a free port in a temp data dir (item embeddings come from the
repo's ``.hymirec/cache``), builds the item features, pushes every ML-100K user's history to the
Feast online store (SQLite) in the row shape the stream worker writes, trains sasrec, hymirec and
popular briefly on the first ratings and publishes them. Then, once per model, it starts
``hymirec serve`` as a child process with an experiments file that serves that model to everyone
(``default_model``, no experiments), and at concurrency 1, 8 and 32:

- the API: ``GET /recommend?user_id=U&k=10`` for the 943 ML-100K users in turn (each has a
  history, so every request reads Feast, runs the model, masks seen items and logs 10
  impressions), from asyncio + httpx with ``concurrency`` requests in flight; latency measured
  in the client (perf_counter) around each request, requests/s over the whole batch;
- bare Feast reads: ``FeatureStoreClient.user_histories([U])`` (the call the service makes) for
  the same users from ``concurrency`` threads in this process, measured just before.

The figure is the ratio API / Feast: what routing, the model, the exposure log and HTTP add to
the feature read. Client, server, broker and Feast share the machine's cores.

Run from the repository root: ``python -m benchmarks.serving_latency``. Prints a markdown table
and appends it, with the date and the machine, to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.report import append_section, machine
from features.item_features import build_item_features
from features.store import FeatureStoreClient, UserHistoryFeatures
from hymirec.errors import HymirecError
from hymirec.movielens import load_ratings, replay_histories
from hymirec.processes import ServiceProcess
from hymirec.settings import Settings
from model.checkpoint_registry import CheckpointRegistry
from model.data import build_catalog
from model.trainer import ModelTrainer, StreamRecord, TrainerOptions
from streaming.broker import LocalBroker
from streaming.kafka_io import ensure_topics
from streaming.schema import TrainingSample

MODELS = ("hymirec", "sasrec")
CONCURRENCY = (1, 8, 32)
K = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Measured:
    latencies_ms: np.ndarray
    wall_s: float
    failures: int

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latencies_ms, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies_ms, 99))

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.wall_s


def prepare(settings: Settings, train_ratings: int) -> list[int]:
    """Item features, every user's online history, and published model versions."""
    built = build_item_features(settings)
    histories = replay_histories(load_ratings())
    rows = []
    for user, items in histories.items():  # as streaming/app.py's _feature_row builds them
        kept = items[-settings.long_len :]
        rows.append(
            UserHistoryFeatures(
                user_id=user,
                recent_item_ids=[int(i) for i in kept[-settings.recent_len :]],
                long_codes=built.codebook.pack(built.table.lookup(kept)),
                history_len=len(items),
                last_ts_ms=0,
                last_offset=len(items) - 1,
                codebook_version=built.codebook.version,
            )
        )
    store = FeatureStoreClient(settings)
    for start in range(0, len(rows), 200):
        store.push_user_histories(rows[start : start + 200])
    catalog = build_catalog(settings)
    registry = CheckpointRegistry(settings.registry_dir)
    seqs: dict[int, list[int]] = {}
    records = []
    for offset, row in enumerate(load_ratings().head(train_ratings).itertuples()):
        items_so_far = seqs.setdefault(int(row.user_id), [])
        sample = TrainingSample(
            event_id=uuid.uuid4(),
            user_id=int(row.user_id),
            item_id=int(row.item_id),
            event_type="rating",
            ts_ms=int(row.ts_ms),
            seq=len(items_so_far),
            recent_item_ids=items_so_far[-settings.recent_len :],
        )
        items_so_far.append(int(row.item_id))
        records.append(StreamRecord(0, offset, sample, int(time.time() * 1000)))
    for name in (*MODELS, "popular"):
        trainer = ModelTrainer(name, catalog, TrainerOptions())
        trainer.learn(records)
        trainer.publish(registry, "training", keep=2)
    return sorted(histories)


def feast_reads(store: FeatureStoreClient, users: list[int], concurrency: int) -> Measured:
    lock = threading.Lock()
    latencies: list[float] = []
    failures = 0

    def read(user: int) -> None:
        nonlocal failures
        start = time.perf_counter()
        try:
            row = store.user_histories([user])[user]
        except HymirecError:
            row = None
        elapsed = (time.perf_counter() - start) * 1000
        with lock:
            latencies.append(elapsed)
            failures += row is None

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(read, users))
    return Measured(np.asarray(latencies), time.perf_counter() - start, failures)


async def api_requests(
    url: str, users: list[int], concurrency: int, path: str = "/recommend"
) -> Measured:
    latencies: list[float] = []
    failures = 0
    queue = list(reversed(users))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal failures
            while queue:
                user = queue.pop()
                start = time.perf_counter()
                if path == "/recommend":
                    response = await client.get(path, params={"user_id": user, "k": K})
                    ok = response.status_code == 200 and len(response.json()["items"]) == K
                else:
                    response = await client.get(path)
                    ok = response.status_code == 200 and bool(response.json())
                latencies.append((time.perf_counter() - start) * 1000)
                failures += not ok

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return Measured(np.asarray(latencies), wall, failures)


def serve(settings: Settings, model: str, folder: Path) -> tuple[ServiceProcess, str]:
    experiments = folder / f"experiments-{model}.yaml"
    experiments.write_text(f"default_model: {model}\n")
    service_settings = settings.model_copy(
        update={"experiments_file": experiments, "serve_port": free_port()}
    )
    process = ServiceProcess(f"serve-{model}", ["serve"], service_settings).start()
    deadline = time.monotonic() + 180
    url = f"http://127.0.0.1:{service_settings.serve_port}"
    while True:
        try:
            if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if not process.alive() or time.monotonic() > deadline:
            process.stop()
            raise HymirecError(f"hymirec serve did not become ready:\n{process.tail()}")
        time.sleep(0.2)
    return process, url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cache-dir", type=Path, default=Path(".hymirec/cache"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--requests", type=int, default=943, help="per concurrency level")
    parser.add_argument("--train-ratings", type=int, default=5000)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="hymirec-serving-bench-"))
    broker = LocalBroker(folder / "broker", port=free_port())
    broker.start()
    results: dict[tuple[str, int], tuple[Measured, Measured, Measured]] = {}
    try:
        settings = Settings(
            data_dir=folder / "data",
            cache_dir=args.cache_dir.resolve(),
            broker_port=broker.port,
            events_topic=f"events-{uuid.uuid4().hex[:8]}",
            # Latency under queueing at concurrency 32 is the figure here, not shedding.
            serve_max_inflight=64,
        )
        ensure_topics(settings)
        start = time.perf_counter()
        users = prepare(settings, args.train_ratings)
        prepare_s = time.perf_counter() - start
        batch = [users[i % len(users)] for i in range(args.requests)]
        store = FeatureStoreClient(settings)
        feast_reads(store, users[:50], 1)  # open the store, warm the page cache
        for model in MODELS:
            process, url = serve(settings, model, folder)
            try:
                asyncio.run(api_requests(url, users[:50], 4))  # warm up
                for concurrency in CONCURRENCY:
                    feast = feast_reads(store, batch, concurrency)
                    api = asyncio.run(api_requests(url, batch, concurrency))
                    floor = asyncio.run(api_requests(url, batch, concurrency, "/health/live"))
                    results[(model, concurrency)] = (api, feast, floor)
                    print(f"{model} c={concurrency}: api p50 {api.p50:.2f} ms, feast p50 "
                          f"{feast.p50:.2f} ms", flush=True)  # fmt: skip
            finally:
                process.stop()
    finally:
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)
    report = render(args, argv, results, prepare_s, load_before)
    print(report)
    append_section(args.results, report)


def render(
    args: argparse.Namespace,
    argv: list[str] | None,
    results: dict[tuple[str, int], tuple[Measured, Measured, Measured]],
    prepare_s: float,
    load_before: float,
) -> str:
    command = " ".join(["python -m benchmarks.serving_latency", *(argv or sys.argv[1:])])
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header = (
        "| model | concurrency | API p50 ms | API p99 ms | API req/s | Feast p50 ms | "
        "Feast p99 ms | Feast reads/s | p50 ratio | p99 ratio | throughput ratio | "
        "HTTP floor p50 / p99 ms, req/s | failures |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, concurrency), (api, feast, floor) in results.items():
        lines.append(
            f"| {model} | {concurrency} | {api.p50:.2f} | {api.p99:.2f} | {api.rate:,.0f} | "
            f"{feast.p50:.2f} | {feast.p99:.2f} | {feast.rate:,.0f} | {api.p50 / feast.p50:.1f} | "
            f"{api.p99 / feast.p99:.1f} | {feast.rate / api.rate:.1f} | "
            f"{floor.p50:.2f} / {floor.p99:.2f}, {floor.rate:,.0f} | "
            f"{api.failures + feast.failures + floor.failures} |"
        )
    return "\n".join(
        [
            f"## Recommendation service latency — {when} — {machine()}",
            "",
            f"Command: `{command}`",
            "",
            f"`hymirec serve` (uvicorn, one process, ranking on a thread pool of 2 threads per "
            f"core, 1 torch thread each) on its own noida-db broker and a Feast SQLite online "
            f"store holding all 943 ML-100K users' histories (R = 50 ids, P = 1000 codes); "
            f"models trained on the first {args.train_ratings} ratings (set-up {prepare_s:.0f} s). "
            f"Each level sends {args.requests} requests `GET /recommend?user_id=U&k={K}` cycling "
            "through the users (all have histories: Feast read, model, seen-item mask, 10 "
            "impressions to Kafka), from asyncio + httpx in another process; the bare Feast read "
            "is `FeatureStoreClient.user_histories([U])` for the same users from as many threads, "
            "measured just before. Latency is client-side; ratios are API / Feast (throughput: "
            "Feast / API). The HTTP floor is `GET /health/live` (uvicorn, FastAPI and the httpx "
            "client, no work) sent the same way right after. Everything shares the cores; "
            "1-minute load average at start: "
            f"{load_before:.2f}, at the end: {os.getloadavg()[0]:.2f}.",
            "",
            *lines,
            "",
        ]
    )


if __name__ == "__main__":
    main()
