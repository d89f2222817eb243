"""The Faust worker under measurement: how the pipeline benchmark starts it, reads its report
line, and counts what it and the other processes cost (CPU seconds, time waiting for a CPU)."""

from __future__ import annotations

import ast
import contextlib
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.pipeline_latency import history_lens
from core.errors import HymirecError
from core.settings import Settings
from features.store import FeatureStoreClient
from hymirec.processes import ServiceProcess
from streaming.kafka_io import EventProducer
from streaming.schema import Event

WARMUP_USER = 9_000_000
# The worker's report line (streaming/worker.py, every 10 s).
REPORT = re.compile(
    r"events=(\d+) .*?pushes=(\d+) .*?batches=(\d+) busy_s=(\{[^}]*\}) push_s=([\d.]+)"
)


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


@dataclass(frozen=True)
class WorkerReport:
    events: int
    pushes: int
    batches: int
    busy_s: dict[str, float]


def last_report(log_path: Path) -> WorkerReport | None:
    found = REPORT.findall(log_path.read_text(errors="replace")) if log_path.is_file() else []
    if not found:
        return None
    events, pushes, batches, busy, push_s = found[-1]
    busy_s = ast.literal_eval(busy)
    busy_s["push_in_publish"] = float(push_s)
    return WorkerReport(int(events), int(pushes), int(batches), busy_s)


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


def warm_up(settings: Settings, store: FeatureStoreClient, worker: ServiceProcess) -> WorkerReport:
    """One event through the whole pipeline, then the worker's report of it (so it is idle)."""
    with EventProducer(settings.kafka) as producer:
        producer.send(Event(event_id=uuid.uuid4(), user_id=WARMUP_USER, item_id=1,
                            event_type="play", ts_ms=1))  # fmt: skip
    deadline = time.monotonic() + 120
    while not history_lens(store, [WARMUP_USER])[WARMUP_USER]:
        if not worker.alive() or time.monotonic() > deadline:
            raise HymirecError(f"the warm-up event never reached Feast:\n{worker.tail()}")
        time.sleep(0.2)
    return wait_report(worker, 1)


def pipeline_settings(base: Settings, data_dir: Path, tag: str, **overrides: Any) -> Settings:
    values = {
        **base.model_dump(),
        "data_dir": data_dir,
        "kafka_bootstrap": "",
        "clickhouse_dsn": "",
        "worker_web_port": free_port(),
        "worker_app_id": f"hymirec-bench-{tag}",
        "kafka_events_topic": f"events-{tag}",
        "kafka_dead_letter_topic": f"dead-letter-{tag}",
        "kafka_training_topic": f"training-{tag}",
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
