"""How long a full experiment readout takes over 10 million events in the embedded ClickHouse.

Generates a synthetic two-variant experiment (vectorised numpy, seed 0) with a known effect: the
treatment multiplies every user's click probability by 1 + ``--effect`` (so clicks, plays,
conversion and CTR rise by about that much) and adds 3 ms to request latency. Users have a gamma
"activity" that drives both their pre-experiment events (the CUPED covariate) and their traffic,
so CUPED has something to remove. 1 % of rows are inserted twice (redeliveries). Rows go in with
``insert_df`` in chunks of about a million, so ``events`` holds many unmerged parts; the readout is
timed on them (``FINAL`` does the deduplication), then again after ``OPTIMIZE TABLE ... FINAL``.

Run from the repository root: ``python -m benchmarks.readout_10m [--events N]``. Prints a table and
appends it, with the date and the machine, to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from abtest.clickhouse import (
    analytics_client,
    command,
    insert_event_frame,
    load_item_dimension,
    query_df,
)
from abtest.metrics import user_metrics
from abtest.readout import experiment_readout, format_readout, readout_from_metrics
from benchmarks.report import append_section, machine
from hymirec.settings import Settings

T = TypeVar("T")
DAY_MS = 86_400_000
T0_MS = 1_767_225_600_000  # 2026-01-01 UTC: the experiment starts; exposures spread over 7 days
EXPERIMENT = "ranker-10m"
ITEMS = 2000
GENRES = np.array(
    [
        "Action",
        "Adventure",
        "Animation",
        "Children",
        "Comedy",
        "Crime",
        "Documentary",
        "Drama",
        "Fantasy",
        "Film-Noir",
        "Horror",
        "Musical",
        "Mystery",
        "Romance",
        "Sci-Fi",
        "Thriller",
        "War",
        "Western",
        "unknown",
    ]
)
ITEMS_PER_REQUEST = 5


def uuid_texts(rng: np.random.Generator, n: int) -> list[str]:
    """n random UUIDs as text (random bits; the version nibble does not matter to ClickHouse)."""
    hx = rng.bytes(16 * n).hex()
    return [
        f"{hx[i : i + 8]}-{hx[i + 8 : i + 12]}-{hx[i + 12 : i + 16]}-{hx[i + 16 : i + 20]}-"
        f"{hx[i + 20 : i + 32]}"
        for i in range(0, 32 * n, 32)
    ]


def rank_within(groups: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """0, 1, ... within each run of a repeated group index (np.repeat(arange, counts))."""
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(groups.size) - starts


def generate_chunk(
    rng: np.random.Generator, first_user: int, n_users: int, first_request: int, effect: float
) -> tuple[pd.DataFrame, int]:
    """Events of ``n_users`` consecutive users; returns the frame and the requests used."""
    users = np.arange(first_user, first_user + n_users, dtype=np.uint64)
    treated = rng.random(n_users) < 0.5
    activity = rng.gamma(2.0, 1.0, n_users)
    start = T0_MS + rng.integers(0, 7 * DAY_MS, n_users)

    n_pre = rng.poisson(2.0 * activity)
    pre_u = np.repeat(np.arange(n_users), n_pre)
    pre = {
        "user_id": users[pre_u],
        "item_id": rng.integers(1, ITEMS + 1, pre_u.size),
        "event_type": rng.choice(np.array(["click", "play", "rating"]), pre_u.size),
        "ts_ms": start[pre_u] - rng.integers(1, 13 * DAY_MS, pre_u.size),
    }

    n_req = 1 + rng.poisson(activity)
    req_u = np.repeat(np.arange(n_users), n_req)
    later = rank_within(req_u, n_req) > 0
    req_ts = start[req_u] + np.where(later, rng.integers(1, 7 * DAY_MS, req_u.size), 0)
    req_id = (first_request + np.arange(req_u.size)).astype(str)
    latency = rng.lognormal(np.log(40.0), 0.3, req_u.size) + 3.0 * treated[req_u]
    failed = rng.random(req_u.size) < 0.01
    variant = np.where(treated, "treatment", "control")
    errors = {
        "user_id": users[req_u[failed]],
        "event_type": "error",
        "ts_ms": req_ts[failed],
        "experiment": EXPERIMENT,
        "variant": variant[req_u[failed]],
        "request_id": req_id[failed],
        "latency_ms": latency[failed],
    }

    served = np.flatnonzero(~failed)
    imp_r = np.repeat(served, ITEMS_PER_REQUEST)
    imp_u = req_u[imp_r]
    impressions = {
        "user_id": users[imp_u],
        "item_id": rng.integers(1, ITEMS + 1, imp_r.size),
        "event_type": "impression",
        "ts_ms": req_ts[imp_r],
        "experiment": EXPERIMENT,
        "variant": variant[imp_u],
        "request_id": req_id[imp_r],
        "model_version": np.where(treated[imp_u], "treatment-v1", "control-v1"),
        "position": np.tile(np.arange(ITEMS_PER_REQUEST), served.size),
        "latency_ms": latency[imp_r],
    }

    click_p = np.clip(0.06 * np.sqrt(activity), 0, 0.5) * (1.0 + effect * treated)
    clicked = rng.random(imp_r.size) < click_p[imp_u]
    click_ts = impressions["ts_ms"][clicked] + rng.integers(1000, 60_000, int(clicked.sum()))
    clicks = {
        "user_id": impressions["user_id"][clicked],
        "item_id": impressions["item_id"][clicked],
        "event_type": "click",
        "ts_ms": click_ts,
    }
    played = rng.random(click_ts.size) < 0.5
    plays = {
        "user_id": clicks["user_id"][played],
        "item_id": clicks["item_id"][played],
        "event_type": "play",
        "ts_ms": click_ts[played] + rng.integers(1000, 600_000, int(played.sum())),
    }

    frame = pd.concat(
        [pd.DataFrame(part) for part in (pre, errors, impressions, clicks, plays)],
        ignore_index=True,
    )
    redelivered = frame[rng.random(len(frame)) < 0.01]
    frame["event_id"] = uuid_texts(rng, len(frame))
    frame = pd.concat([frame, frame.loc[redelivered.index]], ignore_index=True)
    frame["item_id"] = frame["item_id"].astype("UInt64")
    frame["position"] = frame["position"].astype("UInt16")
    frame["schema_version"] = np.uint8(1)
    frame["user_id"] = frame["user_id"].astype(np.uint64)
    return frame, int(req_u.size)


Timing = tuple[str, float, float]  # step, wall-clock s, CPU s of this process


def timed(label: str, timings: list[Timing], fn: Callable[[], T]) -> T:
    """Run ``fn`` and record its wall-clock and CPU seconds (chdb runs in this process, so CPU
    seconds count the engine's threads too and depend less on what else runs on the machine)."""
    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    timings.append((label, time.perf_counter() - start, time.process_time() - cpu))
    print(f"{label}: {timings[-1][1]:.2f} s wall, {timings[-1][2]:.2f} s CPU", file=sys.stderr)
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=10_000_000, help="rows to insert (approx.)")
    parser.add_argument("--effect", type=float, default=0.05, help="relative click lift")
    parser.add_argument("--chunk-users", type=int, default=50_000)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    timings: list[Timing] = []
    gen_s = insert_s = gen_cpu = insert_cpu = 0.0
    rows = users_done = requests = 0

    with tempfile.TemporaryDirectory(prefix="readout10m-") as tmp:
        settings = Settings(data_dir=Path(tmp), clickhouse_dsn="")
        with analytics_client(settings) as client:
            genres = [
                list(rng.choice(GENRES, rng.integers(1, 4), replace=False)) for _ in range(ITEMS)
            ]
            items = pd.DataFrame(
                {"item_id": np.arange(1, ITEMS + 1), "title": "", "year": 0, "genres": genres}
            )
            load_item_dimension(client, items)
            target_users: int | None = None
            while target_users is None or users_done < target_users:
                n = (
                    args.chunk_users
                    if target_users is None
                    else min(args.chunk_users, target_users - users_done)
                )
                t, cpu = time.perf_counter(), time.process_time()
                frame, used = generate_chunk(rng, users_done + 1, n, requests, args.effect)
                gen_s += time.perf_counter() - t
                gen_cpu += time.process_time() - cpu
                t, cpu = time.perf_counter(), time.process_time()
                insert_event_frame(client, frame)
                insert_s += time.perf_counter() - t
                insert_cpu += time.process_time() - cpu
                rows, users_done, requests = rows + len(frame), users_done + n, requests + used
                if target_users is None:  # size the run from the first chunk's rows per user
                    target_users = max(n, round(args.events * n / len(frame)))
                print(f"{rows:,} rows, {users_done:,} users", file=sys.stderr)
            timings += [
                ("generate events (numpy)", gen_s, gen_cpu),
                ("insert_df, ~1M-row chunks", insert_s, insert_cpu),
            ]
            parts = int(
                query_df(
                    client,
                    "SELECT count() AS n FROM system.parts WHERE table = 'events' AND active",
                )["n"].iloc[0]
            )
            distinct = int(query_df(client, "SELECT count() AS n FROM events FINAL")["n"].iloc[0])
            days = settings.cuped_pre_days
            metrics = timed(
                f"metrics query, {parts} unmerged parts",
                timings,
                lambda: user_metrics(client, EXPERIMENT, pre_days=days),
            )
            readout = timed(
                "readout statistics (7 metrics)", timings, lambda: readout_from_metrics(metrics)
            )
            timed("format_readout", timings, lambda: format_readout(readout))
            timed(
                "experiment_readout end to end",
                timings,
                lambda: experiment_readout(client, EXPERIMENT, pre_days=days),
            )
            timed(
                "OPTIMIZE TABLE events FINAL",
                timings,
                lambda: command(client, "OPTIMIZE TABLE events FINAL"),
            )
            again = timed(
                "metrics query, merged (1 part)",
                timings,
                lambda: user_metrics(client, EXPERIMENT, pre_days=days),
            )
            # Counts must match exactly; the latency sum only up to float summation order.
            pd.testing.assert_frame_equal(again.users, metrics.users, check_exact=False, rtol=1e-9)

    table = ["| step | wall s | CPU s |", "|---|---:|---:|"]
    table += [f"| {step} | {wall:.2f} | {cpu:.2f} |" for step, wall, cpu in timings]
    ctr = readout.table.set_index("metric").loc["ctr"]
    command_line = " ".join(["python -m benchmarks.readout_10m", *(argv or sys.argv[1:])])
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    report = "\n".join(
        [
            f"## Experiment readout over {rows / 1e6:.1f}M events (chdb) — {when} — {machine()}",
            "",
            f"Command: `{command_line}`",
            "",
            f"{rows:,} rows inserted ({distinct:,} distinct events, 1 % redelivered twice) for "
            f"{users_done:,} users, {len(metrics.users):,} of them exposed; two variants, "
            f"true click lift {args.effect:+.0%}, seed 0. chdb 26.9 through clickhouse-connect "
            "1.12, one process, temp directory. Every query reads `events FINAL`. Measured CTR "
            f"lift {ctr['effect_rel']:+.2%} (95 % CI {ctr['ci_rel_low']:+.2%} to "
            f"{ctr['ci_rel_high']:+.2%}), p = {ctr['p_value']:.2g}. 1-minute load average: "
            f"{load_before:.2f} at start, {os.getloadavg()[0]:.2f} at the end; wall-clock "
            "seconds vary with load, CPU seconds (this process, chdb's threads included) less.",
            "",
            "\n".join(table),
            "",
        ]
    )
    print(format_readout(readout))
    print(report)
    if not args.no_append:
        append_section(args.results, report)


if __name__ == "__main__":
    main()
