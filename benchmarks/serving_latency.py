"""Recommendation latency and throughput of ``hymirec serve``, beside the same run's HTTP floor and
bare Feast reads.

The stack is ``benchmarks.serving_stack.prepare``'s: its own noida-db broker on a free port, all
943 ML-100K users' histories in the Feast SQLite online store, sasrec, hymirec and popular trained
briefly and published. Once per model, ``hymirec serve`` as a child process serves that model to
everyone, and at concurrency 1, 8 and 32, in this order:

1. the references: the bare Feast read (``FeatureStoreClient.user_histories([U])``, i.e.
   ``get_online_features``) and the service's own read (``serving.feast_rows.HistoryRows``), for
   the same users from ``concurrency`` threads in this process;
2. *after a history change*: every user's online row gets one more item (as the stream worker
   pushes after a click or a play), then ``GET /recommend?user_id=U&k=10`` for the users in turn,
   each once, so the service computes every user's interests (its cache misses);
3. *repeat*: the same requests again; no history changed, so the interests come from the cache
   (a served list does not change a history: only clicks, plays and ratings do);
4. the HTTP floor: ``GET /health/live`` (uvicorn, FastAPI and the client, no work) sent the same
   way.

Requests come from asyncio + httpx with ``concurrency`` in flight; latency is measured in the
client around each request; the service's CPU per request is its /proc CPU time over the pass;
the cache column is the service's own count (``hymirec_interest_cache_lookups_total``). The
issue-19 goals at concurrency 1 (p50 <= 2.5 ms, p99 <= 8 ms, p50 <= 3x the floor's p50) are
printed as verdicts. Client, service, broker and Feast share the machine's cores.

Run from the repository root: ``python -m benchmarks.serving_latency``. Prints a markdown table
and appends it, with the date and the machine, to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.report import append_section, machine
from benchmarks.serving_stack import (
    HistoryChurn,
    K,
    Measured,
    cache_lookups,
    cpu_s,
    feast_reads,
    free_port,
    prepare,
    serve,
)
from core.settings import Settings
from streaming.broker import LocalBroker
from streaming.kafka_io import ensure_topics

__all__ = ["main"]

MODELS = ("hymirec", "sasrec")
CONCURRENCY = (1, 8, 32)
REGIMES = ("after a history change", "repeat")


@dataclass(frozen=True)
class Pass:
    """One pass of API requests and what the service spent on it."""

    api: Measured
    cpu_ms: float  # service CPU per request
    hit_share: float  # interest-cache hits / lookups in the pass


@dataclass(frozen=True)
class Level:
    passes: dict[str, Pass]
    floor: Measured
    feast: Measured
    lean: Measured


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


def measure_pass(url: str, pid: int | None, batch: list[int], concurrency: int) -> Pass:
    hits0, misses0 = cache_lookups(httpx.get(f"{url}/metrics").text)
    cpu0 = cpu_s(pid)
    api = asyncio.run(api_requests(url, batch, concurrency))
    cpu_ms = (cpu_s(pid) - cpu0) * 1000 / len(batch)
    hits1, misses1 = cache_lookups(httpx.get(f"{url}/metrics").text)
    lookups = (hits1 - hits0) + (misses1 - misses0)
    return Pass(api, cpu_ms, (hits1 - hits0) / lookups if lookups else float("nan"))


def run_model(
    settings: Settings, model: str, folder: Path, batch: list[int], churn: HistoryChurn
) -> dict[int, Level]:
    process, url = serve(settings, model, folder)
    levels: dict[int, Level] = {}
    try:
        asyncio.run(api_requests(url, batch[:50], 4))  # warm up
        for concurrency in CONCURRENCY:
            feast = feast_reads(settings, batch, concurrency)
            lean = feast_reads(settings, batch, concurrency, lean=True)
            churn.push(sorted(set(batch)))
            passes = {regime: measure_pass(url, process.pid, batch, concurrency)
                      for regime in REGIMES}  # fmt: skip
            floor = asyncio.run(api_requests(url, batch, concurrency, "/health/live"))
            levels[concurrency] = Level(passes, floor, feast, lean)
            shown = ", ".join(f"{r} p50 {p.api.p50:.2f} ms" for r, p in passes.items())
            print(f"{model} c={concurrency}: {shown}; floor p50 {floor.p50:.2f} ms", flush=True)
    finally:
        process.stop()
    return levels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cache-dir", type=Path, default=Path(".hymirec/cache"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--requests", type=int, default=943, help="per pass (943: each user once)")
    parser.add_argument("--train-ratings", type=int, default=5000)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="hymirec-serving-bench-"))
    broker = LocalBroker(folder / "broker", port=free_port())
    broker.start()
    results: dict[str, dict[int, Level]] = {}
    try:
        settings = Settings(
            data_dir=folder / "data",
            cache_dir=args.cache_dir.resolve(),
            broker_port=broker.port,
            kafka_events_topic=f"events-{uuid.uuid4().hex[:8]}",
            # Latency under queueing at concurrency 32 is the figure here, not shedding.
            serve_max_inflight=64,
        )
        ensure_topics(settings.kafka)
        start = time.perf_counter()
        users = prepare(settings, args.train_ratings)
        prepare_s = time.perf_counter() - start
        churn = HistoryChurn(settings)
        batch = [users[i % len(users)] for i in range(args.requests)]
        for model in MODELS:
            results[model] = run_model(settings, model, folder, batch, churn)
    finally:
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)
    report = render(args, argv, results, prepare_s, load_before)
    print(report)
    append_section(args.results, report)


def goals(results: dict[str, dict[int, Level]]) -> list[str]:
    """Issue 19's goals at concurrency 1, per model and regime."""
    lines = []
    for model, levels in results.items():
        level = levels.get(1)
        if level is None:
            continue
        for regime, p in level.passes.items():
            ratio = p.api.p50 / level.floor.p50
            held = p.api.p50 <= 2.5 and p.api.p99 <= 8.0 and ratio <= 3.0
            lines.append(
                f"- **{'HELD' if held else 'MISSED'}** ({model}, {regime}): p50 {p.api.p50:.2f} "
                f"ms (goal <= 2.5), p99 {p.api.p99:.2f} ms (goal <= 8), p50 = {ratio:.1f}x the "
                f"HTTP floor's {level.floor.p50:.2f} ms (goal <= 3x)."
            )
    return lines


def render(
    args: argparse.Namespace,
    argv: list[str] | None,
    results: dict[str, dict[int, Level]],
    prepare_s: float,
    load_before: float,
) -> str:
    command = " ".join(["python -m benchmarks.serving_latency", *(argv or sys.argv[1:])])
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header = (
        "| model | concurrency | history | API p50 / p99 ms | API req/s | service CPU ms/req | "
        "cache hits | HTTP floor p50 / p99 ms, req/s | p50 / floor p50 | Feast read p50 / p99 "
        "ms | service's read p50 / p99 ms | failures |"
    )
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, levels in results.items():
        for concurrency, level in levels.items():
            floor, feast, lean = level.floor, level.feast, level.lean
            for regime, p in level.passes.items():
                failures = p.api.failures + floor.failures + feast.failures + lean.failures
                lines.append(
                    f"| {model} | {concurrency} | {regime} | {p.api.p50:.2f} / {p.api.p99:.2f} | "
                    f"{p.api.rate:,.0f} | {p.cpu_ms:.2f} | {p.hit_share:.0%} | "
                    f"{floor.p50:.2f} / {floor.p99:.2f}, {floor.rate:,.0f} | "
                    f"{p.api.p50 / floor.p50:.1f} | {feast.p50:.3f} / {feast.p99:.3f} | "
                    f"{lean.p50:.3f} / {lean.p99:.3f} | {failures} |"
                )
    return "\n".join(
        [
            f"## Recommendation service latency — {when} — {machine()}",
            "",
            f"Command: `{command}`",
            "",
            "`hymirec serve` (uvicorn, one process, ranking threads one per CPU, 1 torch thread "
            "each) on its own noida-db broker and a Feast SQLite online store holding all 943 "
            f"ML-100K users' histories (R = 50 ids, P = 1000 codes); models trained on the first "
            f"{args.train_ratings} ratings (set-up {prepare_s:.0f} s). Per level, "
            f"{args.requests} requests `GET /recommend?user_id=U&k={K}` cycling through the users "
            "(all have histories: online read, model, seen-item mask, one exposure record to "
            "Kafka), from asyncio + httpx in another process: first right after every user's "
            "online history got one more item (the service computes their interests: a cache "
            "miss), then again with no history changed (interests from the cache). 'Feast read' is "
            "the bare `FeatureStoreClient.user_histories([U])` (`get_online_features`) and "
            "'service's read' the service's `HistoryRows` read, for the same users from as many "
            "threads, measured just before; the HTTP floor is `GET /health/live` (uvicorn, "
            "FastAPI and the httpx client, no work) sent the same way right after. Latency is "
            "client-side; service CPU per request from /proc; cache hits are the service's own "
            "count. Everything shares the cores; 1-minute load average at start: "
            f"{load_before:.2f}, at the end: {os.getloadavg()[0]:.2f}.",
            "",
            *goals(results),
            "",
            *lines,
            "",
        ]
    )


if __name__ == "__main__":
    main()
