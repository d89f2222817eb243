"""One model's incremental training on the sample stream, and its versions in the registry.

:class:`ModelTrainer` owns a model, its AdamW state, the per-user histories it learned from, and
the stream position: for each partition of the training topic, the next offset it has not yet
learned from. :meth:`ModelTrainer.learn` takes records in offset order, skips those below that
position (so a restart that re-reads a partition from an older offset trains on nothing twice),
ranks each new sample before learning it (test-then-train metrics, sampled: see
``model.training.online_metrics``), and takes AdamW steps on the examples
``model.training.online_core`` cuts; the
metadata states how many probes were ranked of how many.
:meth:`ModelTrainer.publish` writes weights, optimiser state, histories and stream position as
one registry version; the caller commits the consumer offsets only after that, so a crash at any
moment resumes from the last version and loses nothing.

``samples_seen`` counts distinct samples learned; ``sample_digest`` is the sum of their event
ids modulo 2**64, an order-free fingerprint that tests compare with the produced samples.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import zoo
from model.base import CatalogInfo
from model.checkpoint import (
    ONLINE_CHECKPOINT_FORMAT,
    extend_catalog,
    load_version_model,
    read_checkpoint_file,
    read_version_model,
)
from model.checkpoint_registry import CheckpointRegistry, PublishedVersion
from model.popularity import PopularityRecommender
from model.training.online_core import (
    PROBE_BUCKET_WIDTH,
    StreamHistories,
    examples_for_step,
    grow_model,
    grow_optimizer_state,
    make_batch,
)
from model.training.online_metrics import PREQUENTIAL_SAMPLE, PendingMetrics, Probe, code_version
from streaming.schema import TrainingSample

__all__ = [
    "ONLINE_CHECKPOINT_FORMAT",
    "PREQUENTIAL_SAMPLE",
    "ModelTrainer",
    "StreamRecord",
    "TrainerOptions",
    "load_version_model",
]

log = logging.getLogger(__name__)

_DIGEST_MOD = 2**64


@dataclass(frozen=True)
class StreamRecord:
    """A training sample with where it came from and when its event entered Kafka."""

    partition: int
    offset: int
    sample: TrainingSample
    ingest_ts_ms: int  # the sample's ingest_ts_ms, else the training record's own timestamp


@dataclass(frozen=True)
class TrainerOptions:
    lr: float = 1e-3
    weight_decay: float = 0.01
    step_batch_size: int = 32  # examples per AdamW step (the offline harness's batch size)
    replay_ratio: float = 1.0
    seed: int = 0
    device: str = "cpu"
    # Probes ranked per micro-batch, at most (None: every probe; the ranking then costs a
    # forward per sample, more than the training does for single-interest models).
    prequential_sample: int | None = PREQUENTIAL_SAMPLE
    # Probe history lengths that share one ranking forward (None: the plain reference path).
    prequential_bucket: int | None = PROBE_BUCKET_WIDTH


_CODE_VERSION = code_version()


class ModelTrainer:
    """One model learning from the stream; see the module docstring."""

    def __init__(
        self,
        name: str,
        catalog: CatalogInfo,
        options: TrainerOptions,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.options = options
        self.device = torch.device(options.device)
        self.defaults = zoo.training_defaults(name)
        self.base_catalog = catalog
        self.catalog = catalog
        values = dict(config or {})
        fields = {f.name for f in dataclasses.fields(zoo.make_config(name))}
        if "max_len" in fields:
            values.setdefault("max_len", self.defaults.max_len)
        self.config = dataclasses.asdict(zoo.make_config(name, **values))
        torch.manual_seed(options.seed)
        self.model = zoo.build(name, catalog, **self.config).to(self.device)
        self.optimizer = self._optimizer()
        self.histories = StreamHistories(self.defaults.max_len)
        self.offsets: dict[int, int] = {}
        self.samples_seen = 0
        self.duplicates = 0
        self.gaps = 0
        self.digest = 0
        self.steps = 0
        self.version: str | None = None
        self.pending = PendingMetrics()
        # Where the weights came from when not from scratch (an offline checkpoint), for the
        # version metadata; ``unpublished_start`` makes the first version publish at once.
        self.origin: dict[str, Any] | None = None
        self.unpublished_start = False

    def _optimizer(self) -> torch.optim.Optimizer | None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return None
        return torch.optim.AdamW(params, lr=self.options.lr, weight_decay=self.options.weight_decay)

    # --- the stream -------------------------------------------------------------------------

    def wants(self, partition: int, offset: int) -> bool:
        return offset >= self.offsets.get(partition, 0)

    def absorb(self, records: list[StreamRecord]) -> int:
        """Take records into the histories and counters without ranking or training on them:
        samples an offline-pretrained start stands for (``from_offline``). Returns how many were
        new samples."""
        new = 0
        for record in records:
            if not self.wants(record.partition, record.offset):
                continue
            self.offsets[record.partition] = record.offset + 1
            sample = record.sample
            if sample.seq < self.histories.next_seq(sample.user_id):
                self.duplicates += 1
                continue
            if self.histories.apply(sample) == "gap":
                self.gaps += 1
            new += 1
            self.samples_seen += 1
            self.digest = (self.digest + sample.event_id.int) % _DIGEST_MOD
        if self.origin is not None:
            self.origin["absorbed_samples"] = int(self.origin.get("absorbed_samples", 0)) + new
        return new

    def learn(self, records: list[StreamRecord]) -> int:
        """Learn from the records this model has not seen; return how many were new samples."""
        fresh = [r for r in records if self.wants(r.partition, r.offset)]
        if not fresh:
            return 0
        largest = max(max(r.sample.item_id, *r.sample.recent_item_ids, 0) for r in fresh)
        if largest > self.catalog.num_items:
            self._grow(largest)
        probe: list[Probe] = []
        counts: dict[int, int] = {}
        new = 0
        for record in fresh:
            sample = record.sample
            self.offsets[record.partition] = record.offset + 1
            user = sample.user_id
            if sample.seq < self.histories.next_seq(user):
                self.duplicates += 1
                continue
            history = self.histories.items(user)
            if history and sample.seq == self.histories.next_seq(user):
                probe.append((user, history[-self.defaults.max_len :], sample.item_id))
            if self.histories.apply(sample) == "gap":
                self.gaps += 1
            counts[user] = counts.get(user, 0) + 1
            new += 1
            self.samples_seen += 1
            self.digest = (self.digest + sample.event_id.int) % _DIGEST_MOD
            self.pending.ingest_ts_ms.append(record.ingest_ts_ms)
            newest = self.pending.newest_event_ts_ms
            self.pending.newest_event_ts_ms = max(newest or sample.ts_ms, sample.ts_ms)
        self.pending.samples += new
        if not new:
            return 0
        self._measure(probe)
        positions = {}
        for user, count in counts.items():
            end = len(self.histories.items(user))
            positions[user] = (max(0, end - count), end)
        self._train(positions)
        return new

    def _measure(self, probe: list[Probe]) -> None:
        """Rank a seeded draw of at most ``prequential_sample`` probes (all when fewer)."""
        self.pending.rank(
            self.model,
            probe,
            self.catalog.genres,
            self.device,
            limit=self.options.prequential_sample,
            bucket=self.options.prequential_bucket,
            seed=self.options.seed,
            step=self.steps,
        )

    def _train(self, positions: dict[int, tuple[int, int]]) -> None:
        if isinstance(self.model, PopularityRecommender):  # counts, no examples to cut
            counts = self.model.counts.clone()
            for user, (first, end) in positions.items():
                for item in self.histories.items(user)[first:end]:
                    counts[item] += 1
            self.model.fit(counts)
            self.steps += 1
            return
        rng = np.random.default_rng([self.options.seed, self.steps])
        examples = examples_for_step(
            self.histories, positions, self.defaults, self.options.replay_ratio, rng
        )
        if not examples or self.optimizer is None:
            return
        order = rng.permutation(len(examples))
        size = self.options.step_batch_size
        self.model.train()
        cuda = self.device.type == "cuda"
        for start in range(0, len(order), size):
            chunk = [examples[i] for i in order[start : start + size]]
            batch = make_batch(chunk, self.defaults.target_window).to(self.device)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=cuda):
                loss = self.model.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            self.optimizer.step()
            self.pending.losses.append(float(loss.detach()))
        self.steps += 1

    def _grow(self, num_items: int) -> None:
        old_rows = self.catalog.num_items + 1
        log.info("%s: catalogue grows from %d to %d items", self.name, old_rows - 1, num_items)
        self.catalog = extend_catalog(self.catalog, num_items)
        grown = zoo.build(self.name, self.catalog, **self.config).to(self.device)
        self.model = grow_model(self.model, grown, old_rows)
        old_optimizer, self.optimizer = self.optimizer, self._optimizer()
        if old_optimizer is not None and self.optimizer is not None:
            grow_optimizer_state(old_optimizer, self.optimizer, old_rows)

    # --- versions ---------------------------------------------------------------------------

    @property
    def has_pending(self) -> bool:
        return self.pending.samples > 0 or self.unpublished_start

    def metrics(self) -> dict[str, float]:
        """Mean loss and test-then-train ranking metrics since the last version
        (:meth:`PendingMetrics.metrics`)."""
        return self.pending.metrics()

    def _write(self, folder: Path, topic: str) -> dict[str, Any]:
        now_ms = int(time.time() * 1000)
        torch.save(
            {
                "format": ONLINE_CHECKPOINT_FORMAT,
                "model_name": self.name,
                "config": self.config,
                "num_items": self.catalog.num_items,
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            },
            folder / "model.pt",
        )
        torch.save(
            {
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
                "histories": self.histories.state(),
                "steps": self.steps,
            },
            folder / "trainer_state.pt",
        )
        newest_ingest = max(self.pending.ingest_ts_ms) if self.pending.ingest_ts_ms else None
        return {
            "topic": topic,
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "samples_seen": self.samples_seen,
            "samples_in_version": self.pending.samples,
            "duplicates_skipped": self.duplicates,
            "gaps": self.gaps,
            "sample_digest": f"{self.digest:016x}",
            "steps": self.steps,
            "num_items": self.catalog.num_items,
            "users": len(self.histories),
            "newest_event_ts_ms": self.pending.newest_event_ts_ms,
            "newest_ingest_ts_ms": newest_ingest,
            "newest_event_age_ms": now_ms - newest_ingest if newest_ingest is not None else None,
            "freshness_ms": self.pending.freshness_ms(now_ms),
            "metrics": self.metrics(),
            "prequential": self.pending.prequential_summary(self.options.prequential_sample),
            "config": self.config,
            "training": dataclasses.asdict(self.defaults),
            "options": dataclasses.asdict(self.options),
            "device": str(self.device),
            "code_version": _CODE_VERSION,
            "origin": self.origin,
        }

    def publish(self, store: CheckpointRegistry, topic: str, keep: int) -> PublishedVersion:
        """Write the current state as a new version; reset the per-version measurements."""
        published = store.publish(self.name, lambda folder: self._write(folder, topic), keep)
        self.version = published.version
        self.pending = PendingMetrics()
        self.unpublished_start = False
        return published

    @classmethod
    def from_offline(
        cls, path: Path, catalog: CatalogInfo, options: TrainerOptions
    ) -> ModelTrainer:
        """A trainer starting from an offline checkpoint
        (``model.training.offline.save_checkpoint``): its
        weights and config, a fresh optimiser, no stream position. Publish it before learning
        (``unpublished_start``), so serving gets the pretrained version at once."""
        from model.training.offline import load_checkpoint

        loaded = load_checkpoint(path, catalog)
        trainer = cls(loaded.name, catalog, options, dict(loaded.config))
        trainer.model.load_state_dict(loaded.model.state_dict())
        trainer.model.train()
        trainer.optimizer = trainer._optimizer()
        trainer.origin = {
            "kind": "offline_checkpoint",
            "path": str(path),
            "seed": loaded.seed,
            "offline_metrics": loaded.metrics,
            "absorbed_samples": 0,
        }
        trainer.unpublished_start = True
        return trainer

    @classmethod
    def resume(
        cls, published: PublishedVersion, catalog: CatalogInfo, options: TrainerOptions
    ) -> ModelTrainer:
        """The trainer exactly as the version left it: weights, AdamW moments, histories,
        stream position and counters."""
        meta = published.metadata
        trainer = cls(published.model, catalog, options, dict(meta["config"]))
        model, num_items = read_version_model(published, catalog, trainer.device)
        trainer.catalog = extend_catalog(catalog, num_items)
        trainer.model = model.train()
        trainer.optimizer = trainer._optimizer()
        state = read_checkpoint_file(published.path / "trainer_state.pt")
        if trainer.optimizer is not None and state["optimizer"]:
            trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.histories = StreamHistories.from_state(state["histories"])
        trainer.steps = int(state["steps"])
        trainer.offsets = {int(p): int(o) for p, o in meta["offsets"].items()}
        trainer.samples_seen = int(meta["samples_seen"])
        trainer.duplicates = int(meta["duplicates_skipped"])
        trainer.gaps = int(meta["gaps"])
        trainer.digest = int(meta["sample_digest"], 16)
        trainer.version = published.version
        trainer.origin = meta.get("origin")
        return trainer
