"""What the embedded broker keeps across a restart, and the pipeline under repeated SIGKILLs.

Part 1, the broker (noida-db 0.2.3). A kafka-python producer (acks=all; idempotence and retries
off, so the figures are the broker's alone) sends small numbered records as fast as it can from a
thread, flushing every 50, and records each acknowledgement. After a seeded random 1.5-3 s the
broker gets SIGTERM or SIGKILL. Once it is gone, its data folder is copied and a new broker is
started on the copy (another port: records the producer still held cannot reach it), and every
record is read back. "acknowledged, lost" = acknowledged before the broker died and absent after
the restart; "window" = that count at the run's acknowledgement rate. Also measured: on a quiet
broker, the delay from one acknowledged record to the next save of its state file
(``<data>/kafka.json``, written to a temporary file and renamed).

Part 2 (``--chaos``), the pipeline: ``tests/integration/test_no_loss_under_kills.py``'s scenario
on a fresh broker: 100,000 ML-100K ratings and 500 impressions through the Faust worker, the
ClickHouse sink and the trainer (``popular``), each SIGKILLed 3 times at random moments and
restarted; the figures of that run, after checking its counts as the test does (histories,
ClickHouse per event type, trainer samples).

    .venv/bin/python -m benchmarks.fault_injection [--trials 3] [--no-broker] \
        [--chaos [--seeds 8 1 2]]

``--seeds`` runs the pipeline scenario once per seed (other kill moments and impressions); the
test itself runs a smaller stream (30,000 ratings) to keep the suite short.

Prints markdown and appends it, with the date and the machine, to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from benchmarks.report import append_section, machine
from core.settings import Settings
from streaming.broker import LocalBroker
from tests.conftest import free_port

if TYPE_CHECKING:
    from tests.integration.test_no_loss_under_kills import Stream

TOPIC = "durability"


@dataclass(frozen=True)
class Trial:
    signal: str
    run_s: float
    acked: int
    kept: int
    lost: int
    unacked_kept: int

    @property
    def rate(self) -> float:
        return self.acked / self.run_s

    @property
    def window_ms(self) -> float:
        return 1000 * self.lost / self.rate


def _wait(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _port_closed(broker: LocalBroker) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((broker.host, broker.port)) != 0


def _read_all(address: str) -> list[int]:
    consumer = KafkaConsumer(
        bootstrap_servers=address, auto_offset_reset="earliest", enable_auto_commit=False
    )
    part = TopicPartition(TOPIC, 0)
    consumer.assign([part])
    end = consumer.end_offsets([part])[part]
    values: list[int] = []
    while consumer.position(part) < end:
        for records in consumer.poll(timeout_ms=500).values():
            values.extend(int(r.value) for r in records)
    consumer.close()
    return values


def _started_broker(folder: Path) -> LocalBroker:
    broker = LocalBroker(folder, port=free_port())
    broker.start()
    admin = KafkaAdminClient(bootstrap_servers=broker.address)
    admin.create_topics([NewTopic(TOPIC, 1, 1)])
    admin.close()
    return broker


def broker_trial(folder: Path, signal_name: str, run_s: float) -> Trial:
    broker = _started_broker(folder / "broker")
    producer = KafkaProducer(
        bootstrap_servers=broker.address,
        acks="all",
        linger_ms=2,
        enable_idempotence=False,
        retries=0,
        delivery_timeout_ms=5000,
        request_timeout_ms=2000,
    )
    acked: set[int] = set()
    stop = threading.Event()

    def send() -> None:
        n = 0
        while not stop.is_set():
            producer.send(TOPIC, b"%d" % n).add_callback(lambda _, n=n: acked.add(n))
            n += 1
            if n % 50 == 0:
                # The broker going away mid-flush is the point here.
                with contextlib.suppress(Exception):
                    producer.flush(timeout=5)

    sender = threading.Thread(target=send, daemon=True)
    started = time.monotonic()
    sender.start()
    time.sleep(run_s)  # the moment of the fault
    if signal_name == "SIGTERM":
        broker.stop()
    else:
        broker.kill()
    elapsed = time.monotonic() - started
    _wait(lambda: _port_closed(broker), 30, "the port to close")
    before = set(acked)
    stop.set()
    sender.join(30)
    # Restart on a copy of the data folder, on a new port, so nothing the producer still held
    # (it retries to the old address until its delivery timeout) can arrive afterwards.
    shutil.copytree(broker.broker_dir / "data", folder / "copy" / "data")
    copy = LocalBroker(folder / "copy", port=free_port())
    copy.start()
    try:
        kept = _read_all(copy.address)
    finally:
        copy.stop()
    producer.close(timeout=10)
    present = set(kept)
    return Trial(
        signal=signal_name,
        run_s=elapsed,
        acked=len(before),
        kept=len(kept),
        lost=len(before - present),
        unacked_kept=len(present - before),
    )


def save_delays(folder: Path, samples: int, rng: random.Random) -> list[float]:
    """On a quiet broker: seconds from one acknowledged record to the next state-file save."""
    broker = _started_broker(folder / "broker")
    state = broker.broker_dir / "data" / "kafka.json"
    producer = KafkaProducer(bootstrap_servers=broker.address, acks="all")
    delays = []
    try:
        producer.send(TOPIC, b"warm").get(timeout=30)
        _wait(state.exists, 30, "the first save")
        for _ in range(samples):
            time.sleep(rng.uniform(0.3, 1.7))  # a random moment relative to the save timer
            before = state.stat().st_mtime_ns
            start = time.monotonic()
            producer.send(TOPIC, b"x").get(timeout=30)

            def saved(before: int = before) -> bool:
                return state.stat().st_mtime_ns != before

            _wait(saved, 30, "a save")
            delays.append(time.monotonic() - start)
    finally:
        producer.close()
        broker.stop()
    return delays


def broker_section(trials: int, seed: int) -> str:
    rng = random.Random(seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hymirec-faults-") as tmp:
        for k, signal_name in enumerate(["SIGTERM"] * trials + ["SIGKILL"] * trials):
            trial = broker_trial(Path(tmp) / f"t{k}", signal_name, rng.uniform(1.5, 3.0))
            print(trial, flush=True)
            rows.append(trial)
        delays = save_delays(Path(tmp) / "saves", 15, rng)
    lines = [
        "| signal | ran s | acknowledged | read after restart | acknowledged, lost "
        "| window ms | unacknowledged, kept |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in rows:
        lines.append(
            f"| {t.signal} | {t.run_s:.2f} | {t.acked:,} | {t.kept:,} | {t.lost:,} "
            f"| {t.window_ms:.0f} | {t.unacked_kept:,} |"
        )
    lines += [
        "",
        f"Quiet broker, one record to the next save of its state: median "
        f"{statistics.median(delays):.2f} s, min {min(delays):.2f}, max {max(delays):.2f} "
        f"(n={len(delays)}).",
    ]
    return "\n".join(lines)


def chaos_section(seed: int) -> str:
    from features.item_features import build_item_features
    from streaming.kafka_io import ensure_topics
    from tests.conftest import EMBEDDING_CACHE
    from tests.integration.test_no_loss_under_kills import build_stream, run_chaos

    with tempfile.TemporaryDirectory(prefix="hymirec-chaos-") as tmp:
        broker = LocalBroker(Path(tmp) / "broker", port=free_port())
        broker.start()
        try:
            values: dict[str, Any] = {
                "data_dir": Path(tmp) / "data",
                "cache_dir": EMBEDDING_CACHE,
                "broker_port": broker.port,
                "worker_web_port": free_port(),
                "features_recent_len": 20,
                "features_long_len": 300,
                "sink_batch_size": 2000,
                "sink_batch_window_s": 0.5,
                "trainer_models": "popular",
                "trainer_batch_size": 1024,
                "trainer_publish_every_samples": 2000,
                "trainer_publish_every_s": 1.0,
            }
            settings = Settings(**values)
            ensure_topics(settings.kafka)
            build_item_features(settings)
            stream = build_stream(impressions=500, seed=seed)
            started = time.monotonic()
            report = run_chaos(settings, stream, kills_per_service=3, seed=seed, on_event=print)
            total_s = time.monotonic() - started
            checks = _chaos_checks(settings, stream)
        finally:
            broker.stop()
    lines = [
        f"Produced and killed in {report.produced_s:.0f} s; every stage done "
        f"{report.settled_s:.0f} s after the first send ({total_s:.0f} s with start-up and "
        f"SIGTERM stops; exit codes {report.stop_codes}).",
        "",
        "| chunk | SIGKILL | s after progress | its input not yet durable |",
        "|---:|---|---:|---:|",
        *(f"| {f.chunk} | {f.service} | {f.delay_s:.2f} | {f.backlog:,} |" for f in report.faults),
        "",
        checks,
    ]
    return "\n".join(lines)


def _chaos_checks(settings: Settings, stream: Stream) -> str:
    """The test's counts, as figures (the test asserts them)."""
    from abtest.clickhouse import analytics_client, query_df
    from features.store import FeatureStoreClient
    from model.checkpoint_registry import CheckpointRegistry

    online = FeatureStoreClient(settings).user_histories(sorted(stream.histories))
    exact = 0
    for user, items in stream.histories.items():
        row = online[user]
        exact += row is not None and row.history_len == len(items)
    with analytics_client(settings.clickhouse) as client:
        kinds = query_df(client, "SELECT event_type, count() AS n FROM events FINAL GROUP BY 1")
    stored = dict(zip(kinds["event_type"], kinds["n"].astype(int).tolist(), strict=True))
    produced = dict(Counter(e.event_type for e in stream.events))
    latest = CheckpointRegistry(settings.registry_dir).latest("popular")
    meta = latest.metadata if latest is not None else {}
    digest = f"{sum(e.event_id.int for e in stream.positives) % 2**64:016x}"
    return (
        f"Users with exact online history_len: {exact}/{len(stream.histories)}. "
        f"ClickHouse (FINAL) per type: {stored}, produced {produced}. Trainer: samples_seen "
        f"{meta.get('samples_seen')} of {len(stream.positives)} positives, digest "
        f"{'matches' if meta.get('sample_digest') == digest else 'DIFFERS'}, "
        f"{meta.get('duplicates_skipped')} repeated samples skipped."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=3, help="broker kills per signal")
    parser.add_argument("--chaos", action="store_true", help="also run the pipeline scenario")
    parser.add_argument("--seed", type=int, default=8, help="the broker part's seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[8], help="one chaos run each")
    parser.add_argument("--no-broker", action="store_true", help="skip the broker part")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # connection errors are the point
    load_before = os.getloadavg()[0]
    broker = None if args.no_broker else broker_section(args.trials, args.seed)
    chaos = [(seed, chaos_section(seed)) for seed in args.seeds] if args.chaos else []
    command = " ".join(["python -m benchmarks.fault_injection", *(argv or sys.argv[1:])])
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        f"## Fault injection — {when} — {machine()}",
        "",
        f"Command: `{command}`. 1-minute load average at start: {load_before:.2f}.",
        "",
    ]
    if broker is not None:
        parts += ["### noida-db 0.2.3 across SIGTERM and SIGKILL, under a full-speed producer", ""]
        parts += [broker, ""]
    for seed, section in chaos:
        parts += [
            f"### 100,500 events, worker, sink and trainer SIGKILLed 3 times each (seed {seed})",
            "",
            section,
            "",
        ]
    report = "\n".join(parts)
    print(report)
    append_section(args.results, report)


if __name__ == "__main__":
    main()
