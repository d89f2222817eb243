"""``hymirec demo``: start the embedded stack, stream MovieLens-100K through it, show the result.

Today the loop is: broker → Faust worker → Feast online (user histories with codebook-compressed
long history) and the ``training-samples`` topic. Later issues add the trainer, the service, the
simulator and the experiment readout to this same command.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable

import numpy as np

from features.item_features import build_item_features
from features.store import FeatureStoreClient
from hymirec.errors import HymirecError
from hymirec.movielens import load_ratings
from hymirec.processes import ServiceProcess
from hymirec.report import print_user_features
from hymirec.settings import Settings
from streaming.broker import LocalBroker
from streaming.kafka_io import EventProducer, ensure_topics
from streaming.replay import movielens_events, replay_events

__all__ = ["run_demo", "wait_for_histories"]


def wait_for_histories(
    store: FeatureStoreClient,
    expected: dict[int, int],
    timeout_s: float,
    on_progress: Callable[[int, int], None] | None = None,
) -> float:
    """Poll Feast until every user's ``history_len`` equals ``expected``; return when it did."""
    users = sorted(expected)
    target = sum(expected.values())
    deadline = time.monotonic() + timeout_s
    while True:
        rows = store.user_histories(users)
        seen = sum(r.history_len for r in rows.values() if r is not None)
        if on_progress is not None:
            on_progress(seen, target)
        lengths = {u: (r.history_len if r is not None else 0) for u, r in rows.items()}
        if all(lengths[u] == expected[u] for u in users):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise HymirecError(f"online histories reached {seen}/{target} events in {timeout_s} s")
        time.sleep(0.5)


def run_demo(settings: Settings, limit: int = 0, timeout_s: float = 900.0) -> int:
    embedded = settings.kafka_bootstrap == f"{settings.broker_host}:{settings.broker_port}"
    broker = LocalBroker(settings.broker_dir, settings.broker_host, settings.broker_port)
    print("== hymirec demo: MovieLens-100K through broker -> Faust -> Feast ==")
    if embedded:
        broker.stop()
        shutil.rmtree(settings.broker_dir, ignore_errors=True)  # a fresh log every demo run
        status = broker.start()
        print(f"[broker] embedded noida-db ready at {status.address} (pid {status.pid})")
    shutil.rmtree(settings.feast_dir, ignore_errors=True)
    ensure_topics(settings)
    started = time.perf_counter()
    built = build_item_features(settings)
    print(
        f"[features] {len(built.table.item_ids)} items embedded (all-MiniLM-L6-v2), codebook "
        f"{built.codebook.levels}x{built.codebook.size}: {built.codebook.bytes_per_item} "
        f"bytes/item, in {time.perf_counter() - started:.1f} s"
    )
    ratings = load_ratings()
    if limit:
        ratings = ratings.head(limit)
    expected = ratings.groupby("user_id").size().to_dict()
    store = FeatureStoreClient(settings)
    worker = ServiceProcess("worker", ["worker"], settings).start()
    print(f"[worker] Faust worker started (pid {worker.pid}, log {worker.log_path})")
    try:
        t0 = time.perf_counter()
        with EventProducer(settings) as producer:
            sent = replay_events(
                producer,
                movielens_events(ratings),
                progress=lambda n: print(f"[replay] sent {n:,} events", flush=True),
                progress_every=20_000,
            )
        t_sent = time.perf_counter() - t0
        last_print = [0.0]

        def progress(seen: int, target: int) -> None:
            if not worker.alive():
                raise HymirecError(f"the worker exited:\n{worker.tail()}")
            if time.monotonic() - last_print[0] > 3:
                last_print[0] = time.monotonic()
                print(f"[online] {seen:,}/{target:,} events in Feast online histories", flush=True)

        wait_for_histories(
            store, {int(k): int(v) for k, v in expected.items()}, timeout_s, progress
        )
        total_s = time.perf_counter() - t0
        print(
            f"[done] {sent:,} events produced in {t_sent:.1f} s; all {len(expected)} users' online "
            f"histories complete after {total_s:.1f} s ({sent / total_s:,.0f} events/s end to end)"
        )
        counts = np.array(list(expected.values()))
        heavy = [int(u) for u in sorted(expected, key=lambda u: -expected[u])[:2]]
        light = [int(u) for u in sorted(expected, key=lambda u: expected[u])[:1]]
        median = np.median(counts)
        print(f"\n== online features (users with most/fewest events; median {median:.0f}) ==")
        print_user_features(settings, heavy + light)
    finally:
        worker.stop()
        if embedded:
            broker.stop()
            print("\n[stopped] worker and broker")
    return 0
