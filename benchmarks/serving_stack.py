"""The stack the service benchmarks run on, and the same-run references they report beside it.

``prepare`` builds a data dir as the demo would leave it: item features and the codebook, every
ML-100K user's history in the Feast online store (SQLite) in the row shape the stream worker
pushes, and sasrec, hymirec and popular trained briefly on the first ratings and published.
``serve`` starts ``hymirec serve`` on it as a child process serving one model to everyone.

The service caches a user's interests until their history changes (``serving.models``), so a
benchmark says which case it measures: :class:`HistoryChurn` pushes a changed row for users (one
more item played, as the worker would push after a click) so that their next request is
computed afresh; without it a repeated user is served from the cache.

References measured in the same run: ``feast_reads`` (the bare Feast read,
``FeatureStoreClient.user_histories``, i.e. ``get_online_features``; and the service's own read,
``serving.feast_rows.HistoryRows``) and the HTTP floor (``GET /health/live``: uvicorn, FastAPI and
the client, no work). ``cpu_s`` reads a process's CPU time, for CPU per request.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from feast.infra.provider import get_provider
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Int64List, Value

from core.errors import HymirecError
from core.movielens import load_ratings, replay_histories
from core.settings import Settings
from features.item_features import ItemFeatures, build_item_features, load_item_features
from features.store import FeatureStoreClient, UserHistoryFeatures, UserHistoryProtos
from hymirec.processes import ServiceProcess
from model.checkpoint_registry import CheckpointRegistry
from model.data import build_catalog
from model.training.online import ModelTrainer, StreamRecord, TrainerOptions
from serving.feast_rows import HistoryRows
from streaming.schema import TrainingSample

__all__ = [
    "HistoryChurn",
    "K",
    "Measured",
    "cache_lookups",
    "churn_ahead",
    "cpu_s",
    "feast_reads",
    "free_port",
    "prepare",
    "serve",
]

K = 10  # items per request
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_s(pid: int | None) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_S


@dataclass(frozen=True)
class Measured:
    latencies_ms: np.ndarray
    wall_s: float
    failures: int

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latencies_ms, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies_ms, 99))

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.wall_s


def history_row(
    settings: Settings, user: int, items: np.ndarray, built: ItemFeatures, version: str
) -> UserHistoryFeatures:
    """The row ``streaming`` pushes for a user whose history is ``items`` (oldest first);
    ``version`` is ``built.codebook.version`` (a hash of the centroids: 0.7 ms a call)."""
    kept = items[-settings.features.long_len :]
    return UserHistoryFeatures(
        user_id=user,
        recent_item_ids=[int(i) for i in kept[-settings.features.recent_len :]],
        long_codes=built.codebook.pack(built.table.lookup(kept)),
        history_len=len(items),
        last_ts_ms=0,
        last_offset=len(items) - 1,
        codebook_version=version,
    )


def prepare(settings: Settings, train_ratings: int) -> list[int]:
    """Item features, every user's online history, and published model versions."""
    built = build_item_features(settings)
    histories = replay_histories(load_ratings())
    version = built.codebook.version
    rows = [history_row(settings, u, items, built, version) for u, items in histories.items()]
    store = FeatureStoreClient(settings)
    for start in range(0, len(rows), 200):
        store.push_user_histories(rows[start : start + 200])
    catalog = build_catalog(settings)
    registry = CheckpointRegistry(settings.registry_dir)
    seqs: dict[int, list[int]] = {}
    records = []
    for offset, row in enumerate(load_ratings().head(train_ratings).itertuples()):
        items_so_far = seqs.setdefault(int(row.user_id), [])
        sample = TrainingSample(
            event_id=uuid.uuid4(),
            user_id=int(row.user_id),
            item_id=int(row.item_id),
            event_type="rating",
            ts_ms=int(row.ts_ms),
            seq=len(items_so_far),
            recent_item_ids=items_so_far[-settings.features.recent_len :],
        )
        items_so_far.append(int(row.item_id))
        records.append(StreamRecord(0, offset, sample, int(time.time() * 1000)))
    for name in ("hymirec", "sasrec", "popular"):
        trainer = ModelTrainer(name, catalog, TrainerOptions())
        trainer.learn(records)
        trainer.publish(registry, "training", keep=2)
    return sorted(histories)


class HistoryChurn:
    """Changed online histories on demand: each ``push`` gives every named user one more item
    (a different one each time), so their next request misses the service's interest cache.

    The rows go straight into the online store through the provider's ``online_write_batch``
    (what a Feast push ends in), not through ``FeatureStore.push``: its DataFrame and Arrow
    conversions cost ~0.75 ms of CPU per row here, which on a 2-core machine would take the load
    client's CPU."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.built = load_item_features(settings)
        self.version = self.built.codebook.version
        self.histories = replay_histories(load_ratings())
        self.num_items = int(max(int(h.max()) for h in self.histories.values()))
        store = FeatureStoreClient(settings).store
        self.config = store.config
        self.view = store.get_feature_view("user_history")
        self.provider = get_provider(self.config)
        self.pushes: dict[int, int] = {}
        self.rows_pushed = 0

    def push(self, users: list[int]) -> None:
        now = datetime.now(UTC)
        data: UserHistoryProtos = []
        for user in users:
            n = self.pushes.get(user, 0) + 1
            self.pushes[user] = n
            extra = 1 + (user * 31 + np.arange(n) * 17) % self.num_items
            items = np.concatenate([self.histories[user], extra])
            row = history_row(self.settings, user, items, self.built, self.version)
            key = EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=user)])
            values = {
                "recent_item_ids": Value(int64_list_val=Int64List(val=row.recent_item_ids)),
                "long_codes": Value(bytes_val=row.long_codes),
                "history_len": Value(int64_val=row.history_len),
                "last_ts_ms": Value(int64_val=row.last_ts_ms),
                "last_offset": Value(int64_val=row.last_offset),
                "codebook_version": Value(string_val=row.codebook_version),
            }
            data.append((key, values, now, None))
        self.provider.online_write_batch(self.config, self.view, data, progress=None)
        self.rows_pushed += len(data)


def churn_ahead(
    settings: Settings,
    users: list[int],
    cursor: Any,
    share: float,
    ready: Any,
    stop: Any,
    lead: int,
    interval_s: float,
) -> None:
    """Process target: changed histories ahead of a client that sends request ``j`` for user
    ``users[j % len(users)]`` and counts the requests it sent in ``cursor`` (a shared integer).

    Every ``interval_s`` the rows of the requests up to ``lead`` ahead of the cursor are pushed,
    for the share ``share`` of the requests (evenly spread), each user's row with one more item
    than their last. ``lead`` below the number of users puts each push after the user's previous
    request was sent. Sets ``ready`` once the store is open; returns when ``stop`` is set."""
    churn = HistoryChurn(settings)
    ready.set()
    pushed = 0
    while not stop.is_set():
        target = int(cursor.value) + lead
        due = [
            users[j % len(users)]
            for j in range(pushed, target)
            if int((j + 1) * share) > int(j * share)
        ]
        pushed = max(pushed, target)
        if due:
            churn.push(due)
        stop.wait(interval_s)


def feast_reads(
    settings: Settings, users: list[int], concurrency: int, lean: bool = False
) -> Measured:
    """One-user reads from ``concurrency`` threads in this process: Feast's own
    ``get_online_features`` (``FeatureStoreClient.user_histories``), or, with ``lean``, the
    service's ``HistoryRows`` read."""
    client = FeatureStoreClient(settings)
    rows = HistoryRows(client)

    def read(user: int) -> UserHistoryFeatures | None:
        return rows.read([user])[user] if lean else client.user_histories([user])[user]

    for user in users[:50]:  # open the store, warm the page cache
        read(user)
    lock = threading.Lock()
    latencies: list[float] = []
    failures = 0

    def one(user: int) -> None:
        nonlocal failures
        start = time.perf_counter()
        try:
            row = read(user)
        except HymirecError:
            row = None
        elapsed = (time.perf_counter() - start) * 1000
        with lock:
            latencies.append(elapsed)
            failures += row is None

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, users))
    return Measured(np.asarray(latencies), time.perf_counter() - start, failures)


def serve(settings: Settings, model: str, folder: Path) -> tuple[ServiceProcess, str]:
    """``hymirec serve`` as a child serving ``model`` to everyone, once it reports ready."""
    experiments = folder / f"experiments-{model}.yaml"
    experiments.write_text(f"default_model: {model}\n")
    service_settings = settings.updated(experiments_file=experiments, serve_port=free_port())
    process = ServiceProcess(f"serve-{model}", ["serve"], service_settings).start()
    deadline = time.monotonic() + 180
    url = f"http://127.0.0.1:{service_settings.serve.port}"
    while True:
        try:
            if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if not process.alive() or time.monotonic() > deadline:
            process.stop()
            raise HymirecError(f"hymirec serve did not become ready:\n{process.tail()}")
        time.sleep(0.2)
    return process, url


def cache_lookups(metrics_text: str) -> tuple[float, float]:
    """(hits, misses) of the service's interest caches, from its /metrics text."""
    hits = misses = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("hymirec_interest_cache_lookups_total{"):
            value = float(line.rsplit(" ", 1)[1])
            if 'result="hit"' in line:
                hits += value
            else:
                misses += value
    return hits, misses
