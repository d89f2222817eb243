"""Event-to-online-feature latency: probe events for fresh users, polled in Feast until they appear.

Each probe is one event of a user never seen before, sent at a steady rate from this process and
polled in Feast every ~2 ms until its history appears (time.perf_counter on both ends, so the
figure includes the producer's linger). :func:`measure_latency` probes the worker idle, then under
a background load (a separate process sending re-keyed MovieLens events) at a fraction of the
worker's measured capacity.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.movielens import load_ratings
from core.settings import Settings
from features.store import FeatureStoreClient
from streaming.kafka_io import EventProducer, event_key
from streaming.replay import movielens_events
from streaming.schema import Event

__all__ = ["PROBE_USER_BASE", "Latency", "history_lens", "measure_latency", "probe_latency"]

PROBE_USER_BASE = 10_000_000  # + 1000 * round + i: one fresh user per probe
LOAD_USER_BASE = 20_000_000  # + MovieLens user id: the background load's users


def history_lens(store: FeatureStoreClient, users: list[int]) -> dict[int, int | None]:
    data = store.online(["user_history:history_len"], [{"user_id": u} for u in users])
    return dict(zip((int(u) for u in data["user_id"]), data["history_len"], strict=True))


def background_load(settings: Settings, rate: float, stop: Any, sent: Any) -> None:
    """A separate process: re-keyed MovieLens events at ``rate``/s until ``stop`` is set."""
    records = [
        (event_key(LOAD_USER_BASE + e.user_id),
         e.model_copy(update={"user_id": LOAD_USER_BASE + e.user_id}).to_json_bytes())
        for e in movielens_events(load_ratings())
    ]  # fmt: skip
    with EventProducer(settings.kafka) as producer:
        start, count = time.perf_counter(), 0
        while not stop.is_set():
            due = int((time.perf_counter() - start) * rate)
            while count < due:
                producer.send_raw(*records[count % len(records)])
                count += 1
            sent.value = count
            time.sleep(0.01)


@dataclass
class Latency:
    label: str
    latencies_ms: list[float]
    probes: int
    load_events_per_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def probe_latency(
    settings: Settings, store: FeatureStoreClient, n: int, window_s: float, user_base: int
) -> tuple[list[float], int]:
    """Send ``n`` probes spread over ``window_s``; poll Feast for those outstanding every ~2 ms."""
    users = [user_base + i for i in range(n)]
    payloads = [
        Event(event_id=uuid.uuid4(), user_id=u, item_id=1, event_type="play", ts_ms=1)
        .to_json_bytes()
        for u in users
    ]  # fmt: skip
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    gap_s = window_s / n
    with EventProducer(settings.kafka) as producer:
        start = time.perf_counter()
        deadline = start + window_s + 30
        while (users or sent_at) and time.perf_counter() < deadline:
            now = time.perf_counter()
            i = n - len(users)
            if users and now >= start + i * gap_s:
                user = users.pop(0)
                sent_at[user] = time.perf_counter()
                producer.send_raw(event_key(user), payloads[i])
            if sent_at:
                lens = history_lens(store, list(sent_at))
                seen_at = time.perf_counter()
                for user, length in lens.items():
                    if length:
                        latencies.append(1000 * (seen_at - sent_at.pop(user)))
            time.sleep(0.002)
    return latencies, n - len(latencies)


def measure_latency(
    settings: Settings, store: FeatureStoreClient, capacity_events_per_s: float,
    args: argparse.Namespace,
) -> list[Latency]:  # fmt: skip
    """Probes with the worker otherwise idle, then under a background load at
    ``args.load_fraction`` of the measured capacity (the end-to-end rate)."""
    idle_lat, idle_missing = probe_latency(
        settings, store, args.probes, args.probe_window_s, PROBE_USER_BASE
    )
    idle = Latency("idle", idle_lat, args.probes)
    if idle_missing:
        idle.notes.append(f"{idle_missing} probes not seen within 30 s")
    rate = args.load_fraction * capacity_events_per_s
    context = mp.get_context("spawn")
    stop, sent = context.Event(), context.Value("q", 0)
    loader = context.Process(target=background_load, args=(settings, rate, stop, sent))
    loader.start()
    try:
        while sent.value == 0 and loader.is_alive():  # it serializes its records first
            time.sleep(0.1)
        time.sleep(3.0)  # let the load reach a steady state before the first probe
        sent0, t0 = sent.value, time.perf_counter()
        loaded_lat, loaded_missing = probe_latency(
            settings, store, args.probes, args.probe_window_s, PROBE_USER_BASE + 1000
        )
        achieved = (sent.value - sent0) / (time.perf_counter() - t0)
    finally:
        stop.set()
        loader.join(timeout=60)
    loaded = Latency(f"load {args.load_fraction:.0%} of e2e", loaded_lat, args.probes, achieved)
    if loaded_missing:
        loaded.notes.append(f"{loaded_missing} probes not seen within 30 s")
    half = len(loaded_lat) // 2
    if half:
        loaded.notes.append(
            f"p50 of first/second half of probes {np.median(loaded_lat[:half]):.0f}/"
            f"{np.median(loaded_lat[half:]):.0f} ms (a rising second half means a growing backlog)"
        )
    return [idle, loaded]
