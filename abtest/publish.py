"""The readout publisher: each experiment's readout as an atomic JSON snapshot for the dashboard.

``publish_readouts`` lists the experiments with exposures (impressions that carry an experiment and
a variant, as ``exposure_users`` keeps them) and the planned ones (``experiment_plans`` of the
experiments file: the SRM check uses the configured weights, the first variant is the control; a
planned experiment without traffic gets a snapshot with no users), computes each one's per-user
metrics (``abtest.metrics``), its readout from their per-variant sums
(``abtest.readout.readout_from_sums``, the path of ``experiment_readout``), adds the request
guardrails and the cumulative effect over time (``abtest.cumulative``, which needs the per-user
rows: so the publisher reads them once and sums them with numpy rather than asking ClickHouse for
the sums as well), and writes ``<readouts_dir>/<experiment>.json`` (schema: ``abtest.snapshot``).
It also writes the pipeline's Kafka health (``abtest.pipeline_health``) to ``_pipeline.json``, with
the freshness series: per publish, the trainer's lag on the training topic and each registry
model's newest learned event age (read from the checkpoint registry's metadata; an unreadable
registry gives no models, logged). The same code runs inside the sink on chdb (which owns the
directory) and as ``hymirec readout --publish`` against a ClickHouse server.

In a closed-loop simulation the simulator also writes its ground truth per variant and minute
(``abtest.ground_truth``, into ``settings.ground_truth_dir``); the snapshot carries it when there
is one. A broken truth file is logged and left out: it never stops the snapshot.

Guardrails: a guardrail metric of the readout (request latency, error rate) is breached when the
treatment is worse at p < alpha; the p99 request latency is breached when a treatment's exceeds
the control's by more than ``p99_tolerance`` (20 % by default).

The sequential test: each publish is one look. The states of the previous look (τ fixed once per
metric × treatment, the running minimum of the p-value) are read back from the experiment's last
snapshot and advanced (``abtest.sequential_looks``), so they survive restarts of the publisher; a
plan that would change τ mid-experiment fails that experiment's publish with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

from abtest.clickhouse import analytics_client
from abtest.cumulative import cumulative_series
from abtest.freshness import freshness_point, freshness_series
from abtest.ground_truth import GroundTruth, read_ground_truth
from abtest.metrics import user_metrics
from abtest.pipeline_health import pipeline_health
from abtest.plans import ExperimentPlan, experiment_plans
from abtest.readout import experiment_names
from abtest.snapshot import (
    PIPELINE_FILE,
    PipelineSnapshot,
    previous_sequential_states,
    read_pipeline_snapshot,
    snapshot_filename,
    write_json_atomic,
)
from abtest.snapshot_build import TRAINING_POLICY, build_snapshot, request_guardrails
from core.errors import DataError
from core.settings import Settings

__all__ = [
    "TRAINING_POLICY",
    "ExperimentPlan",
    "PublishReport",
    "ReadoutPublisher",
    "build_snapshot",
    "cumulative_series",
    "experiment_ground_truth",
    "experiment_names",
    "experiment_plans",
    "publish_pipeline_health",
    "publish_readouts",
    "request_guardrails",
    "run_publish_loop",
]

log = logging.getLogger(__name__)


@dataclass
class PublishReport:
    """What one publish wrote, and which experiments failed (name -> error)."""

    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pipeline: PipelineSnapshot | None = None
    seconds: float = 0.0


def experiment_ground_truth(settings: Settings, experiment: str) -> GroundTruth | None:
    """The simulator's truth about ``experiment``, or None (none written, or unreadable: logged)."""
    try:
        return read_ground_truth(settings.ground_truth_dir, experiment)
    except DataError as exc:
        log.warning("ground truth of %r left out of its snapshot: %s", experiment, exc)
        return None


def publish_readouts(
    client: Client,
    settings: Settings,
    *,
    plans: Mapping[str, ExperimentPlan] | None = None,
    with_pipeline: bool = True,
    now_ms: int | None = None,
    **snapshot_options: Any,
) -> PublishReport:
    """Write every experiment's snapshot (and ``_pipeline.json``) into ``settings.readouts_dir``.

    One experiment's failure is logged and reported in ``PublishReport.failed``; the others are
    still written. ``snapshot_options`` go to ``build_snapshot`` (alpha, buckets, ...).
    """
    started = time.monotonic()
    plans = plans or {}
    out_dir = settings.readouts_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PublishReport()
    for name in sorted(set(experiment_names(client)) | set(plans)):
        try:
            previous = previous_sequential_states(out_dir, name)
            metrics = user_metrics(client, name, pre_days=settings.readout.cuped_pre_days)
            snapshot = build_snapshot(
                metrics,
                request_guardrails(client, name),
                plan=plans.get(name),
                now_ms=now_ms,
                ground_truth=experiment_ground_truth(settings, name),
                previous=previous,
                **snapshot_options,
            )
            path = out_dir / snapshot_filename(name)
            write_json_atomic(path, snapshot)
            report.written.append(path)
        except Exception as exc:  # one broken experiment must not hide the others
            log.exception("readout snapshot of %r failed", name)
            report.failed[name] = f"{type(exc).__name__}: {exc}"
    if with_pipeline:
        report.pipeline = publish_pipeline_health(settings, now_ms=now_ms)
    report.seconds = time.monotonic() - started
    return report


def publish_pipeline_health(settings: Settings, *, now_ms: int | None = None) -> PipelineSnapshot:
    """Write ``_pipeline.json``; the previous file (if readable) gives the event rate and the
    freshness series so far, to which this publish adds a point."""
    path = settings.readouts_dir / PIPELINE_FILE
    try:
        previous: PipelineSnapshot | None = read_pipeline_snapshot(path)
    except DataError:
        previous = None
    snapshot = pipeline_health(settings, previous, now_ms=now_ms)
    series = freshness_series(previous, freshness_point(settings, snapshot))
    snapshot = snapshot.model_copy(update={"freshness": series})
    write_json_atomic(path, snapshot)
    return snapshot


class ReadoutPublisher:
    """Publishes at most every ``every_s`` seconds on an open client (the sink calls it)."""

    def __init__(
        self,
        settings: Settings,
        client: Client,
        *,
        plans: Mapping[str, ExperimentPlan] | None = None,
        every_s: float | None = None,
    ) -> None:
        self.settings, self.client, self.plans = settings, client, dict(plans or {})
        self.every_s = every_s if every_s is not None else settings.readout.publish_s
        self._next = 0.0  # the first call publishes
        self.publishes = 0

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def publish(self) -> PublishReport:
        """Publish now (raises only when listing the experiments or writing fails)."""
        self._next = time.monotonic() + self.every_s
        report = publish_readouts(self.client, self.settings, plans=self.plans)
        self.publishes += 1
        log.log(
            logging.WARNING if report.failed else logging.DEBUG,
            "published %d readout snapshot(s) in %.2f s%s",
            len(report.written),
            report.seconds,
            f"; failed: {sorted(report.failed)}" if report.failed else "",
        )
        return report


def run_publish_loop(
    settings: Settings,
    *,
    every_s: float | None = None,
    stop: threading.Event | None = None,
    plans: Mapping[str, ExperimentPlan] | None = None,
    once: bool = False,
) -> int:
    """Publish every ``every_s`` s until ``stop`` is set (or once); return the failed cycles.

    A failed cycle (ClickHouse down, a full disk) is logged and counted and the loop goes on.
    """
    stop = stop or threading.Event()
    failures = 0
    with analytics_client(settings.clickhouse) as client:
        publisher = ReadoutPublisher(settings, client, plans=plans, every_s=every_s)
        while True:
            try:
                report = publisher.publish()
                failures += bool(report.failed)
            except Exception as exc:  # ClickHouse away, a full disk: log, count, go on
                failures += 1
                if once:
                    raise
                log.error("readout publish failed (retrying in %.1f s): %s", publisher.every_s, exc)
            if once or stop.wait(publisher.every_s):
                return failures
