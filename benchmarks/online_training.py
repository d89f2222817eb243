"""Online training on the stream vs the offline harness, trainer speed, and model freshness.

Part 1, quality: every ML-100K user's training part (the offline split: all but the last two
items) goes onto a fresh training topic as the stream worker would send it, in timestamp order;
``hymirec trainer``'s loop (in process, real broker) learns it in one pass; the last published
version is then scored with the offline evaluator on the offline test targets (full ranking, seen
items masked). The offline figures to compare with are in RESULTS.md (``benchmarks/offline_eval``).

Part 2, freshness in the demo setting: the embedded broker, the Faust worker (events -> Feast +
training samples) and the trainer as processes; ML-100K events are produced at a fixed rate; a
poller reads ``LATEST`` every 0.2 s as serving does. For each version: event entered Kafka ->
version published (the trainer's own per-sample figures in its metadata), and -> version visible
to the poller (those plus the publish-to-visible delay the poller measured).

    .venv/bin/python -m benchmarks.online_training [--models sasrec,hymirec] [--rate 100]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from kafka import KafkaProducer

from benchmarks.report import append_section, device, machine
from core.movielens import load_ratings
from core.settings import Settings
from features.item_features import build_item_features
from hymirec.processes import ServiceProcess
from model import zoo
from model.checkpoint_registry import CheckpointRegistry
from model.data import build_catalog, load_movielens_sequences
from model.training.offline import evaluate_model
from model.training.online import load_version_model
from model.training.stream_loop import run_trainer
from streaming.broker import LocalBroker
from streaming.kafka_io import EventProducer, ensure_topics
from streaming.replay import movielens_events
from streaming.schema import TrainingSample
from tests.conftest import EMBEDDING_CACHE, free_port

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _training_stream(
    data_items: tuple[np.ndarray, ...], user_ids: np.ndarray, stamps: tuple[np.ndarray, ...]
) -> list[TrainingSample]:
    """Each user's training part as samples, merged in timestamp order (stable)."""
    rows = []
    for user, items, ts in zip(user_ids.tolist(), data_items, stamps, strict=True):
        keep = len(items) - 2
        for seq in range(keep):
            rows.append((int(ts[seq]), int(user), seq, items))
    rows.sort(key=lambda r: r[0])
    now_ms = int(time.time() * 1000)
    return [
        TrainingSample(
            event_id=uuid.uuid4(),
            user_id=user,
            item_id=int(items[seq]),
            event_type="rating",
            ts_ms=ts * 1000,
            seq=seq,
            recent_item_ids=[int(i) for i in items[max(0, seq - 50) : seq]],
            ingest_ts_ms=now_ms,
        )
        for ts, user, seq, items in rows
    ]


def quality(settings: Settings, models: list[str], max_samples: int | None = None) -> list[str]:
    data = load_movielens_sequences()
    catalog = build_catalog(settings)
    # item index == ML-100K item id (1..1682), so samples carry indices directly
    assert np.array_equal(data.item_ids, np.arange(1, data.num_items + 1))
    samples = _training_stream(data.items, data.user_ids, data.timestamps_s)[:max_samples]
    ensure_topics(settings.kafka)
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all", linger_ms=5)
    for sample in samples:
        producer.send(
            settings.kafka.training_topic,
            key=str(sample.user_id).encode(),
            value=sample.model_dump_json().encode(),
        )
    producer.flush()
    producer.close()
    lines = []
    for name in models:
        torch.set_num_threads(2)
        start = time.perf_counter()
        report = run_trainer(settings, catalog, [name], max_idle_s=5.0)
        wall = time.perf_counter() - start - 5.0
        published = CheckpointRegistry(settings.registry_dir).latest(name)
        assert published is not None
        model = load_version_model(published, catalog)
        max_len = zoo.training_defaults(name).max_len
        test = evaluate_model(model, data, catalog.genres, "test", max_len)
        meta = published.metadata
        lines.append(
            f"| {name} | {meta['samples_seen']:,} | {report.samples / wall:,.0f} | "
            f"{test['recall@50']:.4f} | {test['ndcg@10']:.4f} | {test['diversity@50']:.3f} | "
            f"{len(report.versions[name])} |"
        )
        print(lines[-1], flush=True)
    return lines


def freshness(settings: Settings, models: list[str], rate: float, duration_s: float) -> list[str]:
    ensure_topics(settings.kafka)
    build_item_features(settings)
    store = CheckpointRegistry(settings.registry_dir)
    visible: dict[tuple[str, str], int] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for name in models:
                version = store.latest_version(name)
                if version is not None and (name, version) not in visible:
                    visible[(name, version)] = int(time.time() * 1000)
            time.sleep(0.2)

    worker = ServiceProcess("worker", ["worker"], settings).start()
    trainer = ServiceProcess("trainer", ["trainer", "--models", ",".join(models)], settings).start()
    poller = threading.Thread(target=poll, daemon=True)
    try:
        deadline = time.monotonic() + 180
        while "trainer ready" not in trainer.tail(500) and time.monotonic() < deadline:
            time.sleep(0.5)
        poller.start()
        events = movielens_events(load_ratings().head(int(rate * duration_s)))
        start = time.monotonic()
        with EventProducer(settings.kafka) as producer:
            for n, event in enumerate(events):
                wait = start + n / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                producer.send(event)
        time.sleep(3 * settings.trainer.publish_every_s)  # let the last versions land
    finally:
        stop.set()
        trainer.stop()
        worker.stop()
    lines = []
    for name in models:
        published, to_visible = [], []
        for version in store.versions(name):
            meta = store.read(name, version).metadata
            fresh = meta.get("freshness_ms")
            seen_ms = visible.get((name, version))
            if not fresh or seen_ms is None:
                continue
            delay = seen_ms - meta["published_at_ms"]
            count = meta["samples_in_version"]
            published.append((fresh["p50"], fresh["p99"], count))
            to_visible.append((fresh["p50"] + delay, fresh["p99"] + delay, count))
        if not published:
            lines.append(f"| {name} | no version was seen | | | |")
            continue
        weights = np.array([c for *_, c in published], dtype=float)
        p50_pub = float(np.average([p for p, _, _ in published], weights=weights))
        p99_pub = max(p for _, p, _ in published)
        p50_vis = float(np.average([p for p, _, _ in to_visible], weights=weights))
        p99_vis = max(p for _, p, _ in to_visible)
        lines.append(
            f"| {name} | {len(published)} | {p50_pub / 1000:.1f} / {p99_pub / 1000:.1f} | "
            f"{p50_vis / 1000:.1f} / {p99_vis / 1000:.1f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="sasrec,hymirec")
    parser.add_argument("--rate", type=float, default=100.0, help="events/s in part 2")
    parser.add_argument("--duration", type=float, default=120.0, help="s of events in part 2")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-freshness", action="store_true")
    parser.add_argument(
        "--max-samples", type=int, help="the first N samples of part 1 only (a smoke run)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    root = Path(tempfile.mkdtemp(prefix="hymirec-online-"))
    port = free_port()
    broker = LocalBroker(root / "broker", "127.0.0.1", port)
    broker.start()
    sections = []
    try:
        if not args.skip_quality:
            settings = Settings(
                data_dir=root / "quality",
                cache_dir=EMBEDDING_CACHE,
                broker_port=port,
                kafka_training_topic="bench-training",
                trainer_publish_every_samples=10_000,
                trainer_publish_every_s=600,
            )
            rows = quality(settings, models, args.max_samples)
            sections.append(
                "One pass over every user's training part ("
                + (
                    f"its first {args.max_samples:,} samples"
                    if args.max_samples
                    else "98,114 samples"
                )
                + ", timestamp order) "
                "through the real broker, micro-batches of 256, replay ratio 1, AdamW 1e-3, "
                "then the offline evaluator on the offline test targets.\n\n"
                "| model | samples learned | samples/s (incl. test-then-train) | Recall@50 | "
                "NDCG@10 | Div@50 | versions |\n|---|---:|---:|---:|---:|---:|---:|\n"
                + "\n".join(rows)
            )
        if not args.skip_freshness:
            settings = Settings(
                data_dir=root / "fresh",
                cache_dir=EMBEDDING_CACHE,
                broker_port=port,
                kafka_events_topic="bench-events",
                kafka_training_topic="bench-fresh-training",
                kafka_dead_letter_topic="bench-dead",
                worker_app_id="bench-fresh",
                worker_web_port=free_port(),
                trainer_publish_every_s=5.0,
                trainer_publish_every_samples=2000,
            )
            rows = freshness(settings, models, args.rate, args.duration)
            sections.append(
                f"Demo setting: broker + Faust worker + trainer as processes, ML-100K events at "
                f"{args.rate:.0f}/s for {args.duration:.0f} s, publish every 5 s or 2,000 "
                "samples, a poller reads LATEST every 0.2 s. Event entered Kafka -> version "
                "published, and -> version visible to a poller (p50 = sample-weighted mean of "
                "per-version medians; p99 = worst per-version p99).\n\n"
                "| model | versions | to published p50 / p99 (s) | to visible p50 / p99 (s) |\n"
                "|---|---:|---:|---:|\n" + "\n".join(rows)
            )
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = (
        f"## Online trainer ({stamp})\n\nMachine: {machine()}; device {device()} "
        f"(torch {torch.__version__}); `python -m benchmarks.online_training`.\n\n"
        + "\n\n".join(sections)
        + "\n"
    )
    print(report)
    append_section(args.results, report)


if __name__ == "__main__":
    main()
