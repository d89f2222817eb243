"""What a load test measured, how it is judged, and its report (``benchmarks.load_test``).

A :class:`Phase` holds every request of one phase (scheduled and actual send time, reply time,
outcome) and the CPU, RSS and interest-cache figures around it; a :class:`Run` the phases of one
run with the same-run references (HTTP floor, bare Feast reads); :func:`verdicts` judges the goals
of issue 8 and :func:`render` writes the markdown section.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from dataclasses import dataclass, field

import numpy as np

from benchmarks.serving_stack import K, Measured

__all__ = ["SHED", "Phase", "Run", "passes", "render", "verdicts"]

TIMEOUT, TRANSPORT, BAD_BODY, OTHER_503 = -1, -2, -3, -4  # client-side outcomes besides HTTP codes
SHED = 503
MAX_CONNECTIONS = 1024
RSS_SLOPE_LIMIT_MB_MIN = 1.0  # "flat": least-squares RSS slope at most this
RSS_OVERLOAD_GROWTH = 0.02  # overload: max RSS at most 2% above the phase's first sample


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
    cache_hits: float = float("nan")  # share of the service's interest-cache lookups that hit

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
    unloaded_floor: Phase  # GET /health/live, closed loop, right after the unloaded phase
    feast: Measured  # the bare Feast read (get_online_features), one at a time, same users
    lean: Measured  # the service's own online read (serving.feast_rows), the same way
    limit_ms: float = field(init=False)

    def __post_init__(self) -> None:
        self.limit_ms = 2 * self.baseline.p(99)


def passes(phase: Phase, limit_ms: float) -> bool:
    return phase.errors == 0 and phase.count(SHED) == 0 and phase.p(99) <= limit_ms


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
        "CPU % of a core: service / client / broker / churn | service CPU ms per 200 | "
        "cache hits | CPU pressure % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    every = (run.baseline, run.unloaded_floor, *run.steps, run.sustained, run.overload, run.floor)
    for ph in every:
        n = max(len(ph.rows), 1)
        rss = f"{ph.rss[0, 1]:.1f} → {ph.rss[-1, 1]:.1f}" if len(ph.rss) else "-"
        cpu = ph.cpu
        per_request = 10 * cpu["service"] / ph.served_rate() if ph.count(200) else float("nan")
        phases.append(
            f"| {ph.name} | {ph.rate or '-'} | {ph.served_rate():.1f} | {ph.p(50):.1f} / "
            f"{ph.p(99):.1f} | {ph.count(SHED)} ({ph.count(SHED) / n:.0%}) | "
            f"{ph.p(50, SHED):.1f} / {ph.p(99, SHED):.1f} | {ph.errors} | {ph.lag_p99_ms():.1f} / "
            f"{ph.loop_stall_ms:.0f} | {rss} | {cpu['service']:.0f} / {cpu['client']:.0f} / "
            f"{cpu['broker']:.0f} / {cpu.get('churn', 0.0):.0f} | {per_request:.2f} | "
            f"{ph.cache_hits:.0%} | {cpu['pressure']:.0f} |"
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
    cores = len(args.cpus[0]) if args.cpus is not None else None
    per_core = f"{run.capacity / cores:g} req/s per service core" if cores else "service unpinned"
    b, f = run.baseline, run.unloaded_floor
    references = (
        f"Capacity {run.capacity:g} req/s ({per_core}). Same-run references, unloaded (one at a "
        f"time): the service p50 {b.p(50):.2f} / p99 {b.p(99):.2f} ms; the HTTP floor (`GET "
        f"/health/live`) p50 {f.p(50):.2f} / p99 {f.p(99):.2f} ms, so the service's p50 is "
        f"{b.p(50) / f.p(50):.1f}× the floor's; the bare Feast read (`get_online_features`, "
        f"in the client process) p50 {run.feast.p50:.3f} / p99 {run.feast.p99:.3f} ms and the "
        f"service's own read p50 {run.lean.p50:.3f} / p99 {run.lean.p99:.3f} ms."
    )
    shed = ", ".join(f"{k} {v:g}" for k, v in run.shed_by_service.items())
    return "\n".join([
        f"## Recommendation service under sustained load — {when} — {args.host}",
        "",
        f"Command: `{command}`",
        "",
        f"`hymirec serve` (model `{args.model}` for every user, `serve_max_inflight` "
        f"{run.max_inflight}, {args.threads} ranking thread(s), one uvicorn process) as a child "
        "process on the stack of "
        f"`benchmarks.serving_stack` (noida-db broker, Feast SQLite online store with all 943 "
        f"ML-100K users, models trained on the first {args.train_ratings} ratings; set-up "
        f"{prepare_s:.0f} s). Requests `GET /recommend?user_id=U&k={K}` cycle through the users "
        f"(changed share {args.changed_share:g}: {_churn(args.changed_share)}) "
        f"from one asyncio + aiohttp process (up to {MAX_CONNECTIONS} connections; "
        "httpx.AsyncClient, tried first, cost several ms of client CPU per request in open "
        "loop and its own queue set the latency beyond ~100 req/s). Unloaded: closed "
        f"loop, one at a time, {args.baseline_s:g} s, then the HTTP floor the same way for "
        f"{args.baseline_s / 3:g} s. Capacity (open-loop step search): steps of "
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
        references,
        "",
        *phases,
        "",
        f"Sustained run per minute (limit {run.limit_ms:.1f} ms):",
        "",
        *minutes,
        "",
    ])  # fmt: skip


def _churn(share: float) -> str:
    if share <= 0:
        return "no history changes, so a user's repeated requests are interest-cache hits"
    if share >= 1:
        return (
            "before each request the user's online history got one more item, pushed by a churn "
            "process ahead of the request cursor, so every request computes the user's interests"
        )
    return (
        f"before {share:.0%} of the requests the user's online history got one more item (a "
        "churn process pushes it ahead of the request cursor): those compute the interests"
    )


def _placement(cpus: tuple[set[int], set[int]] | None) -> str:
    if cpus is None:
        return "**The client, the service and the broker share the CPUs** (other jobs too)."
    return (
        f"**The service is pinned to CPU {sorted(cpus[0])}, the client, the churn process and "
        f"the broker to CPU {sorted(cpus[1])}** (other jobs on the machine are not pinned)."
    )
