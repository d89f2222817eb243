"""The embedded stack at rest: each process's CPU with no traffic, and the first record after idle.

Starts what ``hymirec demo`` starts, on a broker of its own (a free port, a temp
``HYMIREC_DATA_DIR``): the noida-db broker, the Faust worker, the ClickHouse sink (publishing the
readout snapshots, as in the demo), the online trainer, the recommendation service and the
dashboard, each a ``hymirec`` child process. Once per ``--backoff-ms`` value of the pause after
empty fetches (``HYMIREC_KAFKA_EMPTY_FETCH_BACKOFF_MS``; default: the setting's default, then 0,
off). Each time:

(a) once every component has handled one warm-up event and ``--settle-s`` more have passed, each
    process's CPU (utime + stime from ``/proc/<pid>/stat``, its child processes included) over
    ``--window-s`` seconds with no traffic, in % of one core;
(b) ``--rounds`` times: after ``--idle-s`` seconds of quiet, one ``play`` event for a new user,
    and the time from its send until the worker has applied it (the user's ``history_len`` in
    Feast, polled every ~2 ms), the sink has inserted and committed it, and the trainer has
    learned its training sample and committed it (the groups' committed offsets of the record's
    partition, polled likewise).

So that (b) sees a record as soon as it is consumed, the sink inserts each batch at once
(``sink_batch_size`` 1) and the trainer publishes after every sample
(``trainer_publish_every_samples`` 1) and trains only ``popular`` (a cheap publish); neither
changes what they do at rest. The service serves the popularity prior (no model is published).

    .venv/bin/python -m benchmarks.idle_stack [--results PATH]

Prints a markdown table and appends it, with the date and the machine, to ``--results``
(default benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from benchmarks.pipeline_throughput import cpu_s, free_port, history_lens
from benchmarks.report import append_section, machine
from core.errors import HymirecError
from core.settings import Settings
from core.settings_groups import KafkaSettings
from features.item_features import build_item_features
from features.store import FeatureStoreClient
from hymirec.processes import ServiceProcess
from streaming.broker import LocalBroker
from streaming.kafka_io import EventProducer, ensure_topics, event_key
from streaming.schema import Event

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
COMPONENTS = ("worker", "sink", "trainer", "serve", "dashboard")
CONSUMERS = ("worker", "sink", "trainer")
WARMUP_USER = 9_000_000
PROBE_USER_BASE = 10_000_000


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds of a process and of its live descendants."""
    if pid is None:
        return float("nan")
    try:
        total = cpu_s(pid)
    except OSError:
        return float("nan")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        total += sum(tree_cpu_s(int(child)) for child in children)
    return total


@dataclass
class StackRun:
    backoff_ms: int
    cpu_pct: dict[str, float] = field(default_factory=dict)  # process -> % of one core
    first_record_ms: dict[str, list[float]] = field(default_factory=dict)


class Stack:
    """The broker and the demo's components, started with ``settings``."""

    def __init__(self, settings: Settings, broker: LocalBroker) -> None:
        self.settings = settings
        self.broker = broker
        self.broker_pid: int | None = None
        self.children: dict[str, ServiceProcess] = {}

    def pids(self) -> dict[str, int | None]:
        return {"broker": self.broker_pid} | {n: p.pid for n, p in self.children.items()}

    def check(self) -> None:
        for name, process in self.children.items():
            if not process.alive():
                raise HymirecError(f"the {name} exited:\n{process.tail()}")

    def wait(self, condition: Callable[[], object], what: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            self.check()
            if time.monotonic() > deadline:
                raise HymirecError(f"gave up after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.5)


@contextmanager
def running_stack(settings: Settings, base: Path) -> Iterator[Stack]:
    for folder in ("codebook", "feast"):  # item features built once, in ``base``
        shutil.copytree(base / folder, settings.data_dir / folder)
    broker = LocalBroker(settings.broker_dir, settings.broker.host, settings.broker.port)
    stack = Stack(settings, broker)
    stack.broker_pid = broker.start().pid
    try:
        ensure_topics(settings.kafka)
        for name, args in (
            ("worker", ["worker"]),
            ("sink", ["sink", "--publish-readouts"]),
            ("trainer", ["trainer"]),
            ("serve", ["serve"]),
            ("dashboard", ["dashboard"]),
        ):
            stack.children[name] = ServiceProcess(name, args, settings).start()
        yield stack
    finally:
        for process in reversed(list(stack.children.values())):
            process.stop()
        broker.stop()


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


class Probe:
    """Whether each consumer has taken an event: Feast for the worker, the sink's and the
    trainer's committed offsets of the record's partition for the others."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = FeatureStoreClient(settings)
        self.groups = {
            "sink": (settings.sink.group_id, settings.kafka.events_topic),
            "trainer": (settings.trainer.group_id, settings.kafka.training_topic),
        }
        self.consumers = {
            name: KafkaConsumer(
                bootstrap_servers=settings.kafka.bootstrap, group_id=group, enable_auto_commit=False
            )  # never subscribes: it only reads the group's committed offsets
            for name, (group, _) in self.groups.items()
        }

    def close(self) -> None:
        for consumer in self.consumers.values():
            consumer.close()

    def committed(self, name: str, user: int) -> int:
        # Events and training samples are keyed by user (str(user_id)) and partitioned by
        # murmur2, as the Java client, kafka-python and aiokafka all do.
        partition = (
            murmur2(event_key(user)) & 0x7FFFFFFF
        ) % self.settings.kafka.events_topic_partitions
        tp = TopicPartition(self.groups[name][1], partition)
        return int(self.consumers[name].committed(tp) or 0)

    def send_and_time(self, user: int, timeout_s: float = 120) -> dict[str, float]:
        """Send one play event for ``user``; ms until each consumer has taken it."""
        before = {name: self.committed(name, user) for name in self.groups}
        checks: dict[str, Callable[[], bool]] = {
            "worker": lambda: bool(history_lens(self.store, [user])[user]),
            "sink": lambda: self.committed("sink", user) > before["sink"],
            "trainer": lambda: self.committed("trainer", user) > before["trainer"],
        }
        event = Event(event_id=uuid.uuid4(), user_id=user, item_id=1, event_type="play", ts_ms=1)
        with EventProducer(self.settings.kafka) as producer:
            sent = time.perf_counter()
            producer.send(event)
            producer.flush()
            seen: dict[str, float] = {}
            while len(seen) < len(checks):
                for name, check in checks.items():
                    if name not in seen and check():
                        seen[name] = 1000 * (time.perf_counter() - sent)
                if time.perf_counter() - sent > timeout_s:
                    missing = sorted(set(checks) - set(seen))
                    raise HymirecError(f"user {user}'s event never reached {missing}")
                time.sleep(0.002)
        return seen


def measure(settings: Settings, base: Path, args: argparse.Namespace) -> StackRun:
    run = StackRun(settings.kafka.empty_fetch_backoff_ms)
    label = f"back-off {run.backoff_ms} ms"
    with running_stack(settings, base) as stack:
        probe = Probe(settings)
        try:
            stack.wait(
                lambda: http_ok(f"http://{settings.serve.host}:{settings.serve.port}/health/ready"),
                "the service to be ready",
            )
            stack.wait(
                lambda: http_ok(f"http://127.0.0.1:{settings.dashboard.port}/_stcore/health"),
                "the dashboard to answer",
            )
            warm = probe.send_and_time(WARMUP_USER, timeout_s=300)  # every consumer is up
            print(f"[{label}] up; warm-up event taken in {warm}", file=sys.stderr, flush=True)
            time.sleep(args.settle_s)
            stack.check()
            pids = stack.pids()
            before = {name: tree_cpu_s(pid) for name, pid in pids.items()}
            bench0, start = time.process_time(), time.monotonic()
            time.sleep(args.window_s)
            elapsed = time.monotonic() - start
            for name, pid in pids.items():
                run.cpu_pct[name] = 100 * (tree_cpu_s(pid) - before[name]) / elapsed
            run.cpu_pct["benchmark"] = 100 * (time.process_time() - bench0) / elapsed
            print(f"[{label}] CPU % at rest: {run.cpu_pct}", file=sys.stderr, flush=True)
            stack.check()
            for round_ in range(args.rounds):
                time.sleep(args.idle_s)
                taken = probe.send_and_time(PROBE_USER_BASE + round_)
                for name in CONSUMERS:
                    run.first_record_ms.setdefault(name, []).append(taken[name])
                print(f"[{label}] round {round_}: {taken}", file=sys.stderr, flush=True)
            stack.check()
        finally:
            probe.close()
    return run


def stack_settings(root: Path, cache_dir: Path, backoff_ms: int) -> Settings:
    return Settings(
        data_dir=root,
        cache_dir=cache_dir,
        broker_port=free_port(),
        worker_web_port=free_port(),
        serve_port=free_port(),
        dashboard_port=free_port(),
        kafka_empty_fetch_backoff_ms=backoff_ms,
        sink_batch_size=1,
        trainer_publish_every_samples=1,
        trainer_models="popular",
        trainer_threads=1,
    )


def render(runs: list[StackRun], args: argparse.Namespace, argv: list[str]) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python -m benchmarks.idle_stack", *argv])
    heads = [f"back-off {r.backoff_ms} ms" if r.backoff_ms else "off (0)" for r in runs]
    lines = [
        f"## The embedded stack at rest ({stamp})",
        "",
        f"Machine: {machine()}; `{command}`.",
        "",
        "Broker, worker, sink (publishing readouts), trainer, service and dashboard as "
        "`hymirec demo` starts them, with no traffic: each process's CPU (utime + stime, child "
        f"processes included) over {args.window_s:.0f} s, {args.settle_s:.0f} s after every "
        "consumer took one warm-up event, in % of one core, per value of "
        "`HYMIREC_KAFKA_EMPTY_FETCH_BACKOFF_MS`.",
        "",
        "| process | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for name in ("broker", *COMPONENTS, "benchmark"):
        lines.append(f"| {name} | " + " | ".join(f"{r.cpu_pct[name]:.1f}%" for r in runs) + " |")
    totals = [sum(v for k, v in r.cpu_pct.items() if k != "benchmark") for r in runs]
    lines.append("| **stack total** | " + " | ".join(f"**{t:.1f}%**" for t in totals) + " |")
    lines += [
        "",
        f"First record after {args.idle_s:.0f} s idle: ms from the send (acknowledged) until the "
        "worker has applied it (Feast `history_len`), the sink has inserted and committed it, the "
        "trainer has learned and committed its training sample (polled every ~2 ms); median "
        f"(each of {args.rounds} rounds).",
        "",
        "| consumer | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for name in CONSUMERS:
        cells = []
        for r in runs:
            values = r.first_record_ms[name]
            each = ", ".join(f"{v:.0f}" for v in values)
            cells.append(f"{float(np.median(values)):.0f} ({each})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cache-dir", type=Path, default=Path(".hymirec/cache"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--backoff-ms",
        type=int,
        nargs="+",
        default=[KafkaSettings.model_fields["empty_fetch_backoff_ms"].default, 0],
        help="one stack per value of the setting (default: its default, then 0: off)",
    )
    parser.add_argument("--settle-s", type=float, default=10.0)
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="hymirec-idle-") as tmp:
        root = Path(tmp)
        base = Settings(data_dir=root / "base", cache_dir=args.cache_dir.resolve())
        build_item_features(base)  # needs no broker: codebook and item views, copied per run
        for backoff_ms in args.backoff_ms:
            settings = stack_settings(
                root / f"run-{backoff_ms}", args.cache_dir.resolve(), backoff_ms
            )
            runs.append(measure(settings, base.data_dir, args))
    report = render(runs, args, argv)
    print(report)
    append_section(args.results, report)


if __name__ == "__main__":
    main()
