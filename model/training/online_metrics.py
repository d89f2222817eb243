"""What a :class:`model.training.online.ModelTrainer` measures between two published versions.

Each new sample is ranked before the model learns it (test-then-train, "prequential"
evaluation). The ranking is sampled: at most ``prequential_sample`` of a micro-batch's probes
(seeded draw), each standing for ``probes / ranked`` of them, so the version's prequential metrics
estimate the mean over every probe (a stratified estimate; exact when no micro-batch had more
probes than that). Beside them: the training losses and the ingest times behind the version's
freshness.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.base import SequentialRecommender
from model.training.online_core import Example, prequential_metrics

__all__ = ["PREQUENTIAL_SAMPLE", "PendingMetrics", "Probe", "code_version"]

PREQUENTIAL_SAMPLE = 32  # test-then-train probes ranked per micro-batch, at most

# A sample's test-then-train probe, taken before the sample is applied: (user, the user's kept
# history then, the sample's item). Turned into an Example only if the draw ranks it.
Probe = tuple[int, list[int], int]


@dataclass
class PendingMetrics:
    """What happened since the last published version (for its metadata)."""

    losses: list[float] = field(default_factory=list)
    ingest_ts_ms: list[int] = field(default_factory=list)
    newest_event_ts_ms: int | None = None
    prequential_sums: dict[str, float] = field(default_factory=dict)  # weighted by probes/ranked
    prequential_count: int = 0  # probes ranked
    prequential_probes: int = 0  # probes the ranked ones stand for
    samples: int = 0

    def rank(
        self,
        model: SequentialRecommender,
        probe: list[Probe],
        genres: list[frozenset[str]],
        device: torch.device,
        *,
        limit: int | None,
        bucket: int | None,
        seed: int,
        step: int,
    ) -> None:
        """Rank a draw of at most ``limit`` probes (all when fewer, or when ``limit`` is None),
        seeded by ``(seed, step)``, and add their metrics, weighted, to the sums."""
        if not probe:
            return
        chosen: list[int] | range = range(len(probe))
        if limit is not None and len(probe) > limit:
            rng = np.random.default_rng([seed, step, 1])
            chosen = sorted(rng.choice(len(probe), size=limit, replace=False).tolist())
        examples = []
        for i in chosen:
            user, kept, item = probe[i]
            history = np.asarray(kept, dtype=np.int64)
            zero = np.zeros(1, dtype=np.int64)
            target = np.array([item], dtype=np.int64)
            examples.append(Example(user, history, np.zeros_like(history), target, zero))
        scored = prequential_metrics(model, examples, genres, device, bucket)
        weight = len(probe) / scored.users  # each ranked probe stands for this many
        sums = self.prequential_sums
        for key, value in scored.result().items():
            if not key.startswith("coverage"):
                sums[key] = sums.get(key, 0.0) + value * scored.users * weight
        self.prequential_count += scored.users
        self.prequential_probes += len(probe)

    def metrics(self) -> dict[str, float]:
        """Mean loss and test-then-train ranking metrics: each metric is the estimated mean over
        every probe; ``prequential_examples`` probes were ranked of ``prequential_sampled_from``
        (equal when the metrics are exact)."""
        out: dict[str, float] = {}
        if self.losses:
            out["loss"] = float(np.mean(self.losses))
        count, probes = self.prequential_count, self.prequential_probes
        if count:
            for key, total in sorted(self.prequential_sums.items()):
                out[f"prequential_{key}"] = total / probes
            out["prequential_examples"] = float(count)
            out["prequential_sampled_from"] = float(probes)
        return out

    def freshness_ms(self, now_ms: int) -> dict[str, float] | None:
        """Percentiles of the samples' ages at ``now_ms`` since they entered Kafka (None when
        there were none)."""
        ages = np.asarray([now_ms - ts for ts in self.ingest_ts_ms], dtype=np.float64)
        if not len(ages):
            return None
        return {
            "p50": float(np.percentile(ages, 50)),
            "p99": float(np.percentile(ages, 99)),
            "max": float(ages.max()),
        }

    def prequential_summary(self, max_ranked: int | None) -> dict[str, Any]:
        """How big a sample the prequential metrics are: a reader sees an estimate."""
        return {
            "ranked": self.prequential_count,
            "probes": self.prequential_probes,
            "samples_learned": self.samples,
            "max_ranked_per_micro_batch": max_ranked,
            "exact": self.prequential_count == self.prequential_probes,
        }


def code_version() -> str:
    """The package version and, where the source is a git checkout, its commit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("hymirec-platform")
    except PackageNotFoundError:
        text = "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{text}+{sha}" if sha else text
