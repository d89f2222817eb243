"""Sustained load on ``hymirec serve``: p99 at capacity, 503 shedding beyond it, flat memory.

Issue 8: at its measured capacity for 5 minutes the service keeps p99 within 2x its unloaded
value and sheds excess load with 503s rather than queueing without bound; memory stays flat.

The stack is the one ``benchmarks.serving_latency`` builds (its ``prepare`` and ``serve``): a
noida-db broker, all 943 ML-100K users' histories in the Feast SQLite online store, models
trained briefly and published, and ``hymirec serve`` as a child process serving one model to
everyone. A thread samples the service's VmRSS from ``/proc/<pid>/status`` every second. Then:

1. unloaded: closed loop, one request at a time, ``--baseline-s``;
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
import datetime as dt
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import torch

from benchmarks.report import append_section, machine
from benchmarks.serving_latency import K, free_port, prepare, serve
from hymirec.errors import HymirecError
from hymirec.settings import Settings
from serving.app import ranking_threads
from streaming.broker import LocalBroker
from streaming.kafka_io import ensure_topics

TIMEOUT, TRANSPORT, BAD_BODY, OTHER_503 = -1, -2, -3, -4  # client-side outcomes besides HTTP codes
SHED = 503
MAX_CONNECTIONS = 1024
REQUEST_TIMEOUT_S = 30.0
RSS_SLOPE_LIMIT_MB_MIN = 1.0  # "flat": least-squares RSS slope at most this
RSS_OVERLOAD_GROWTH = 0.02  # overload: max RSS at most 2% above the phase's first sample
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_S


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


@dataclass
class Phase:
    """Every request of one phase: scheduled and actual send time, reply time, outcome."""

    name: str
    rate: float | None  # offered req/s; None for the closed loop
    start: float
    end: float = 0.0
    rows: list[tuple[float, float, float, int]] = field(default_factory=list)
    missing_retry_after: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core over the phase
    loop_stall_ms: float = 0.0  # the client's longest event-loop stall in the phase
    rss: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    def array(self) -> np.ndarray:
        return np.asarray(self.rows, dtype=float).reshape(-1, 4)

    def latency_ms(
        self, status: int, since_s: float = 0.0, until_s: float = np.inf, from_send: bool = False
    ) -> np.ndarray:
        """Reply time minus scheduled time (or actual send time: without the client's lag)."""
        a = self.array()
        rel = a[:, 0] - self.start
        keep = (a[:, 3] == status) & (rel >= since_s) & (rel < until_s)
        latency: np.ndarray = (a[keep, 2] - a[keep, 1 if from_send else 0]) * 1000
        return latency

    def count(self, status: int) -> int:
        return int((self.array()[:, 3] == status).sum())

    @property
    def errors(self) -> int:
        return len(self.rows) - self.count(200) - self.count(SHED)

    def p(
        self,
        q: float,
        status: int = 200,
        since_s: float = 0.0,
        until_s: float = np.inf,
        from_send: bool = False,
    ) -> float:
        values = self.latency_ms(status, since_s, until_s, from_send)
        return float(np.percentile(values, q)) if len(values) else float("nan")

    def lag_p99_ms(self) -> float:
        a = self.array()
        return float(np.percentile((a[:, 1] - a[:, 0]) * 1000, 99)) if len(a) else float("nan")

    @property
    def span_s(self) -> float:
        return (len(self.rows) / self.rate) if self.rate else (self.end - self.start)

    def served_rate(self) -> float:
        """200s per second of wall time, from the first send until the last reply."""
        return self.count(200) / (self.end - self.start)


class LoadClient:
    """aiohttp on ``/recommend`` (or ``path``) cycling through the users; records into a Phase.

    Not httpx.AsyncClient: in open loop here it spent several ms of client CPU per request and
    its own queue, not the service's, set the latency beyond ~100 req/s (aiohttp: ~0.5 ms).
    """

    def __init__(self, url: str, users: list[int], pids: dict[str, int | None]) -> None:
        self.session = aiohttp.ClientSession(
            base_url=url,
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
        self.users, self.pids, self.next_user = users, pids, 0

    async def shoot(self, phase: Phase, scheduled: float, path: str = "/recommend") -> None:
        user = self.users[self.next_user % len(self.users)]
        self.next_user += 1
        params = {"user_id": user, "k": K} if path == "/recommend" else {}
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

    def _usage(self) -> dict[str, float]:
        usage = {name: cpu_s(pid) for name, pid in self.pids.items()}
        usage |= {"client": time.process_time(), "pressure": cpu_pressure_s()}
        return usage | {"wall": time.perf_counter()}

    def _finish(self, phase: Phase, before: dict[str, float]) -> Phase:
        phase.end = time.perf_counter()
        after = self._usage()
        wall = after.pop("wall") - before.pop("wall")
        phase.cpu = {name: 100 * (after[name] - before[name]) / wall for name in after}
        return phase

    async def _watch_loop(self, phase: Phase, every_s: float = 0.005) -> None:
        """Record the client's longest event-loop stall: how late a short sleep wakes up."""
        while True:
            due = time.perf_counter() + every_s
            await asyncio.sleep(every_s)
            phase.loop_stall_ms = max(phase.loop_stall_ms, (time.perf_counter() - due) * 1000)

    async def closed_loop(self, name: str, duration_s: float) -> Phase:
        before = self._usage()
        phase = Phase(name, None, time.perf_counter())
        watch = asyncio.create_task(self._watch_loop(phase))
        while time.perf_counter() - phase.start < duration_s:
            await self.shoot(phase, time.perf_counter())
        watch.cancel()
        return self._finish(phase, before)

    async def open_loop(
        self, name: str, rate: float, duration_s: float, path: str = "/recommend"
    ) -> Phase:
        """Request i is due at start + i / rate and is sent then, whatever is still in flight."""
        before = self._usage()
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
        return self._finish(phase, before)

    async def shed_total(self) -> float:
        """The service's own count of shed requests (``hymirec_recommend_shed_total``)."""
        async with self.session.get("/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith("hymirec_recommend_shed_total"):
                return float(line.split()[-1])
        return float("nan")


@dataclass
class Run:
    baseline: Phase
    steps: list[Phase]
    capacity: float
    sustained: Phase
    overload: Phase
    floor: Phase  # GET /health/live at the overload rate: what client + HTTP alone sustain
    shed_by_service: dict[str, float]
    max_inflight: int  # the service's serve_max_inflight
    limit_ms: float = field(init=False)

    def __post_init__(self) -> None:
        self.limit_ms = 2 * self.baseline.p(99)


def passes(phase: Phase, limit_ms: float) -> bool:
    return phase.errors == 0 and phase.count(SHED) == 0 and phase.p(99) <= limit_ms


async def drive(url: str, users: list[int], pids: dict[str, int | None], args: argparse.Namespace,
                sampler: RssSampler, max_inflight: int) -> Run:  # fmt: skip
    load = LoadClient(url, users, pids)
    try:
        await load.closed_loop("warm-up", 5)
        baseline = await load.closed_loop("unloaded (concurrency 1)", args.baseline_s)
        limit_ms = 2 * baseline.p(99)
        print(f"unloaded p50 {baseline.p(50):.1f} ms, p99 {baseline.p(99):.1f} ms", flush=True)
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
    for phase in (baseline, *steps, sustained, overload, floor):
        phase.rss = sampler.between(phase.start, phase.end)
    return Run(baseline, steps, capacity, sustained, overload, floor, shed, max_inflight)


def slope_mb_min(rss: np.ndarray) -> float:
    return float(np.polyfit(rss[:, 0] / 60, rss[:, 1], 1)[0]) if len(rss) > 2 else float("nan")


def verdicts(run: Run) -> list[tuple[str, bool, str]]:
    s, o = run.sustained, run.overload
    rss = s.rss
    slope = slope_mb_min(rss)
    o_first, o_max = (o.rss[0, 1], o.rss[:, 1].max()) if len(o.rss) else (np.nan, np.nan)
    half = o.span_s / 2
    early, late = o.p(99, since_s=0, until_s=half), o.p(99, since_s=half)
    little_ms = 1000 * run.max_inflight / max(o.served_rate(), 1e-9)
    fast = o.p(99, SHED, from_send=True) < o.p(50, from_send=True)
    bounded = late <= 1.5 * early and o.p(99) <= 2 * little_ms
    return [
        ("sustained p99 <= 2x unloaded p99",
         s.p(99) <= run.limit_ms and s.errors == 0 and s.count(SHED) == 0,
         f"p99 {s.p(99):.1f} ms vs limit {run.limit_ms:.1f} ms (unloaded p99 "
         f"{run.baseline.p(99):.1f} ms) at {run.capacity:g} req/s for {s.span_s / 60:.1f} min; "
         f"503s {s.count(SHED)}, errors {s.errors}"),
        ("excess shed with 503 (fast, Retry-After), accepted latency bounded",
         o.count(SHED) > 0 and o.missing_retry_after == 0 and o.errors == 0 and fast and bounded,
         f"{o.rate:g} req/s offered: {o.count(SHED) / max(len(o.rows), 1):.0%} answered 503 "
         f"(p50 {o.p(50, SHED):.1f} / p99 {o.p(99, SHED):.1f} ms from the scheduled time, "
         f"{o.p(50, SHED, from_send=True):.1f} / {o.p(99, SHED, from_send=True):.1f} ms from "
         f"the actual send; fast means 503 p99 < accepted p50, both from the send: "
         f"{o.p(50, from_send=True):.1f} ms; {o.missing_retry_after} without Retry-After); "
         f"accepted p50 {o.p(50):.1f} / p99 "
         f"{o.p(99):.1f} ms (first half p99 {early:.1f}, second half {late:.1f}; Little's-law "
         f"queue bound {run.max_inflight} in flight / {o.served_rate():.0f} served/s = "
         f"{little_ms:.0f} ms); errors {o.errors}"),
        ("service RSS flat",
         bool(slope <= RSS_SLOPE_LIMIT_MB_MIN and o_max <= o_first * (1 + RSS_OVERLOAD_GROWTH)),
         f"sustained: {rss[0, 1]:.1f} -> {rss[-1, 1]:.1f} MB, max - min "
         f"{np.ptp(rss[:, 1]):.1f} MB, slope {slope:+.2f} MB/min (limit "
         f"{RSS_SLOPE_LIMIT_MB_MIN:g}; {slope * 2**20 / 60 / run.capacity:+.0f} B/request); "
         f"overload: {o_first:.1f} MB at start, max {o_max:.1f} MB (limit +"
         f"{RSS_OVERLOAD_GROWTH:.0%})"),
    ]  # fmt: skip


def render(run: Run, args: argparse.Namespace, argv: list[str] | None, load: tuple[float, float],
           prepare_s: float) -> str:  # fmt: skip
    command = " ".join(["python -m benchmarks.load_test", *(argv or sys.argv[1:])])
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    phases = [
        "| phase | offered req/s | served 200/s | 200 p50 / p99 ms | 503 (share) | "
        "503 p50 / p99 ms | errors | client lag p99 / loop stall max ms | RSS first → last MB | "
        "CPU % of a core: service / client / broker | CPU pressure % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ph in (run.baseline, *run.steps, run.sustained, run.overload, run.floor):
        n = max(len(ph.rows), 1)
        rss = f"{ph.rss[0, 1]:.1f} → {ph.rss[-1, 1]:.1f}" if len(ph.rss) else "-"
        phases.append(
            f"| {ph.name} | {ph.rate or '-'} | {ph.served_rate():.1f} | {ph.p(50):.1f} / "
            f"{ph.p(99):.1f} | {ph.count(SHED)} ({ph.count(SHED) / n:.0%}) | "
            f"{ph.p(50, SHED):.1f} / {ph.p(99, SHED):.1f} | {ph.errors} | {ph.lag_p99_ms():.1f} / "
            f"{ph.loop_stall_ms:.0f} | "
            f"{rss} | {ph.cpu['service']:.0f} / {ph.cpu['client']:.0f} / {ph.cpu['broker']:.0f} | "
            f"{ph.cpu['pressure']:.0f} |"
        )
    minutes = [
        "| minute | requests | p50 ms | p99 ms | p99 ≤ limit | 503 | errors | RSS at end MB |",
        "|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    s = run.sustained
    for m in range(int(np.ceil(s.span_s / 60))):
        a = s.array()
        rel = a[:, 0] - s.start
        in_min = (rel >= 60 * m) & (rel < 60 * (m + 1))
        rss = s.rss[s.rss[:, 0] < 60 * (m + 1), 1]
        p99 = s.p(99, since_s=60 * m, until_s=60 * (m + 1))
        minutes.append(
            f"| {m + 1} | {int(in_min.sum())} | {s.p(50, since_s=60 * m, until_s=60 * (m + 1)):.1f}"
            f" | {p99:.1f} | {'yes' if p99 <= run.limit_ms else 'no'} | "
            f"{int((a[in_min, 3] == SHED).sum())} | "
            f"{int(in_min.sum() - ((a[in_min, 3] == 200) | (a[in_min, 3] == SHED)).sum())} | "
            f"{rss[-1] if len(rss) else float('nan'):.1f} |"
        )
    goals = [
        f"- **{'HELD' if ok else 'FAILED'}**: {goal}: {text}." for goal, ok, text in verdicts(run)
    ]
    shed = ", ".join(f"{k} {v:g}" for k, v in run.shed_by_service.items())
    return "\n".join([
        f"## Recommendation service under sustained load — {when} — {args.host}",
        "",
        f"Command: `{command}`",
        "",
        f"`hymirec serve` (model `{args.model}` for every user, `serve_max_inflight` "
        f"{run.max_inflight}, {args.threads} ranking thread(s), one uvicorn process) as a child "
        "process on the stack of "
        f"`benchmarks.serving_latency` (noida-db broker, Feast SQLite online store with all 943 "
        f"ML-100K users, models trained on the first {args.train_ratings} ratings; set-up "
        f"{prepare_s:.0f} s). Requests `GET /recommend?user_id=U&k={K}` cycle through the users "
        f"from one asyncio + aiohttp process (up to {MAX_CONNECTIONS} connections; "
        "httpx.AsyncClient, tried first, cost several ms of client CPU per request in open "
        "loop and its own queue set the latency beyond ~100 req/s). Unloaded: closed "
        f"loop, one at a time, {args.baseline_s:g} s. Capacity (open-loop step search): steps of "
        f"{args.step_s:g} s from {args.start_rate:g} req/s in +{args.rate_step:g} until one "
        "misses p99 ≤ 2× unloaded p99 or has a 503 or an error, then one step half-way back; "
        "the capacity is the highest passing rate. Overload: the capacity × "
        f"{args.overload_factor:g} for {args.overload_s:g} s; then 'HTTP floor' sends "
        "`GET /health/live` (no work) at that rate for 10 s: what client and uvicorn alone carry. "
        "Open loop: request i is sent at "
        "start + i/rate whatever is in flight; latency runs from that scheduled time, so the "
        "client's own lag (column 'client lag') counts against the service; 'loop stall max' is "
        "the longest the client's event loop was late to wake (a stall there sends a burst). "
        "Service RSS is "
        "VmRSS from /proc every second. CPU pressure: share of the phase's wall time during which "
        "some runnable task on the machine waited for a CPU (PSI). "
        f"{_placement(args.cpus)} 1-minute load average "
        f"{load[0]:.2f} at the start, {load[1]:.2f} at the end. Shed counts from the "
        f"service's /metrics (`hymirec_recommend_shed_total`): {shed}.",
        "",
        *goals,
        "",
        *phases,
        "",
        f"Sustained run per minute (limit {run.limit_ms:.1f} ms):",
        "",
        *minutes,
        "",
    ])  # fmt: skip


def _placement(cpus: tuple[set[int], set[int]] | None) -> str:
    if cpus is None:
        return "**The client, the service and the broker share the CPUs** (other jobs too)."
    return (
        f"**The service is pinned to CPU {sorted(cpus[0])}, the client and the broker to CPU "
        f"{sorted(cpus[1])}** (other jobs on the machine are not pinned)."
    )


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
            events_topic=f"events-{uuid.uuid4().hex[:8]}",
        )
        ensure_topics(settings)
        start = time.perf_counter()
        users = prepare(settings, args.train_ratings)
        prepare_s = time.perf_counter() - start
        cpus = split_cpus(args.pin)
        if cpus is not None:  # the service inherits its CPUs (and sizes its threads by them)
            os.sched_setaffinity(0, cpus[0])
        args.threads = ranking_threads(settings)  # what the service computes, on its CPUs
        process, url = serve(settings, args.model, folder)
        assert process.pid is not None  # started
        if cpus is not None and broker_pid is not None:
            pin(process.pid, cpus[0])
            pin(broker_pid, cpus[1])
            pin(os.getpid(), cpus[1])
        args.cpus = cpus
        sampler = RssSampler(process.pid)
        sampler.start()
        # The set-up left millions of objects in this process (data, training); a full
        # collection over them stalled the client's event loop for 0.3-0.6 s in the middle of
        # a phase, sending a burst that the service then had to shed. Freeze them.
        gc.collect()
        gc.freeze()
        try:
            pids = {"service": process.pid, "broker": broker_pid}
            run = asyncio.run(drive(url, users, pids, args, sampler, settings.serve_max_inflight))
        finally:
            sampler.stopped.set()
            process.stop()
    finally:
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)
    report = render(run, args, argv, (load_before, os.getloadavg()[0]), prepare_s)
    print(report)
    append_section(args.results, report)


if __name__ == "__main__":
    main()
