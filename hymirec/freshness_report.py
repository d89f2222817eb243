"""The demo's answer to "did the online trainer keep up?", minute by minute over the traffic.

Read from the freshness series the readout publisher keeps in ``_pipeline.json`` (a point per
publish: the trainer's lag on ``training-samples`` and each model's newest learned event age)
and from the latest versions' own metadata (event -> published p50/p99). Kept up means: in every
minute of the traffic the lag stayed under ``LAG_LIMIT`` and every served model's newest learned
event was under ``AGE_LIMIT_MS`` old, and every model's event -> published p99 under
``P99_LIMIT_MS`` (issue 17's bar). A minute without a figure (a model still on its offline
version, which states no learned event; the broker not answering) is left out and counted.
"""

from __future__ import annotations

import time

from abtest.freshness import FreshnessMinute, freshness_by_minute
from abtest.snapshot import PIPELINE_FILE, read_pipeline_snapshot
from core.errors import DataError
from core.settings import Settings
from model.checkpoint_registry import CheckpointRegistry

__all__ = ["AGE_LIMIT_MS", "LAG_LIMIT", "P99_LIMIT_MS", "trainer_freshness_lines"]

LAG_LIMIT = 1_000
AGE_LIMIT_MS = 60_000
P99_LIMIT_MS = 30_000


def _seconds(ms: object) -> str:
    return f"{float(ms) / 1000:.1f} s" if isinstance(ms, int | float) else "-"


def _minute_line(index: int, minute: FreshnessMinute) -> str:
    lag = "unknown" if minute.max_training_lag is None else f"{minute.max_training_lag:,}"
    age = (
        "unknown"
        if minute.max_event_age_ms is None
        else f"{_seconds(minute.max_event_age_ms)} ({minute.oldest_model})"
    )
    clock = time.strftime("%H:%M:%S", time.gmtime(minute.start_ms / 1000))
    return (
        f"[trainer] minute {index + 1} ({clock}, {minute.points} points): max lag {lag}; "
        f"oldest newest-learned event {age}"
    )


def trainer_freshness_lines(
    settings: Settings, models: list[str], start_ms: int, end_ms: int
) -> list[str]:
    """Per-minute lines over ``[start_ms, end_ms]``, one per model, and the verdict."""
    try:
        snapshot = read_pipeline_snapshot(settings.readouts_dir / PIPELINE_FILE)
        series = snapshot.freshness
    except DataError as exc:
        return [f"[trainer] no freshness series to judge by ({exc})"]
    minutes = freshness_by_minute(series, start_ms, end_ms, set(models))
    lines = [_minute_line(i, m) for i, m in enumerate(minutes)]
    store = CheckpointRegistry(settings.registry_dir)
    worst_p99_ms = 0.0
    for name in models:
        latest = store.latest(name)
        if latest is None:
            lines.append(f"[trainer] {name}: no version published")
            worst_p99_ms = float("inf")
            continue
        meta = latest.metadata
        fresh = meta.get("freshness_ms") or {}
        worst_p99_ms = max(worst_p99_ms, float(fresh.get("p99") or 0.0))
        lines.append(
            f"[trainer] {name} {latest.version}: {meta.get('samples_seen', 0):,} samples seen; "
            f"event -> published p50 {_seconds(fresh.get('p50'))} p99 {_seconds(fresh.get('p99'))}"
        )
    # A minute where a served model is still on its offline version (which states no learned
    # event) or the broker did not answer has no figure: it is left out, and said so.
    lags = [m.max_training_lag for m in minutes if m.max_training_lag is not None]
    ages = [m.max_event_age_ms for m in minutes if m.max_event_age_ms is not None]
    unjudged = len(minutes) - min(len(lags), len(ages))
    if unjudged:
        lines.append(f"[trainer] {unjudged} of {len(minutes)} minute(s) without a known lag or age")
    kept_up = (
        bool(lags and ages)
        and max(lags) < LAG_LIMIT
        and max(ages) < AGE_LIMIT_MS
        and worst_p99_ms < P99_LIMIT_MS
    )
    bar = (
        f"lag < {LAG_LIMIT:,} samples and newest learned event < {AGE_LIMIT_MS // 1000} s old "
        f"in every minute, event -> published p99 < {P99_LIMIT_MS // 1000} s"
    )
    lines.append(
        f"[trainer] kept up with the stream ({bar})"
        if kept_up
        else f"[trainer] did NOT keep up with the stream (needs: {bar})"
    )
    return lines
