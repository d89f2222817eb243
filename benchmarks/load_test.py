"""Sustained load on ``hymirec serve``: p99 at capacity, 503 shedding beyond it, flat memory.

Issue 8: at its measured capacity for 5 minutes the service keeps p99 within 2x its unloaded
value and sheds excess load with 503s rather than queueing without bound; memory stays flat.

The stack is ``benchmarks.serving_stack``'s (``prepare`` and ``serve``): a noida-db broker, all
943 ML-100K users' histories in the Feast SQLite online store, models trained briefly and
published, and ``hymirec serve`` as a child process serving one model to everyone. A thread
samples the service's VmRSS from ``/proc/<pid>/status`` every second. The service caches a user's
interests until their history changes: with ``--changed-share 1`` (the default) a churn process
gives each user's online history one more item before each of their requests, as the stream
worker would after a click, so no request is served from that cache; ``0`` leaves histories
alone. Same-run references are measured first: the bare Feast read and the service's own online
read (``serving_stack.feast_reads``, one at a time, in this process). Then:

1. unloaded: closed loop, one request at a time, ``--baseline-s``; then the HTTP floor
   (``GET /health/live``) the same way for a third of that;
2. capacity: open-loop steps of ``--step-s`` at ``--start-rate``, +``--rate-step``, ... until a
   step has p99 > 2x unloaded p99, a 503 or an error; then one step half-way back. Capacity is the
   highest passing rate. Steps last a minute: near saturation the service's queue builds up for
   a few hundred ms now and then, and 15 s steps could pass between two such episodes (100 req/s
   passed 15 s steps here and then missed the limit over 5 minutes);
3. sustained: open loop at that rate for ``--minutes``; per-minute p50/p99, 503s, errors, RSS;
4. overload: open loop at ``--overload-factor`` x capacity for ``--overload-s``.

Open loop means requests are issued on a fixed schedule (i / rate) as tasks that do not wait for
earlier replies, so a slow service does not slow the load. Latency is from the scheduled send
time to the reply (it includes any lag of the client itself, which is also reported). Client,
service and broker share the machine's cores; their CPU use per phase is in the table.

Run from the repository root: ``python -m benchmarks.load_test [--minutes 5]``. Prints markdown
and appends it, with the date and the machine, to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch

from benchmarks.load_results import (
    BAD_BODY,
    MAX_CONNECTIONS,
    OTHER_503,
    SHED,
    TIMEOUT,
    TRANSPORT,
    Phase,
    Run,
    passes,
    render,
)
from benchmarks.report import append_section, machine
from benchmarks.serving_stack import (
    K,
    Measured,
    cache_lookups,
    churn_ahead,
    cpu_s,
    feast_reads,
    free_port,
    prepare,
    serve,
)
from core.errors import HymirecError
from core.settings import Settings
from serving.app import ranking_threads
from streaming.broker import LocalBroker
from streaming.kafka_io import ensure_topics

REQUEST_TIMEOUT_S = 30.0
CHURN_INTERVAL_S = 0.25  # the churn process pushes the rows due this often


def cpu_pressure_s() -> float:
    """Seconds during which some runnable task waited for a CPU (PSI, /proc/pressure/cpu)."""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(some.rsplit("total=", 1)[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return float("nan")


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` on ``cpus`` (threads it starts later inherit the set)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def split_cpus(pin_arg: str) -> tuple[set[int], set[int]] | None:
    """(service CPUs, client and broker CPUs), or None when not pinning."""
    allowed = sorted(os.sched_getaffinity(0))
    if pin_arg == "off" or (pin_arg == "auto" and len(allowed) < 2):
        return None
    if len(allowed) < 2:
        raise HymirecError(f"--pin on needs at least 2 CPUs; this process may use {allowed}")
    half = len(allowed) // 2
    return set(allowed[:half]), set(allowed[half:])


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class RssSampler(threading.Thread):
    """VmRSS of one process every ``interval_s``, as (perf_counter, MB) pairs."""

    def __init__(self, pid: int, interval_s: float = 1.0) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, float]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            value = rss_mb(self.pid)
            if value is not None:
                self.samples.append((time.perf_counter(), value))
            self.stopped.wait(self.interval_s)

    def between(self, start: float, end: float) -> np.ndarray:
        """(n, 2) array of [seconds since start, MB] for the samples in [start, end]."""
        rows = [(t - start, mb) for t, mb in self.samples if start <= t <= end]
        return np.asarray(rows, dtype=float).reshape(-1, 2)


class LoadClient:
    """aiohttp on ``/recommend`` (or ``path``) cycling through the users; records into a Phase.

    Not httpx.AsyncClient: in open loop here it spent several ms of client CPU per request and
    its own queue, not the service's, set the latency beyond ~100 req/s (aiohttp: ~0.5 ms).
    """

    def __init__(
        self, url: str, users: list[int], pids: dict[str, int | None], cursor: Any = None
    ) -> None:
        self.session = aiohttp.ClientSession(
            base_url=url,
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
        self.users, self.pids, self.next_user = users, pids, 0
        self.cursor = cursor  # shared with the churn process: requests sent so far

    async def shoot(self, phase: Phase, scheduled: float, path: str = "/recommend") -> None:
        params: dict[str, int] = {}
        if path == "/recommend":
            params = {"user_id": self.users[self.next_user % len(self.users)], "k": K}
            self.next_user += 1
            if self.cursor is not None:
                self.cursor.value = self.next_user
        sent = time.perf_counter()
        try:
            async with self.session.get(path, params=params) as response:
                status = response.status
                body = await response.json()
                if status == 200 and path == "/recommend" and len(body["items"]) != K:
                    status = BAD_BODY
                elif status == SHED:
                    if not str(body.get("detail", "")).startswith("overloaded"):
                        status = OTHER_503  # e.g. the feature store: an error, not shedding
                    elif "Retry-After" not in response.headers:
                        phase.missing_retry_after += 1
        except TimeoutError:
            status = TIMEOUT
        except (aiohttp.ClientError, ValueError):
            status = TRANSPORT
        phase.rows.append((scheduled, sent, time.perf_counter(), status))

    async def _usage(self) -> dict[str, float]:
        async with self.session.get("/metrics") as response:
            hits, misses = cache_lookups(await response.text())
        usage = {name: cpu_s(pid) for name, pid in self.pids.items()}
        usage |= {"client": time.process_time(), "pressure": cpu_pressure_s()}
        return usage | {"hits": hits, "misses": misses, "wall": time.perf_counter()}

    async def _finish(self, phase: Phase, before: dict[str, float]) -> Phase:
        phase.end = time.perf_counter()
        after = await self._usage()
        hits, misses = (after.pop(k) - before.pop(k) for k in ("hits", "misses"))
        phase.cache_hits = hits / (hits + misses) if hits + misses else float("nan")
        wall = after.pop("wall") - before.pop("wall")
        phase.cpu = {name: 100 * (after[name] - before[name]) / wall for name in after}
        return phase

    async def _watch_loop(self, phase: Phase, every_s: float = 0.005) -> None:
        """Record the client's longest event-loop stall: how late a short sleep wakes up."""
        while True:
            due = time.perf_counter() + every_s
            await asyncio.sleep(every_s)
            phase.loop_stall_ms = max(phase.loop_stall_ms, (time.perf_counter() - due) * 1000)

    async def closed_loop(self, name: str, duration_s: float, path: str = "/recommend") -> Phase:
        before = await self._usage()
        phase = Phase(name, None, time.perf_counter())
        watch = asyncio.create_task(self._watch_loop(phase))
        while time.perf_counter() - phase.start < duration_s:
            await self.shoot(phase, time.perf_counter(), path)
        watch.cancel()
        return await self._finish(phase, before)

    async def open_loop(
        self, name: str, rate: float, duration_s: float, path: str = "/recommend"
    ) -> Phase:
        """Request i is due at start + i / rate and is sent then, whatever is still in flight."""
        before = await self._usage()
        phase = Phase(name, rate, time.perf_counter())
        watch = asyncio.create_task(self._watch_loop(phase))
        pending: set[asyncio.Task[None]] = set()  # only the requests in flight stay referenced
        for i in range(max(1, round(rate * duration_s))):
            due = phase.start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            task = asyncio.create_task(self.shoot(phase, due, path))
            pending.add(task)
            task.add_done_callback(pending.discard)
        while pending:
            await asyncio.gather(*pending)
        watch.cancel()
        return await self._finish(phase, before)

    async def shed_total(self) -> float:
        """The service's own count of shed requests (``hymirec_recommend_shed_total``)."""
        async with self.session.get("/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith("hymirec_recommend_shed_total"):
                return float(line.split()[-1])
        return float("nan")


@dataclass
class Stack:
    """What ``drive`` runs against: the service, its pids, and the same-run references."""

    url: str
    users: list[int]
    pids: dict[str, int | None]
    sampler: RssSampler
    max_inflight: int
    feast: Measured
    lean: Measured
    cursor: Any = None


async def drive(stack: Stack, args: argparse.Namespace) -> Run:
    load = LoadClient(stack.url, stack.users, stack.pids, stack.cursor)
    try:
        await load.closed_loop("warm-up", 5)
        baseline = await load.closed_loop("unloaded (concurrency 1)", args.baseline_s)
        floor0 = await load.closed_loop(
            "HTTP floor unloaded: /health/live", args.baseline_s / 3, "/health/live"
        )
        limit_ms = 2 * baseline.p(99)
        print(f"unloaded p50 {baseline.p(50):.2f} ms, p99 {baseline.p(99):.2f} ms; HTTP floor "
              f"p50 {floor0.p(50):.2f} ms", flush=True)  # fmt: skip
        steps: list[Phase] = []
        capacity, rate = 0.0, args.start_rate

        async def step(rate: float) -> bool:
            steps.append(await load.open_loop(f"step {rate:g}/s", rate, args.step_s))
            ok = passes(steps[-1], limit_ms)
            last = steps[-1]
            print(f"{last.name}: p99 {last.p(99):.1f} ms, 503 {last.count(SHED)}, errors "
                  f"{last.errors}, client stall {last.loop_stall_ms:.0f} ms: "
                  f"{'pass' if ok else 'fail'}", flush=True)  # fmt: skip
            return ok

        while rate <= args.max_rate:
            if not await step(rate):
                break
            capacity, rate = rate, rate + args.rate_step
        if capacity == 0:
            raise HymirecError(
                f"even {args.start_rate:g} req/s misses p99 <= {limit_ms:.1f} ms (2x unloaded) "
                "or sheds; pass a lower --start-rate"
            )
        if rate <= args.max_rate:  # one step half-way between the last pass and the first fail
            half = capacity + args.rate_step / 2
            capacity = half if await step(half) else capacity
        print(f"capacity {capacity:g} req/s; sustained for {args.minutes:g} min", flush=True)
        shed: dict[str, float] = {"before": await load.shed_total()}
        sustained = await load.open_loop("sustained", capacity, args.minutes * 60)
        shed["after sustained"] = await load.shed_total()
        rate = args.overload_factor * capacity
        overload = await load.open_loop("overload", rate, args.overload_s)
        shed["after overload"] = await load.shed_total()
        floor = await load.open_loop("HTTP floor: /health/live", rate, 10, "/health/live")
    finally:
        await load.session.close()
    for phase in (baseline, floor0, *steps, sustained, overload, floor):
        phase.rss = stack.sampler.between(phase.start, phase.end)
    return Run(baseline, steps, capacity, sustained, overload, floor, shed, stack.max_inflight,
               floor0, stack.feast, stack.lean)  # fmt: skip


def start_churn(
    settings: Settings, users: list[int], share: float
) -> tuple[BaseProcess, Any, Any] | None:
    """The churn process (``serving_stack.churn_ahead``), started and ready: (process, the
    shared request cursor, its stop event); None when no history is to change."""
    if share <= 0:
        return None
    context = multiprocessing.get_context("spawn")
    cursor, ready, stop = context.Value("q", 0, lock=False), context.Event(), context.Event()
    lead = max(1, min(len(users) // 2, 500))
    process = context.Process(
        target=churn_ahead,
        args=(settings, users, cursor, share, ready, stop, lead, CHURN_INTERVAL_S),
        name="history-churn",
        daemon=True,
    )
    process.start()
    if not ready.wait(120):
        process.terminate()
        raise HymirecError("the history churn process did not start in 120 s")
    return process, cursor, stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=5.0, help="sustained run length")
    parser.add_argument("--baseline-s", type=float, default=30.0)
    parser.add_argument("--step-s", type=float, default=60.0, help="each capacity step")
    parser.add_argument("--start-rate", type=float, default=20.0, help="req/s")
    parser.add_argument("--rate-step", type=float, default=20.0, help="req/s")
    parser.add_argument("--max-rate", type=float, default=600.0, help="req/s")
    parser.add_argument("--overload-factor", type=float, default=3.0)
    parser.add_argument("--overload-s", type=float, default=45.0)
    parser.add_argument("--model", default="hymirec")
    parser.add_argument(
        "--changed-share",
        type=float,
        default=1.0,
        help="share of requests whose user's history changed since their last request (1: none "
        "is served from the interest cache; 0: histories never change)",
    )
    parser.add_argument("--train-ratings", type=int, default=5000)
    parser.add_argument("--cache-dir", type=Path, default=Path(".hymirec/cache"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument(
        "--pin",
        choices=("auto", "on", "off"),
        default="auto",
        help="service on the first half of the CPUs, client and broker on the rest (auto: if 2+)",
    )
    args = parser.parse_args(argv)
    for name in ("baseline_s", "step_s", "start_rate", "rate_step", "overload_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0; got {getattr(args, name)}")
    if args.minutes < 0.1:
        parser.error(f"--minutes must be >= 0.1 (RSS is sampled each second); got {args.minutes}")
    if args.overload_factor <= 1:
        parser.error(f"--overload-factor must be > 1; got {args.overload_factor}")
    if not 0 <= args.changed_share <= 1:
        parser.error(f"--changed-share must be in [0, 1]; got {args.changed_share}")
    load_before = os.getloadavg()[0]
    args.host = machine()  # before this process is pinned to part of the CPUs
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="hymirec-load-test-"))
    broker = LocalBroker(folder / "broker", port=free_port())
    try:
        broker_pid = broker.start().pid
        settings = Settings(
            data_dir=folder / "data",
            cache_dir=args.cache_dir.resolve(),
            broker_port=broker.port,
            kafka_events_topic=f"events-{uuid.uuid4().hex[:8]}",
        )
        ensure_topics(settings.kafka)
        start = time.perf_counter()
        users = prepare(settings, args.train_ratings)
        prepare_s = time.perf_counter() - start
        cpus = split_cpus(args.pin)
        if cpus is not None:  # the service inherits its CPUs (and sizes its threads by them)
            os.sched_setaffinity(0, cpus[0])
        args.threads = ranking_threads(settings.serve)  # what the service computes, on its CPUs
        process, url = serve(settings, args.model, folder)
        assert process.pid is not None  # started
        if cpus is not None and broker_pid is not None:
            pin(process.pid, cpus[0])
            pin(broker_pid, cpus[1])
            pin(os.getpid(), cpus[1])
        args.cpus = cpus
        feast, lean = feast_reads(settings, users, 1), feast_reads(settings, users, 1, lean=True)
        churn = start_churn(settings, users, args.changed_share)  # on the client's CPUs
        sampler = RssSampler(process.pid)
        sampler.start()
        # The set-up left millions of objects in this process (data, training); a full
        # collection over them stalled the client's event loop for 0.3-0.6 s in the middle of
        # a phase, sending a burst that the service then had to shed. Freeze them.
        gc.collect()
        gc.freeze()
        try:
            pids = {"service": process.pid, "broker": broker_pid}
            if churn is not None:
                pids["churn"] = churn[0].pid
            stack = Stack(url, users, pids, sampler, settings.serve.max_inflight, feast, lean,
                          churn[1] if churn is not None else None)  # fmt: skip
            run = asyncio.run(drive(stack, args))
        finally:
            sampler.stopped.set()
            if churn is not None:
                churn[2].set()
                churn[0].join(timeout=30)
            process.stop()
    finally:
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)
    report = render(run, args, argv, (load_before, os.getloadavg()[0]), prepare_s)
    print(report)
    append_section(args.results, report)


if __name__ == "__main__":
    main()
