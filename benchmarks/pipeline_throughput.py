"""Streaming pipeline throughput and latency on the embedded broker, all in one run.

Starts its own noida-db broker on a free port in a temp data dir (item embeddings come from the
repo's ``.hymirec/cache``) and measures:

(a) raw broker rates with the 100,000 MovieLens-100K events serialized as the pipeline sends them:
    kafka-python producer (EventProducer: acks=all, linger 5 ms), kafka-python and aiokafka
    consumers (a consumer group each, from earliest; timed from the partition assignment, so the
    group join is left out);
(b) end-to-end events/s broker → Faust worker → Feast online: with the worker caught up, produce
    all 100,000 events as fast as possible and time until every one of the 943 users' online
    ``history_len`` equals its count (polled every 0.5 s): the worker's capacity;
(c) event-to-online latency (benchmarks/pipeline_latency.py): probes for distinct synthetic users
    at a steady rate, each polled in Feast every ~2 ms until it appears; once with the worker
    otherwise idle and once under a background load (another process) at ``--load-fraction``
    (default half) of the capacity measured in (b).

The report sets each figure beside its goal (benchmarks/RESULTS.md and issue 19): end to end at
least 0.3 of raw produce in the same run, latency p99 under 100 ms idle and under 250 ms at half
of capacity.

``--variant KEY=VAL[,KEY=VAL]`` repeats (b), and an idle latency check, on fresh topics and a
fresh Feast store with a tuned worker: ``HYMIREC_*`` keys override Settings, other keys
(``BROKER_MAX_POLL_RECORDS``, ``PRODUCER_LINGER``) are Faust settings, which Faust reads from the
worker's environment in preference to the app's arguments. ``--variant baseline`` repeats the
default worker (to see the drift on a shared machine).

Every process shares the machine's cores, so the report also gives the CPU seconds of the worker,
the broker and the benchmark, how long the worker's event loop waited for a CPU, and the
machine's CPU pressure (PSI) over each run.

Run from the repository root: ``python -m benchmarks.pipeline_throughput``. Prints a markdown
table and appends it, with the date and the machine, to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.broker_rates import (
    Record,
    raw_consume_aiokafka,
    raw_consume_kafka_python,
    raw_produce,
)
from benchmarks.pipeline_latency import (
    PROBE_USER_BASE,
    Latency,
    history_lens,
    measure_latency,
    probe_latency,
)
from benchmarks.pipeline_worker import (
    cpu_pressure_s,
    cpu_s,
    free_port,
    main_thread_sched_s,
    parse_variant,
    pipeline_settings,
    running_worker,
    wait_report,
    warm_up,
)
from benchmarks.report import append_section, machine
from core.errors import HymirecError
from core.movielens import load_ratings
from core.settings import Settings
from features.item_features import build_item_features
from features.store import FeatureStoreClient
from hymirec.processes import ServiceProcess
from streaming.broker import LocalBroker
from streaming.kafka_io import EventProducer, ensure_topics, event_key
from streaming.replay import movielens_events

__all__ = ["cpu_s", "free_port", "history_lens", "main"]  # idle_stack uses the first three

# Goals (issue 19): end to end / raw produce, and latency p99 (ms) idle and at half of capacity.
GOAL_E2E_OVER_PRODUCE = 0.3
GOAL_P99_MS = {"idle": 100.0, "loaded": 250.0}


def movielens_records() -> tuple[list[Record], dict[int, int]]:
    ratings = load_ratings()
    records = [(event_key(e.user_id), e.to_json_bytes()) for e in movielens_events(ratings)]
    expected = {int(u): int(n) for u, n in ratings.groupby("user_id").size().items()}
    return records, expected


# -- (b) end to end: the worker's capacity ------------------------------------------------------


@dataclass
class EndToEnd:
    events_per_s: float
    total_s: float
    produced_s: float
    steady_events_per_s: float  # between 10% and 90% of the events online
    busy_s: dict[str, float]
    batches: int
    cpu_s: dict[str, float]
    idle_latency_ms: list[float] = field(default_factory=list)


def end_to_end(
    settings: Settings,
    store: FeatureStoreClient,
    worker: ServiceProcess,
    broker_pid: int | None,
    records: list[Record],
    expected: dict[int, int],
) -> EndToEnd:
    before = wait_report(worker, 1)
    produced_at: list[float] = []

    def produce() -> None:
        with EventProducer(settings.kafka) as producer:
            for key, value in records:
                producer.send_raw(key, value)
        produced_at.append(time.perf_counter())

    cpu0 = {"worker": cpu_s(worker.pid), "broker": cpu_s(broker_pid), "bench": time.process_time()}
    loop0 = main_thread_sched_s(worker.pid)
    pressure0 = cpu_pressure_s()
    start = time.perf_counter()
    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    pending, total, trace = dict(expected), sum(expected.values()), [(start, 0)]
    while pending:
        time.sleep(0.5)
        if not worker.alive() or time.perf_counter() - start > 900:
            raise HymirecError(f"end-to-end run did not finish:\n{worker.tail()}")
        lens = history_lens(store, sorted(pending))  # only users not yet complete
        missing = sum(n - (lens[u] or 0) for u, n in pending.items())
        pending = {u: n for u, n in pending.items() if lens[u] != n}
        trace.append((time.perf_counter(), total - missing))
    done = trace[-1][0]
    cpu = {
        "worker": cpu_s(worker.pid) - cpu0["worker"],
        "broker": cpu_s(broker_pid) - cpu0["broker"],
        "bench": time.process_time() - cpu0["bench"],
        "loop_cpu": main_thread_sched_s(worker.pid)[0] - loop0[0],
        "loop_wait": main_thread_sched_s(worker.pid)[1] - loop0[1],
        "pressure": cpu_pressure_s() - pressure0,
    }
    thread.join()
    after = wait_report(worker, before.events + total)
    times, seen = np.array([t for t, _ in trace]), np.array([s for _, s in trace])
    t10, t90 = np.interp([0.1 * total, 0.9 * total], seen, times)
    return EndToEnd(
        events_per_s=total / (done - start),
        total_s=done - start,
        produced_s=produced_at[0] - start,
        steady_events_per_s=0.8 * total / (t90 - t10),
        busy_s={k: after.busy_s[k] - before.busy_s.get(k, 0.0) for k in after.busy_s},
        batches=after.batches - before.batches,
        cpu_s=cpu,
    )


# -- runs ----------------------------------------------------------------------------------------


def fmt_busy(run: EndToEnd) -> str:
    busy = sum(v for k, v in run.busy_s.items() if k != "push_in_publish")
    phases = ", ".join(f"{k} {v:.1f}" for k, v in run.busy_s.items())
    return (
        f"{phases} (busy {busy:.1f} s of {run.total_s:.1f} s wall, "
        f"{100 * busy / run.total_s:.0f}%; the rest: waiting for records, or for a CPU)"
    )


def e2e_row(name: str, run: EndToEnd) -> str:
    cpu, lat = run.cpu_s, run.idle_latency_ms or [float("nan")]
    share = {k: f"{100 * cpu[k] / run.total_s:.0f}%" for k in ("loop_cpu", "loop_wait", "pressure")}
    return (
        f"| {name} | {run.events_per_s:,.0f} | {run.steady_events_per_s:,.0f} "
        f"| {run.produced_s:.1f} | {run.total_s:.1f} | {run.batches} "
        f"| {100_000 / max(run.batches, 1):.0f} | {fmt_busy(run).split(' (')[0]} "
        f"| {cpu['worker']:.1f} / {cpu['broker']:.1f} / {cpu['bench']:.1f} "
        f"| {share['loop_cpu']} / {share['loop_wait']} | {share['pressure']} "
        f"| {np.percentile(lat, 50):.0f} / {np.percentile(lat, 99):.0f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cache-dir", type=Path, default=Path(".hymirec/cache"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--probe-window-s", type=float, default=30.0)
    parser.add_argument("--load-fraction", type=float, default=0.5)
    parser.add_argument("--variant", action="append", default=[], help="KEY=VAL[,KEY=VAL]")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    records, expected = movielens_records()
    n = len(records)
    with tempfile.TemporaryDirectory(prefix="hymirec-bench-") as tmp:
        root = Path(tmp)
        broker = LocalBroker(root / "broker", port=free_port())
        broker_pid = broker.start().pid
        base = Settings(data_dir=root / "base", cache_dir=args.cache_dir.resolve(),
                        broker_port=broker.port, kafka_events_topic="raw-events")  # fmt: skip
        try:
            ensure_topics(base.kafka)
            produce_rate = raw_produce(base, records)
            print(f"raw produce: {produce_rate:,.0f}/s", file=sys.stderr)
            consume_kp = raw_consume_kafka_python(base, base.kafka.events_topic, n)
            consume_aio = raw_consume_aiokafka(base, base.kafka.events_topic, n)
            print(
                f"raw consume: {consume_kp:,.0f}/s, aiokafka {consume_aio:,.0f}/s", file=sys.stderr
            )

            build_item_features(base)  # codebook + item views, copied into each run's data dir
            runs: list[tuple[str, EndToEnd]] = []
            latencies: list[Latency] = []
            for index, spec in enumerate(["baseline", *args.variant]):
                overrides, env = parse_variant("" if spec == "baseline" else spec)
                data_dir = root / f"run{index}"
                for folder in ("codebook", "feast"):
                    shutil.copytree(root / "base" / folder, data_dir / folder)
                settings = pipeline_settings(base, data_dir, f"{index}", **overrides)
                ensure_topics(settings.kafka)
                store = FeatureStoreClient(settings)
                with running_worker(settings, env) as worker:
                    warm_up(settings, store, worker)
                    run = end_to_end(settings, store, worker, broker_pid, records, expected)
                    runs.append((spec, run))
                    print(
                        f"{spec}: {run.events_per_s:,.0f} events/s end to end; {fmt_busy(run)}; "
                        f"{run.batches} batches; produced in {run.produced_s:.1f} s; "
                        f"CPU s {run.cpu_s}",
                        file=sys.stderr,
                    )
                    if index == 0 and args.probes:
                        latencies = measure_latency(settings, store, run.events_per_s, args)
                        run.idle_latency_ms = latencies[0].latencies_ms
                    elif args.probes:  # the variant's cost in latency, at idle
                        base_user = PROBE_USER_BASE + 2000
                        run.idle_latency_ms = probe_latency(settings, store, 50, 10, base_user)[0]
        finally:
            broker.stop()
    report = render(args, argv, load_start, produce_rate, consume_kp, consume_aio, runs, latencies)
    print(report)
    if not args.no_append:
        append_section(args.results, report)


def render(
    args: argparse.Namespace, argv: list[str] | None, load_start: float, produce_rate: float,
    consume_kp: float, consume_aio: float, runs: list[tuple[str, EndToEnd]],
    latencies: list[Latency],
) -> str:  # fmt: skip
    baseline = runs[0][1]
    command = " ".join(["python -m benchmarks.pipeline_throughput", *(argv or sys.argv[1:])])
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"## Streaming pipeline throughput — {when} — {machine()}, 1-min load {load_start:.2f}",
        "",
        f"Command: `{command}`",
        "",
        "100,000 MovieLens-100K rating events (943 users) as the pipeline sends them, on one "
        "noida-db broker (4 partitions) started by the benchmark; one Faust worker "
        "(`hymirec worker`, default settings unless a variant says otherwise); Feast local "
        "provider, SQLite online store. Producers are EventProducer (kafka-python, acks=all, "
        "linger 5 ms); consumer rates are timed from the group's partition assignment to the "
        "last record. "
        "End to end: from the first send until all 943 users' online `history_len` are "
        "complete (polled every 0.5 s, history_len only, users not yet complete); the producer "
        "runs in a thread of the polling process. Latency: one probe event per fresh user, "
        f"{args.probes} spread over {args.probe_window_s:.0f} s, polled every ~2 ms in Feast "
        "from the sending process (time.perf_counter; includes the producer's 5 ms linger). "
        f"Load average at the end: {os.getloadavg()[0]:.2f}; every process shares the 2 cores.",
        "",
        *summary_table(args, produce_rate, consume_kp, consume_aio, baseline, latencies),
        "",
        run_notes(baseline),
    ]
    lines += [f"Latency {lat.label}: {'; '.join(lat.notes)}." for lat in latencies if lat.notes]
    if len(runs) > 1:
        lines += [
            "",
            "Worker variants, run one after another on the same broker, each on fresh topics "
            "and a fresh Feast store (end to end as above; idle latency from the baseline's "
            "probes, and from 50 probes over 10 s for the others):",
            "",
            "| variant | events/s | 10→90% events/s | produced s | online s | batches "
            "| events/batch | busy_s apply, publish (push within it), table "
            "| CPU s worker / broker / bench "
            "| worker loop thread on CPU / waiting for CPU | CPU pressure "
            "| idle latency p50 / p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
            *(e2e_row(name, run) for name, run in runs),
        ]
    return "\n".join(lines) + "\n"


def summary_table(
    args: argparse.Namespace, produce_rate: float, consume_kp: float, consume_aio: float,
    baseline: EndToEnd, latencies: list[Latency],
) -> list[str]:  # fmt: skip
    """The main figures, each beside its same-run reference or its goal."""
    e2e = baseline.events_per_s
    ratio = e2e / produce_rate
    verdict = "met" if ratio >= GOAL_E2E_OVER_PRODUCE else "not met"
    lines = [
        "| measure | value | goal |",
        "|---|---:|---|",
        f"| raw produce, kafka-python (events/s) | {produce_rate:,.0f} | (reference) |",
        f"| raw consume, kafka-python (events/s) | {consume_kp:,.0f} | (reference) |",
        f"| raw consume, aiokafka (events/s) | {consume_aio:,.0f} | (reference) |",
        f"| end to end, broker → Faust → Feast online (events/s) | {e2e:,.0f} | |",
        f"| end to end, 10%→90% of events online (events/s) | "
        f"{baseline.steady_events_per_s:,.0f} | |",
        f"| end to end / raw consume kafka-python | {e2e / consume_kp:.2f} | |",
        f"| end to end / raw consume aiokafka | {e2e / consume_aio:.2f} | |",
        f"| end to end / raw produce | {ratio:.2f} | ≥ {GOAL_E2E_OVER_PRODUCE} ({verdict}) |",
    ]
    for lat, kind in zip(latencies, ("idle", "loaded"), strict=False):
        goal = GOAL_P99_MS[kind]
        load = f", load {lat.load_events_per_s:,.0f} events/s" if lat.load_events_per_s else ""
        if kind == "loaded" and args.load_fraction != 0.5:
            target = "(goal is at half of capacity)"
        else:
            target = f"p99 < {goal:.0f} ms ({'met' if lat.pct(99) < goal else 'not met'})"
        lines.append(
            f"| latency {lat.label}{load}: p50 / p99 / max ms (n) | {lat.pct(50):.0f} / "
            f"{lat.pct(99):.0f} / {max(lat.latencies_ms, default=float('nan')):.0f} "
            f"({len(lat.latencies_ms)}/{lat.probes}) | {target} |"
        )
    return lines


def run_notes(run: EndToEnd) -> str:
    cpu = run.cpu_s
    return (
        f"End-to-end run: producer done after {run.produced_s:.1f} s, all online after "
        f"{run.total_s:.1f} s. Worker `busy_s` over the run (from its log; publish = the Feast "
        f"push beside the samples until all are acknowledged): {fmt_busy(run)}; "
        f"{run.batches} batches. CPU seconds over the run: worker {cpu['worker']:.1f}, broker "
        f"{cpu['broker']:.1f}, benchmark (producer thread + polling) {cpu['bench']:.1f}. The "
        f"worker's event-loop thread was on a CPU {100 * cpu['loop_cpu'] / run.total_s:.0f}% "
        f"and runnable but waiting for a CPU {100 * cpu['loop_wait'] / run.total_s:.0f}% of the "
        f"run; machine CPU pressure (PSI some): {100 * cpu['pressure'] / run.total_s:.0f}% of "
        "the run."
    )


if __name__ == "__main__":
    main()
