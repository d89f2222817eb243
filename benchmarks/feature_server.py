"""One user's features over HTTP from ``hymirec features serve``, beside the bare in-process read.

The store: ML-100K's catalogue built (``build_item_features``: codebook fitted and published) and
all 943 users' histories online as the stream worker writes them (R = 50 recent ids, P = 1000
long codes), in a fresh data directory (Feast local provider, SQLite online store). The server is
``hymirec features serve`` as a child process (Feast's feature server under gunicorn with
``--workers`` uvicorn workers, behind features.server's validating layer).

At concurrency 1 and 8, in this order, each pass reading the users in turn:

1. *in-process*: ``FeatureStoreClient.user_histories([u])`` (Feast's ``get_online_features``) from
   ``concurrency`` threads of this process;
2. *HTTP*: ``POST /get-online-features`` for the six ``user_history`` features of one user from
   ``concurrency`` threads, each with its own keep-alive httpx client; latency is measured in the
   client around each request (JSON decoding included).

Feast's published figure for its Python server: p99 7.23 ms for one entity row (50 features from
5 feature views, Redis, c5.4xlarge, concurrency 5 at 10 requests/s), from "Go feature server
benchmarks", feast.dev blog, 2022-07-19 (https://feast.dev/blog/go-feature-server-benchmarks/).
Client, server and store share this machine's cores.

Run from the repository root: ``python -m benchmarks.feature_server``. Prints a markdown table and
appends it, with the date and the machine, to ``benchmarks/RESULTS.md`` (``--no-append``: print
only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from benchmarks.report import append_section, machine
from core.movielens import load_ratings, replay_histories
from core.settings import Settings
from features.item_features import build_item_features
from features.store import USER_HISTORY_FEATURES, FeatureStoreClient, UserHistoryFeatures
from hymirec.processes import ServiceProcess

REPO = Path(__file__).resolve().parent.parent
FEAST_PUBLISHED = "p99 7.23 ms, one row (feast.dev blog, Go feature server benchmarks, 2022-07-19)"


def prepare(data_dir: Path) -> tuple[Settings, list[int]]:
    """A built catalogue and every user's worker-shaped row online; returns the users."""
    settings = Settings(data_dir=data_dir, cache_dir=REPO / ".hymirec" / "cache")
    built = build_item_features(settings)
    histories = replay_histories(load_ratings())
    rows = [
        UserHistoryFeatures(
            user_id=user,
            recent_item_ids=items[-settings.features.recent_len :].tolist(),
            long_codes=built.codebook.pack(
                built.table.lookup(items[-settings.features.long_len :])
            ),
            history_len=len(items),
            last_ts_ms=len(items),
            last_offset=user,
            codebook_version=built.codebook.version,
        )
        for user, items in histories.items()
    ]
    store = FeatureStoreClient(settings)
    for start in range(0, len(rows), 100):
        store.push_user_histories(rows[start : start + 100])
    return settings, sorted(histories)


def _safely(read: Callable[[int], bool], user: int) -> bool:
    """One read; an exception (a connection reset, a timeout) is a failure, counted, not a
    thread that dies and leaves its reads out of the figures."""
    try:
        return read(user)
    except Exception:
        return False


def timed(
    make_reader: Callable[[], Callable[[int], bool]], users: list[int], concurrency: int, n: int
) -> tuple[np.ndarray, float, int]:
    """``n`` one-user reads from ``concurrency`` threads (one reader each): latencies (ms), wall
    seconds, failures."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    counter = iter(range(n))

    def run() -> None:
        nonlocal failures
        read = make_reader()
        for _ in range(20):  # warm this thread's connection and caches
            _safely(read, users[0])
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            ok = _safely(read, users[i % len(users)])
            elapsed = (time.perf_counter() - start) * 1000
            with lock:
                latencies.append(elapsed)
                failures += not ok

    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return np.asarray(latencies), time.perf_counter() - start, failures


def in_process_reader(settings: Settings) -> Callable[[], Callable[[int], bool]]:
    store = FeatureStoreClient(settings)

    def make() -> Callable[[int], bool]:
        return lambda user: store.user_histories([user])[user] is not None

    return make


def http_reader(url: str) -> Callable[[], Callable[[int], bool]]:
    def make() -> Callable[[int], bool]:
        client = httpx.Client(base_url=url, timeout=10)

        def read(user: int) -> bool:
            body = {"features": USER_HISTORY_FEATURES, "entities": {"user_id": [user]}}
            answer = client.post("/get-online-features", json=body)
            return (
                answer.status_code == 200 and answer.json()["results"][1]["values"][0] is not None
            )

        return read

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="reads per pass")
    parser.add_argument("--workers", type=int, default=1, help="the server's gunicorn workers")
    parser.add_argument("--port", type=int, default=16566)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="hymirec-feature-server-"))
    try:
        settings, users = prepare(data_dir)
        server_args = [
            "features",
            "serve",
            "--port",
            str(args.port),
            "--workers",
            str(args.workers),
        ]
        server = ServiceProcess("feature-server", server_args, settings).start()
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not server.alive():
                raise SystemExit(f"the feature server did not start:\n{server.tail()}")
            time.sleep(0.2)
        lines = [
            "| read | concurrency | p50 ms | p99 ms | reads/s | failures |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        try:
            for concurrency in (1, 8):
                for name, reader in (
                    ("in-process `get_online_features`", in_process_reader(settings)),
                    ("HTTP `/get-online-features`", http_reader(url)),
                ):
                    lat, wall_s, failures = timed(reader, users, concurrency, args.requests)
                    lines.append(
                        f"| {name} | {concurrency} | {np.percentile(lat, 50):.2f} | "
                        f"{np.percentile(lat, 99):.2f} | {len(lat) / wall_s:,.0f} | {failures} |"
                    )
                    print(lines[-1], flush=True)
        finally:
            server.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    report = "\n".join(
        [
            f"## Feature server: one user's features over HTTP ({dt.date.today().isoformat()})",
            "",
            f"Machine: {machine()}; load average before the run ended: {load}. "
            f"`python -m benchmarks.feature_server --requests {args.requests} "
            f"--workers {args.workers}`: {len(users)} users, six `user_history` features each "
            "(R = 50 ids, P = 1000 codes), Feast SQLite online store; client, server and store "
            "share the cores.",
            "",
            *lines,
            "",
            f"Feast's published Python feature server figure: {FEAST_PUBLISHED}; Redis, 50 "
            "features from 5 views on a 16-vCPU c5.4xlarge, so not like for like.",
            "",
        ]
    )
    print(report)
    if not args.no_append:
        append_section(REPO / "benchmarks" / "RESULTS.md", report)


if __name__ == "__main__":
    main()
