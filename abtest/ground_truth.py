"""The closed-loop simulator's ground truth per experiment, variant and minute, as JSON files.

The simulator knows, for every list it is served, the exact expected clicks of that list for its
user (``SimulatedPopulation.expected``). ``GroundTruthRecorder`` sums them per experiment, variant
and wall-clock minute, beside the impressions and the clicks the simulated users made, and
``write`` puts one ``<experiment>.json`` per experiment into ``settings.ground_truth_dir``
(atomically, like the readout snapshots). The readout publisher, in another process, reads it back
with ``read_ground_truth`` and embeds it in the experiment's snapshot, so the dashboard can show the
truth beside what the experiment measured. A real deployment writes none.

The models (``GroundTruth``, ``TruthPoint``, ``VariantTruth``) are part of the snapshot schema and
live in ``abtest.snapshot``; they are re-exported here.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from abtest.snapshot import (
    GroundTruth,
    TruthPoint,
    VariantTruth,
    snapshot_filename,
    write_json_atomic,
)
from core.errors import DataError

__all__ = [
    "MINUTE_MS",
    "SIMULATOR_SOURCE",
    "GroundTruth",
    "GroundTruthRecorder",
    "TruthPoint",
    "VariantTruth",
    "read_ground_truth",
]

MINUTE_MS = 60_000
SIMULATOR_SOURCE = (
    "closed-loop simulator: exact expected CTR of every served list under the simulated users' "
    "response model"
)


@dataclass
class _Sums:
    requests: int = 0
    impressions: int = 0
    expected_clicks: float = 0.0
    clicks: int = 0


def _check(experiment: str, impressions: int, expected_clicks: float, clicks: int) -> None:
    if not experiment:
        raise DataError("experiment: the ground truth needs the experiment's name, got ''")
    if impressions < 0 or clicks < 0:
        raise DataError(
            f"impressions={impressions}, clicks={clicks}: counts of a served list cannot be < 0"
        )
    if clicks > impressions:
        raise DataError(f"clicks={clicks} > impressions={impressions}: one click per shown item")
    if not (math.isfinite(expected_clicks) and 0.0 <= expected_clicks <= impressions):
        raise DataError(
            f"expected_clicks={expected_clicks!r} must be finite and in [0, impressions="
            f"{impressions}]: it is a sum of click probabilities over the shown items"
        )


class GroundTruthRecorder:
    """Sums the simulator's truth per experiment, variant and wall-clock minute (thread-safe)."""

    def __init__(self, source: str = SIMULATOR_SOURCE) -> None:
        self.source = source
        self._sums: dict[str, dict[tuple[int, str], _Sums]] = {}
        self._lock = threading.Lock()

    def record(
        self,
        experiment: str,
        variant: str,
        ts_ms: int,
        impressions: int,
        expected_clicks: float,
        clicks: int,
    ) -> None:
        """One served list (one request): its size, its exact expected clicks, the clicks made."""
        _check(experiment, impressions, expected_clicks, clicks)
        key = (ts_ms // MINUTE_MS * MINUTE_MS, variant)
        with self._lock:
            sums = self._sums.setdefault(experiment, {}).setdefault(key, _Sums())
            sums.requests += 1
            sums.impressions += impressions
            sums.expected_clicks += float(expected_clicks)
            sums.clicks += clicks

    def truths(self, now_ms: int | None = None) -> dict[str, GroundTruth]:
        """Every experiment's truth so far, points ordered by minute then variant."""
        now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
        with self._lock:
            return {
                experiment: GroundTruth(
                    experiment=experiment,
                    generated_at_ms=now_ms,
                    source=self.source,
                    points=[
                        TruthPoint(
                            minute_start_ms=minute,
                            variant=variant,
                            requests=s.requests,
                            impressions=s.impressions,
                            expected_clicks=s.expected_clicks,
                            clicks=s.clicks,
                        )
                        for (minute, variant), s in sorted(by_minute.items())
                    ],
                )
                for experiment, by_minute in self._sums.items()
            }

    def write(self, folder: Path, now_ms: int | None = None) -> list[Path]:
        """Write ``<folder>/<experiment>.json`` per experiment, atomically; return the paths."""
        written = []
        for experiment, truth in self.truths(now_ms).items():
            path = folder / snapshot_filename(experiment)
            write_json_atomic(path, truth)
            written.append(path)
        return written


def read_ground_truth(folder: Path, experiment: str) -> GroundTruth | None:
    """The truth ``GroundTruthRecorder.write`` wrote for ``experiment``; None when there is none.

    An unreadable or malformed file, or one about another experiment, raises DataError naming it.
    """
    path = folder / snapshot_filename(experiment)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataError(f"cannot read ground truth {path}: {exc}") from exc
    try:
        truth = GroundTruth.model_validate(json.loads(text))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        raise DataError(f"ground truth {path.name} is malformed: {problems}") from exc
    except ValueError as exc:
        raise DataError(f"ground truth {path.name} is not valid JSON ({exc})") from exc
    if truth.experiment != experiment:
        raise DataError(
            f"ground truth {path.name} is about {truth.experiment!r}, not {experiment!r}; "
            "remove the file and let the simulator rewrite it"
        )
    return truth
