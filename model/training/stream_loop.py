"""``hymirec trainer``: the Kafka side of online training.

One consumer reads every partition of the training topic (manual assignment: a single trainer
owns the registry, see ``CheckpointRegistry.lock``, so there is no group rebalance to wait for).
It starts each partition at the lowest offset any model still needs, the offsets in each model's
``LATEST`` version; each model skips what it has already learned. Every model learns from the
same pooled stream (DESIGN.md: every arm trains on the traffic of all arms).

Every ``trainer_publish_every_samples`` samples or ``trainer_publish_every_s`` seconds, each model
with new samples publishes a version; only after all have published does the consumer commit
the group offsets (the lowest across models), which monitoring reads as the trainer's lag. A
SIGKILL between a publish and the commit costs nothing: the next start reads the offsets from
the versions, not from the group.

A record that is not a valid training sample, or names an item id above
``trainer_max_item_id``, goes to the dead-letter topic with the reason in its headers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from core.errors import BrokerError, ConfigError, TrainerError
from core.settings import Settings
from core.settings_groups import KafkaSettings, TrainerSettings
from model.base import CatalogInfo
from model.checkpoint_registry import CheckpointRegistry
from model.training.online import ModelTrainer, StreamRecord, TrainerOptions
from model.training.pretrain import pretrained_filename
from model.zoo import MODEL_NAMES
from streaming.fetch_backoff import install_kafka_python_backoff
from streaming.kafka_io import ensure_topics
from streaming.schema import TrainingSample

__all__ = ["TrainerReport", "check_models", "run_trainer"]

log = logging.getLogger(__name__)


@dataclass
class TrainerReport:
    """What a run of the trainer did (returned when it stops)."""

    records: int = 0
    samples: int = 0
    dead_letters: int = 0
    versions: dict[str, list[str]] = field(default_factory=dict)


def check_models(names: Sequence[str]) -> list[str]:
    """``names`` as a list, or ConfigError for an unknown name or none at all (the caller picks
    them: ``HYMIREC_TRAINER_MODELS``, else the experiments' models, in the CLI)."""
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        raise ConfigError(f"unknown models {unknown} to train; known: {', '.join(MODEL_NAMES)}")
    if not names:
        raise ConfigError("no models to train: set HYMIREC_TRAINER_MODELS or add experiments")
    return list(names)


def _device(trainer: TrainerSettings) -> str:
    import torch

    if trainer.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if trainer.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("HYMIREC_TRAINER_DEVICE asks for CUDA but no GPU is visible")
    return trainer.device


class _DeadLetters:
    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self._producer: KafkaProducer | None = None
        self.count = 0

    def send(self, record: ConsumerRecord, reason: str, detail: str) -> None:
        if self._producer is None:
            self._producer = KafkaProducer(
                bootstrap_servers=self.kafka.bootstrap,
                acks="all",
                max_request_size=self.kafka.max_message_bytes,
            )
        headers = [
            ("reason", reason.encode()),
            ("error", detail[:4000].encode()),
            ("source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        self._producer.send(
            self.kafka.dead_letter_topic,
            key=record.key,
            value=record.value,
            headers=headers,
        )
        self.count += 1
        log.warning(
            "dead-lettered %s/%d/%d: %s", record.topic, record.partition, record.offset, detail
        )

    def flush(self) -> None:
        if self._producer is not None:
            self._producer.flush(timeout=60)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()


def _parse(
    records: list[ConsumerRecord], max_item_id: int, dead: _DeadLetters
) -> list[StreamRecord]:
    parsed = []
    for record in records:
        try:
            sample = TrainingSample.model_validate_json(record.value or b"")
        except ValidationError as exc:
            dead.send(record, "validation", str(exc).replace("\n", " "))
            continue
        largest = max(sample.item_id, *sample.recent_item_ids, 0)
        if largest > max_item_id or min([sample.item_id, *sample.recent_item_ids]) < 1:
            dead.send(
                record,
                "item_id_out_of_range",
                f"item ids must be 1..{max_item_id} (HYMIREC_TRAINER_MAX_ITEM_ID)",
            )
            continue
        ingest = sample.ingest_ts_ms if sample.ingest_ts_ms is not None else record.timestamp
        parsed.append(StreamRecord(record.partition, record.offset, sample, int(ingest)))
    return parsed


def _start_trainers(
    names: Sequence[str],
    store: CheckpointRegistry,
    catalog: CatalogInfo,
    options: TrainerOptions,
    init_from: Path | None = None,
) -> dict[str, ModelTrainer]:
    trainers = {}
    for name in names:
        published = store.latest(name)
        if published is None and init_from is not None:
            path = init_from / pretrained_filename(name)
            if not path.is_file():
                raise ConfigError(
                    f"--init-from {init_from}: no {path.name} for model {name!r}; train it "
                    "offline first (`hymirec train --model NAME`) and put it there"
                )
            trainers[name] = ModelTrainer.from_offline(path, catalog, options)
            log.info("%s: no version yet, starting from the offline checkpoint %s", name, path)
        elif published is None:
            trainers[name] = ModelTrainer(name, catalog, options)
            log.info("%s: no version yet, starting from scratch", name)
        else:
            trainers[name] = ModelTrainer.resume(published, catalog, options)
            log.info(
                "%s: resumed from %s (%d samples seen)",
                name,
                published.version,
                trainers[name].samples_seen,
            )
    return trainers


def torch_threads(trainer: TrainerSettings) -> int:
    """Torch's intra-op threads: ``trainer_threads``, else one per CPU this process may use."""
    if trainer.threads > 0:
        return trainer.threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def run_trainer(
    settings: Settings,
    catalog: CatalogInfo,
    models: Sequence[str],
    stop: threading.Event | None = None,
    max_idle_s: float | None = None,
    init_from: Path | None = None,
) -> TrainerReport:
    """Consume the training topic until ``stop`` is set (or ``max_idle_s`` without records).

    ``init_from``: a folder of offline checkpoints (``<model>.pt``). A model with no version in
    the registry starts from its file there, and the samples already in the topic when the
    trainer starts are taken as learned by that offline run: they fill the trainer's histories
    and counters but are neither ranked nor trained on. Its first version is published as soon
    as it has caught up to where the topic ended at start-up.
    """
    import torch

    torch.set_num_threads(torch_threads(settings.trainer))
    names = check_models(models)
    stop = stop or threading.Event()
    store = CheckpointRegistry(settings.registry_dir)
    options = TrainerOptions(
        lr=settings.trainer.lr,
        replay_ratio=settings.trainer.replay_ratio,
        seed=settings.trainer.seed,
        device=_device(settings.trainer),
    )
    report = TrainerReport(versions={n: [] for n in names})
    with store.lock():
        trainers = _start_trainers(names, store, catalog, options, init_from)
        ensure_topics(settings.kafka)
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=settings.kafka.bootstrap,
                group_id=settings.trainer.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=settings.kafka.max_message_bytes,
                fetch_max_bytes=4 * settings.kafka.max_message_bytes,
            )
        except KafkaError as exc:
            raise BrokerError(f"cannot reach Kafka at {settings.kafka.bootstrap}: {exc}") from exc
        dead = _DeadLetters(settings.kafka)
        try:
            _consume(settings, consumer, trainers, store, dead, report, stop, max_idle_s)
        finally:
            dead.close()
            consumer.close(autocommit=False)
    return report


def _assign(
    settings: Settings,
    consumer: KafkaConsumer,
    trainers: dict[str, ModelTrainer],
    absorb_until: dict[str, dict[int, int]],
) -> list[TopicPartition]:
    """Assign every partition and seek to the lowest offset a model needs; fill
    ``absorb_until`` with the topic's end offsets for the models starting from an offline
    checkpoint."""
    topic = settings.kafka.training_topic
    deadline = time.monotonic() + 30
    partitions = consumer.partitions_for_topic(topic)
    while not partitions:
        if time.monotonic() > deadline:
            raise TrainerError(f"topic {topic} has no partitions on {settings.kafka.bootstrap}")
        time.sleep(0.2)
        partitions = consumer.partitions_for_topic(topic)
    assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(assigned)
    for tp in assigned:
        start = min(t.offsets.get(tp.partition, 0) for t in trainers.values())
        consumer.seek(tp, start)
    if any(t.unpublished_start for t in trainers.values()):
        ends = consumer.end_offsets(assigned)
        for name, trainer in trainers.items():
            if trainer.unpublished_start:
                absorb_until[name] = {tp.partition: int(ends[tp]) for tp in assigned}
    log.info(
        "trainer ready: %s on %s, models %s",
        topic,
        settings.kafka.bootstrap,
        ", ".join(f"{n} ({t.version or 'new'})" for n, t in trainers.items()),
    )
    return assigned


def _publish(
    settings: Settings,
    consumer: KafkaConsumer,
    trainers: dict[str, ModelTrainer],
    store: CheckpointRegistry,
    dead: _DeadLetters,
    report: TrainerReport,
    assigned: list[TopicPartition],
    absorbing: Collection[str] = (),
) -> None:
    dead.flush()  # a dead letter is stored before the offset that skips it is
    for name, trainer in trainers.items():
        if not trainer.has_pending or name in absorbing:
            continue  # an offline start publishes once it has caught up, not on the way
        metrics = trainer.metrics()
        published = trainer.publish(
            store, settings.kafka.training_topic, settings.trainer.keep_versions
        )
        report.versions[name].append(published.version)
        meta = published.metadata
        log.info(
            "%s %s published: %d samples seen, loss %s, prequential recall@50 %s, "
            "newest event age %s ms",
            name,
            published.version,
            trainer.samples_seen,
            f"{metrics['loss']:.4f}" if "loss" in metrics else "-",
            f"{metrics['prequential_recall@50']:.4f}"
            if "prequential_recall@50" in metrics
            else "-",
            meta.get("newest_event_age_ms"),
        )
    committed = {
        tp: OffsetAndMetadata(
            min(t.offsets.get(tp.partition, 0) for t in trainers.values()), "", -1
        )
        for tp in assigned
    }
    try:
        consumer.commit(committed)
    except KafkaError as exc:
        # The versions hold the offsets that matter; the group's copy only feeds lag monitors.
        log.warning("could not commit the trainer's group offsets (lag display only): %s", exc)


def _learn(
    trainer: ModelTrainer, records: list[StreamRecord], absorb_until: dict[int, int] | None
) -> int:
    """Learn ``records``; those below ``absorb_until`` (per partition) are only absorbed."""
    if absorb_until is None:
        return trainer.learn(records)
    before = [r for r in records if r.offset < absorb_until.get(r.partition, 0)]
    after = [r for r in records if r.offset >= absorb_until.get(r.partition, 0)]
    return trainer.absorb(before) + (trainer.learn(after) if after else 0)


def _consume(
    settings: Settings,
    consumer: KafkaConsumer,
    trainers: dict[str, ModelTrainer],
    store: CheckpointRegistry,
    dead: _DeadLetters,
    report: TrainerReport,
    stop: threading.Event,
    max_idle_s: float | None,
) -> None:
    absorb_until: dict[str, dict[int, int]] = {}
    assigned = _assign(settings, consumer, trainers, absorb_until)
    since_publish, last_publish = 0, time.monotonic()
    last_record = last_log = time.monotonic()
    logged_samples = 0
    # The embedded broker answers an empty fetch at once: pause after empty ones.
    install_kafka_python_backoff(consumer, settings.kafka.empty_fetch_backoff_ms)
    while not stop.is_set():
        polled = consumer.poll(timeout_ms=200, max_records=settings.trainer.batch_size)
        now = time.monotonic()
        records = sorted(
            (r for batch in polled.values() for r in batch), key=lambda r: (r.partition, r.offset)
        )
        if records:
            last_record = now
            report.records += len(records)
            parsed = _parse(records, settings.trainer.max_item_id, dead)
            new = [
                _learn(trainer, parsed, absorb_until.get(name))
                for name, trainer in trainers.items()
            ]
            report.samples += max(new, default=0)
            since_publish += len(records)
            report.dead_letters = dead.count
            # A dead-lettered record still moves every model past it.
            for record in records:
                for trainer in trainers.values():
                    if trainer.wants(record.partition, record.offset):
                        trainer.offsets[record.partition] = record.offset + 1
        caught_up = [
            name
            for name, ends in absorb_until.items()
            if all(trainers[name].offsets.get(p, 0) >= end for p, end in ends.items())
        ]
        for name in caught_up:
            del absorb_until[name]
            log.info("%s: caught up with the samples its offline start stands for", name)
        due = (
            bool(caught_up)
            or since_publish >= settings.trainer.publish_every_samples
            or (since_publish and now - last_publish >= settings.trainer.publish_every_s)
        )
        if due:
            _publish(settings, consumer, trainers, store, dead, report, assigned, absorb_until)
            since_publish, last_publish = 0, time.monotonic()
        if now - last_log >= 5.0:
            rate = (report.samples - logged_samples) / (now - last_log)
            log.info(
                "trainer: %d samples (%.0f/s), %s",
                report.samples,
                rate,
                ", ".join(f"{n} {t.version or '-'}" for n, t in trainers.items()),
            )
            last_log, logged_samples = now, report.samples
        if max_idle_s is not None and now - last_record >= max_idle_s:
            break
    if since_publish:
        _publish(settings, consumer, trainers, store, dead, report, assigned, absorb_until)
