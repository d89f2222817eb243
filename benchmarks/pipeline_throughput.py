"""Streaming pipeline throughput and latency on the embedded broker, all in one run.

Starts its own noida-db broker on a free port in a temp data dir (item embeddings come from the
repo's ``.hymirec/cache``) and measures:

(a) raw broker rates with the 100,000 MovieLens-100K events serialized as the pipeline sends them:
    kafka-python producer (EventProducer: acks=all, linger 5 ms), kafka-python and aiokafka
    consumers (a consumer group each, from earliest; timed from the partition assignment, so the
    group join is left out);
(b) end-to-end events/s broker → Faust worker → Feast online: with the worker caught up, produce
    all 100,000 events as fast as possible and time until every one of the 943 users' online
    ``history_len`` equals its count (polled every 0.5 s);
(c) event-to-online latency: probes for distinct synthetic users at a steady rate, each polled in
    Feast every ~2 ms until it appears; once with the worker otherwise idle and once under a
    background load (another process) at a fraction of the measured end-to-end rate.

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
import ast
import asyncio
import contextlib
import datetime as dt
import multiprocessing as mp
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer

from benchmarks.report import append_section, machine
from features.item_features import build_item_features
from features.store import FeatureStoreClient
from hymirec.errors import HymirecError
from hymirec.movielens import load_ratings
from hymirec.processes import ServiceProcess
from hymirec.settings import Settings
from streaming.broker import LocalBroker
from streaming.kafka_io import EventProducer, ensure_topics, event_key
from streaming.replay import movielens_events
from streaming.schema import Event

Record = tuple[bytes, bytes]
WARMUP_USER = 9_000_000
PROBE_USER_BASE = 10_000_000  # + 1000 * round + i: one fresh user per probe
LOAD_USER_BASE = 20_000_000  # + MovieLens user id: the background load's users
REPORT = re.compile(r"events=(\d+) .*?pushes=(\d+) .*?busy_s=(\{[^}]*\})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (from /proc)."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main_thread_sched_s(pid: int | None) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a process's main thread.

    For the worker that is the asyncio event loop, which runs every step but the Feast push.
    """
    if pid is None:
        return float("nan"), float("nan")
    on_cpu_ns, waiting_ns = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[:2]
    return int(on_cpu_ns) / 1e9, int(waiting_ns) / 1e9


def cpu_pressure_s() -> float:
    """Seconds during which some runnable task waited for a CPU (PSI), machine-wide."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path("/proc/pressure/cpu").read_text().split()[4].split("=")[1]) / 1e6
    return float("nan")


def movielens_records() -> tuple[list[Record], dict[int, int]]:
    ratings = load_ratings()
    records = [(event_key(e.user_id), e.to_json_bytes()) for e in movielens_events(ratings)]
    expected = {int(u): int(n) for u, n in ratings.groupby("user_id").size().items()}
    return records, expected


# -- (a) raw broker rates ------------------------------------------------------------------------


def raw_produce(settings: Settings, records: list[Record]) -> float:
    with EventProducer(settings) as producer:
        start = time.perf_counter()
        for key, value in records:
            producer.send_raw(key, value)
        producer.flush()
        return len(records) / (time.perf_counter() - start)


class RateCounter:
    """Records/s from the group's partition assignment to the last record (join left out)."""

    def __init__(self, expected: int, timeout_s: float = 300) -> None:
        self.expected, self.seen = expected, 0
        self.assigned_at = self.last = 0.0
        self.deadline = time.monotonic() + timeout_s

    def on_partitions_assigned(self, assigned: object) -> None:
        self.assigned_at = self.assigned_at or time.perf_counter()

    def more(self) -> bool:
        return self.seen < self.expected and time.monotonic() < self.deadline

    def add(self, count: int) -> None:
        if count:
            self.seen, self.last = self.seen + count, time.perf_counter()

    def rate(self) -> float:
        if self.seen < self.expected or not self.assigned_at:
            raise HymirecError(f"read {self.seen}/{self.expected} records before the deadline")
        return self.seen / (self.last - self.assigned_at)


def raw_consume_kafka_python(settings: Settings, topic: str, n: int) -> float:
    from kafka import ConsumerRebalanceListener

    counter = RateCounter(n)
    listener = type("Listener", (ConsumerRebalanceListener,), {
        "on_partitions_assigned": lambda _, a: counter.on_partitions_assigned(a),
        "on_partitions_revoked": lambda _, r: None,
    })()  # fmt: skip
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"bench-kafka-python-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
    )
    consumer.subscribe([topic], listener=listener)
    try:
        while counter.more():
            counter.add(sum(len(batch) for batch in consumer.poll(timeout_ms=1000).values()))
        return counter.rate()
    finally:
        consumer.close()


def raw_consume_aiokafka(settings: Settings, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

    counter = RateCounter(n)
    listener = type("Listener", (ConsumerRebalanceListener,), {
        "on_partitions_assigned": lambda _, a: counter.on_partitions_assigned(a),
        "on_partitions_revoked": lambda _, r: None,
    })()  # fmt: skip

    async def consume() -> float:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=f"bench-aiokafka-{uuid.uuid4().hex[:6]}",
            auto_offset_reset="earliest",
        )
        consumer.subscribe([topic], listener=listener)
        await consumer.start()
        try:
            while counter.more():
                counter.add(sum(len(b) for b in (await consumer.getmany(timeout_ms=1000)).values()))
            return counter.rate()
        finally:
            await consumer.stop()

    return asyncio.run(consume())


# -- the worker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReport:
    events: int
    pushes: int
    busy_s: dict[str, float]


def last_report(log_path: Path) -> WorkerReport | None:
    found = REPORT.findall(log_path.read_text(errors="replace")) if log_path.is_file() else []
    if not found:
        return None
    events, pushes, busy = found[-1]
    return WorkerReport(int(events), int(pushes), ast.literal_eval(busy))


def wait_report(worker: ServiceProcess, min_events: int, timeout_s: float = 30) -> WorkerReport:
    """The worker logs its counters every 10 s: wait for a line that counts ``min_events``."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = last_report(worker.log_path)
        if report is not None and report.events >= min_events:
            return report
        if not worker.alive() or time.monotonic() > deadline:
            raise HymirecError(f"no worker report with {min_events} events:\n{worker.tail()}")
        time.sleep(0.5)


@contextlib.contextmanager
def running_worker(settings: Settings, env: dict[str, str]) -> Iterator[ServiceProcess]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # ServiceProcess hands the parent's environment to the child
    try:
        worker = ServiceProcess("worker", ["worker"], settings).start()
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    try:
        yield worker
    finally:
        worker.stop()


def history_lens(store: FeatureStoreClient, users: list[int]) -> dict[int, int | None]:
    data = store.online(["user_history:history_len"], [{"user_id": u} for u in users])
    return dict(zip((int(u) for u in data["user_id"]), data["history_len"], strict=True))


def warm_up(settings: Settings, store: FeatureStoreClient, worker: ServiceProcess) -> WorkerReport:
    """One event through the whole pipeline, then the worker's report of it (so it is idle)."""
    with EventProducer(settings) as producer:
        producer.send(Event(event_id=uuid.uuid4(), user_id=WARMUP_USER, item_id=1,
                            event_type="play", ts_ms=1))  # fmt: skip
    deadline = time.monotonic() + 120
    while not history_lens(store, [WARMUP_USER])[WARMUP_USER]:
        if not worker.alive() or time.monotonic() > deadline:
            raise HymirecError(f"the warm-up event never reached Feast:\n{worker.tail()}")
        time.sleep(0.2)
    return wait_report(worker, 1)


# -- (b) end to end ------------------------------------------------------------------------------


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
        with EventProducer(settings) as producer:
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
        batches=after.pushes - before.pushes,
        cpu_s=cpu,
    )


# -- (c) latency ---------------------------------------------------------------------------------


def background_load(settings: Settings, rate: float, stop: Any, sent: Any) -> None:
    """A separate process: re-keyed MovieLens events at ``rate``/s until ``stop`` is set."""
    records = [
        (event_key(LOAD_USER_BASE + e.user_id),
         e.model_copy(update={"user_id": LOAD_USER_BASE + e.user_id}).to_json_bytes())
        for e in movielens_events(load_ratings())
    ]  # fmt: skip
    with EventProducer(settings) as producer:
        start, count = time.perf_counter(), 0
        while not stop.is_set():
            due = int((time.perf_counter() - start) * rate)
            while count < due:
                producer.send_raw(*records[count % len(records)])
                count += 1
            sent.value = count
            time.sleep(0.01)


@dataclass
class Latency:
    label: str
    latencies_ms: list[float]
    probes: int
    load_events_per_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def probe_latency(
    settings: Settings, store: FeatureStoreClient, n: int, window_s: float, user_base: int
) -> tuple[list[float], int]:
    """Send ``n`` probes spread over ``window_s``; poll Feast for those outstanding every ~2 ms."""
    users = [user_base + i for i in range(n)]
    payloads = [
        Event(event_id=uuid.uuid4(), user_id=u, item_id=1, event_type="play", ts_ms=1)
        .to_json_bytes()
        for u in users
    ]  # fmt: skip
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    gap_s = window_s / n
    with EventProducer(settings) as producer:
        start = time.perf_counter()
        deadline = start + window_s + 30
        while (users or sent_at) and time.perf_counter() < deadline:
            now = time.perf_counter()
            i = n - len(users)
            if users and now >= start + i * gap_s:
                user = users.pop(0)
                sent_at[user] = time.perf_counter()
                producer.send_raw(event_key(user), payloads[i])
            if sent_at:
                lens = history_lens(store, list(sent_at))
                seen_at = time.perf_counter()
                for user, length in lens.items():
                    if length:
                        latencies.append(1000 * (seen_at - sent_at.pop(user)))
            time.sleep(0.002)
    return latencies, n - len(latencies)


# -- runs ----------------------------------------------------------------------------------------


def pipeline_settings(base: Settings, data_dir: Path, tag: str, **overrides: Any) -> Settings:
    values = {
        **base.model_dump(),
        "data_dir": data_dir,
        "kafka_bootstrap": "",
        "clickhouse_dsn": "",
        "worker_web_port": free_port(),
        "faust_app_id": f"hymirec-bench-{tag}",
        "events_topic": f"events-{tag}",
        "dead_letter_topic": f"dead-letter-{tag}",
        "training_topic": f"training-{tag}",
    }
    values.update(overrides)
    return Settings(**values)


def parse_variant(spec: str) -> tuple[dict[str, Any], dict[str, str]]:
    overrides: dict[str, Any] = {}
    env: dict[str, str] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key.startswith("HYMIREC_"):
            overrides[key.removeprefix("HYMIREC_").lower()] = value
        else:
            env[key] = value
    return overrides, env


def fmt_busy(run: EndToEnd) -> str:
    busy = sum(run.busy_s.values())
    phases = ", ".join(f"{k} {v:.1f}" for k, v in run.busy_s.items())
    return (
        f"{phases} (busy {busy:.1f} s of {run.total_s:.1f} s wall, "
        f"{100 * busy / run.total_s:.0f}%; the rest: Faust filling the next batch, or "
        "waiting for a CPU)"
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
                        broker_port=broker.port, events_topic="raw-events")  # fmt: skip
        try:
            ensure_topics(base)
            produce_rate = raw_produce(base, records)
            print(f"raw produce: {produce_rate:,.0f}/s", file=sys.stderr)
            consume_kp = raw_consume_kafka_python(base, base.events_topic, n)
            consume_aio = raw_consume_aiokafka(base, base.events_topic, n)
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
                ensure_topics(settings)
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
                        latencies = measure_latency(settings, store, worker, run, args)
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


def measure_latency(
    settings: Settings, store: FeatureStoreClient, worker: ServiceProcess, run: EndToEnd,
    args: argparse.Namespace,
) -> list[Latency]:  # fmt: skip
    idle_lat, idle_missing = probe_latency(
        settings, store, args.probes, args.probe_window_s, PROBE_USER_BASE
    )
    idle = Latency("idle", idle_lat, args.probes)
    if idle_missing:
        idle.notes.append(f"{idle_missing} probes not seen within 30 s")
    rate = args.load_fraction * run.events_per_s
    context = mp.get_context("spawn")
    stop, sent = context.Event(), context.Value("q", 0)
    loader = context.Process(target=background_load, args=(settings, rate, stop, sent))
    loader.start()
    try:
        while sent.value == 0 and loader.is_alive():  # it serializes its records first
            time.sleep(0.1)
        time.sleep(3.0)  # let the load reach a steady state before the first probe
        sent0, t0 = sent.value, time.perf_counter()
        loaded_lat, loaded_missing = probe_latency(
            settings, store, args.probes, args.probe_window_s, PROBE_USER_BASE + 1000
        )
        achieved = (sent.value - sent0) / (time.perf_counter() - t0)
    finally:
        stop.set()
        loader.join(timeout=60)
    loaded = Latency(f"load {args.load_fraction:.0%} of e2e", loaded_lat, args.probes, achieved)
    if loaded_missing:
        loaded.notes.append(f"{loaded_missing} probes not seen within 30 s")
    half = len(loaded_lat) // 2
    if half:
        loaded.notes.append(
            f"p50 of first/second half of probes {np.median(loaded_lat[:half]):.0f}/"
            f"{np.median(loaded_lat[half:]):.0f} ms (a rising second half means a growing backlog)"
        )
    return [idle, loaded]


def render(
    args: argparse.Namespace, argv: list[str] | None, load_start: float, produce_rate: float,
    consume_kp: float, consume_aio: float, runs: list[tuple[str, EndToEnd]],
    latencies: list[Latency],
) -> str:  # fmt: skip
    baseline = runs[0][1]
    cpu = baseline.cpu_s
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
        "from the sending process (time.perf_counter; includes the producer's 5 ms linger and "
        "the worker's 0.2 s batch window). Load average at the end: "
        f"{os.getloadavg()[0]:.2f}; every process shares the 2 cores.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| raw produce, kafka-python (events/s) | {produce_rate:,.0f} |",
        f"| raw consume, kafka-python (events/s) | {consume_kp:,.0f} |",
        f"| raw consume, aiokafka (events/s) | {consume_aio:,.0f} |",
        f"| end to end, broker → Faust → Feast online (events/s) | {baseline.events_per_s:,.0f} |",
        f"| end to end, 10%→90% of events online (events/s) | "
        f"{baseline.steady_events_per_s:,.0f} |",
        f"| end to end / raw consume kafka-python | {baseline.events_per_s / consume_kp:.2f} |",
        f"| end to end / raw consume aiokafka | {baseline.events_per_s / consume_aio:.2f} |",
        f"| end to end / raw produce | {baseline.events_per_s / produce_rate:.2f} |",
    ]
    for lat in latencies:
        load = f", load {lat.load_events_per_s:,.0f} events/s" if lat.load_events_per_s else ""
        lines.append(
            f"| latency {lat.label}{load}: p50 / p99 / max ms (n) | {lat.pct(50):.0f} / "
            f"{lat.pct(99):.0f} / {max(lat.latencies_ms, default=float('nan')):.0f} "
            f"({len(lat.latencies_ms)}/{lat.probes}) |"
        )
    lines += [
        "",
        f"End-to-end run: producer done after {baseline.produced_s:.1f} s, all online after "
        f"{baseline.total_s:.1f} s. Worker `busy_s` over the run (from its log): "
        f"{fmt_busy(baseline)}; {baseline.batches} batches. CPU seconds over the run: worker "
        f"{cpu['worker']:.1f}, broker {cpu['broker']:.1f}, benchmark (producer thread + "
        f"polling) {cpu['bench']:.1f}. The worker's event-loop thread was on a CPU "
        f"{100 * cpu['loop_cpu'] / baseline.total_s:.0f}% and runnable but waiting for a CPU "
        f"{100 * cpu['loop_wait'] / baseline.total_s:.0f}% of the run; machine CPU "
        f"pressure (PSI some): {100 * cpu['pressure'] / baseline.total_s:.0f}% of the run.",
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
            "| events/batch | busy_s apply, push, samples, table | CPU s worker / broker / bench "
            "| worker loop thread on CPU / waiting for CPU | CPU pressure "
            "| idle latency p50 / p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
            *(e2e_row(name, run) for name, run in runs),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
