"""How long a full experiment readout takes over 10 million events in the embedded ClickHouse.

Generates a synthetic two-variant experiment (vectorised numpy, seed 0) with a known effect: the
treatment multiplies every user's click probability by 1 + ``--effect`` (so clicks, plays,
conversion and CTR rise by about that much) and adds 3 ms to request latency. Users have a gamma
"activity" that drives both their pre-experiment events (the CUPED covariate) and their traffic,
so CUPED has something to remove. Rows go in with ``insert_df`` in chunks of about a million, and
1 % of each chunk's rows are delivered again in a separate insert right after it (a sink re-reading
a batch), so ``events`` holds many unmerged parts with copies that only ``FINAL`` collapses (copies
inside one insert block would collapse at insert and leave ``FINAL`` nothing to do).

Timed: the readout's SQL (``variant_sums``: per-variant sums, squares and cross products) against
a hand-written query of the same sums in the same run, interleaved (``readout_reference``); a
hand-written query over ``events`` alone; the readout's public path end to end
(``experiment_readout``: ``variant_sums`` and the statistics of every metric, CUPED, guardrails)
against the hand-written query with the same statistics (``readout_table_from_sums``), interleaved;
the per-user path (``user_metrics`` + ``readout_from_metrics``, the reference of the tests) and
what the publisher adds on that frame (``build_snapshot``: the readout from the frame's sums and
the cumulative series; ``request_guardrails``); then the queries again after ``OPTIMIZE TABLE ...
FINAL``. Every pair of paths is checked to give the same numbers.

Run from the repository root: ``python -m benchmarks.readout_10m [--events N]``. Prints a table and
appends it, with the date and the machine, to ``benchmarks/RESULTS.md`` (``--no-append``: print).
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
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pandas as pd
from clickhouse_connect.driver.client import Client

from abtest.clickhouse import (
    SCHEMA_VERSION,
    analytics_client,
    command,
    insert_event_frame,
    load_item_dimension,
    query_df,
)
from abtest.metrics import (
    MS_PER_DAY,
    ExperimentMetrics,
    ExperimentSums,
    user_metrics,
    variant_sums,
    variant_sums_from_users,
)
from abtest.publish import build_snapshot, request_guardrails
from abtest.readout import Readout, experiment_readout, format_readout, readout_from_metrics
from benchmarks.readout_reference import (
    EVENTS_ONLY_SQL,
    HAND_WRITTEN_SQL,
    readout_table_from_sums,
    sums_frame,
    sums_from_frame,
)
from benchmarks.report import append_section, machine
from core.settings import Settings

T = TypeVar("T")
DAY_MS = 86_400_000
T0_MS = 1_767_225_600_000  # 2026-01-01 UTC: the experiment starts; exposures spread over 7 days
EXPERIMENT = "ranker-10m"
ITEMS = 2000
_GENRE_NAMES = (  # MovieLens-100K's 19 genres
    "Action Adventure Animation Children Comedy Crime Documentary Drama Fantasy Film-Noir Horror "
    "Musical Mystery Romance Sci-Fi Thriller War Western unknown"
)
GENRES = np.array(_GENRE_NAMES.split())
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
    ranks: np.ndarray = np.arange(groups.size) - starts
    return ranks


def generate_chunk(
    rng: np.random.Generator, first_user: int, n_users: int, first_request: int, effect: float
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Events of ``n_users`` consecutive users: the frame, the 1 % of its rows that get delivered
    a second time (the same event ids), and the number of requests used."""
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
    impressions: dict[str, Any] = {
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
    clicks: dict[str, Any] = {
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
    frame["event_id"] = uuid_texts(rng, len(frame))
    frame["item_id"] = frame["item_id"].astype("UInt64")
    frame["position"] = frame["position"].astype("UInt16")
    frame["schema_version"] = np.uint8(1)
    frame["user_id"] = frame["user_id"].astype(np.uint64)
    redelivered = frame[rng.random(len(frame)) < 0.01].reset_index(drop=True)
    return frame, redelivered, int(req_u.size)


Timing = tuple[str, float, float]  # step, wall-clock s, CPU s of this process


class LoadedEvents(NamedTuple):
    rows: int  # inserted, redeliveries included
    users: int
    distinct: int  # events after deduplication


REPEAT = 3  # the query steps: the fastest of this many runs (interleaved, same data)


def timed(label: str, timings: list[Timing], fn: Callable[[], T], repeat: int = 1) -> T:
    """Run ``fn`` ``repeat`` times and record the fastest run's wall-clock and CPU seconds (chdb
    runs in this process, so CPU seconds count the engine's threads too and depend less on what
    else runs on the machine)."""
    best: Timing | None = None
    for _ in range(repeat):
        start, cpu = time.perf_counter(), time.process_time()
        value = fn()
        run = (label, time.perf_counter() - start, time.process_time() - cpu)
        best = run if best is None or run[1] < best[1] else best
    assert best is not None
    timings.append(best)
    print(f"{label}: {best[1]:.2f} s wall, {best[2]:.2f} s CPU", file=sys.stderr)
    return value


def load_events(client: Client, args: argparse.Namespace, timings: list[Timing]) -> LoadedEvents:
    """Generate and insert the events chunk by chunk; each chunk's redeliveries go in a separate
    insert right after it (a sink that re-reads a batch), so ``FINAL`` has copies to collapse."""
    rng = np.random.default_rng(0)
    genres = [list(rng.choice(GENRES, rng.integers(1, 4), replace=False)) for _ in range(ITEMS)]
    items = pd.DataFrame(
        {"item_id": np.arange(1, ITEMS + 1), "title": "", "year": 0, "genres": genres}
    )
    load_item_dimension(client, items)
    gen_s = insert_s = gen_cpu = insert_cpu = 0.0
    rows = users = requests = 0
    target_users: int | None = None
    while target_users is None or users < target_users:
        left = args.chunk_users if target_users is None else target_users - users
        n = min(args.chunk_users, left)
        t, cpu = time.perf_counter(), time.process_time()
        frame, again, used = generate_chunk(rng, users + 1, n, requests, args.effect)
        gen_s += time.perf_counter() - t
        gen_cpu += time.process_time() - cpu
        t, cpu = time.perf_counter(), time.process_time()
        insert_event_frame(client, frame)
        insert_event_frame(client, again)  # redelivered: a separate insert, as a sink does
        insert_s += time.perf_counter() - t
        insert_cpu += time.process_time() - cpu
        rows += len(frame) + len(again)
        users, requests = users + n, requests + used
        if target_users is None:  # size the run from the first chunk's rows per user
            target_users = max(n, round(args.events * n / (len(frame) + len(again))))
        print(f"{rows:,} rows, {users:,} users", file=sys.stderr)
    timings += [
        ("generate events (numpy)", gen_s, gen_cpu),
        ("insert_df, ~1M-row chunks and their redeliveries", insert_s, insert_cpu),
    ]
    return LoadedEvents(rows, users, scalar(client, "SELECT count() FROM events FINAL"))


def scalar(client: Client, sql: str) -> int:
    return int(query_df(client, sql).iloc[0, 0])


def check_sums(label: str, sums: ExperimentSums, reference: pd.DataFrame) -> None:
    """Integer sums must match exactly; those with the latency (floats) up to summation order."""
    ours = sums_frame(sums)
    theirs = reference.set_index("variant").loc[ours["variant"]].reset_index()
    for column in ours.columns[1:]:
        exact = "latency_ms_sum" not in column
        np.testing.assert_allclose(
            ours[column].to_numpy(np.float64),
            theirs[column].to_numpy(np.float64),
            rtol=0 if exact else 1e-12,
            err_msg=f"{label}: {column}",
        )
    if "excluded" in reference:  # a query's count; sums_frame has none
        assert int(reference["excluded"].sum()) == sums.excluded_users, label


def time_queries(client: Client, days: int, timings: list[Timing], label: str) -> ExperimentSums:
    """The readout's SQL and the hand-written reference, interleaved; both must agree."""
    params = {"experiment": EXPERIMENT, "pre_window_ms": days * MS_PER_DAY}
    sums = variant_sums(client, EXPERIMENT, pre_days=days)
    hand = query_df(client, HAND_WRITTEN_SQL, params)
    check_sums("hand-written", sums, hand)
    for _ in range(REPEAT):
        timed(
            f"variant_sums: the readout's SQL, {label}",
            timings,
            lambda: variant_sums(client, EXPERIMENT, pre_days=days),
        )
        timed(
            f"hand-written query of the same sums, {label}",
            timings,
            lambda: query_df(client, HAND_WRITTEN_SQL, params),
        )
    return sums


PUBLIC_PATH = "experiment_readout end to end (variant_sums + statistics of all 7 metrics)"
BY_HAND = "hand-written query + the same statistics (readout_table_from_sums)"


def time_readouts(client: Client, days: int, timings: list[Timing]) -> Readout:
    """The readout's public path against the hand-written query with the same statistics,
    interleaved; both tables must agree."""
    params = {"experiment": EXPERIMENT, "pre_window_ms": days * MS_PER_DAY}

    def by_hand() -> pd.DataFrame:
        frame = query_df(client, HAND_WRITTEN_SQL, params)
        return readout_table_from_sums(sums_from_frame(frame, EXPERIMENT, days))

    readout = experiment_readout(client, EXPERIMENT, pre_days=days)
    pd.testing.assert_frame_equal(readout.table, by_hand(), check_exact=False, rtol=1e-9)
    for _ in range(REPEAT):
        timed(PUBLIC_PATH, timings, lambda: experiment_readout(client, EXPERIMENT, pre_days=days))
        timed(BY_HAND, timings, by_hand)
    return readout


def merge(client: Client) -> None:
    for table in ("events", "exposure_users", "exposure_requests"):
        command(client, f"OPTIMIZE TABLE {table} FINAL")


def best(timings: list[Timing], label: str) -> Timing:
    """The fastest of the runs recorded under ``label``."""
    return min((t for t in timings if t[0] == label), key=lambda t: t[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=10_000_000, help="rows to insert (approx.)")
    parser.add_argument("--effect", type=float, default=0.05, help="relative click lift")
    parser.add_argument("--chunk-users", type=int, default=50_000)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    timings: list[Timing] = []
    with tempfile.TemporaryDirectory(prefix="readout10m-") as tmp:
        settings = Settings(data_dir=Path(tmp), clickhouse_dsn="")
        days = settings.readout.cuped_pre_days
        with analytics_client(settings.clickhouse) as client:
            loaded = load_events(client, args, timings)
            parts = scalar(
                client, "SELECT count() FROM system.parts WHERE table = 'events' AND active"
            )
            label = f"{parts} unmerged parts"
            sums = time_queries(client, days, timings, label)
            params = {"experiment": EXPERIMENT, "pre_window_ms": days * MS_PER_DAY}
            events_only = timed(
                "hand-written query on events and items alone (no aggregates)",
                timings,
                lambda: query_df(client, EVENTS_ONLY_SQL, params),
            )
            check_sums("events only", sums, events_only)
            readout = time_readouts(client, days, timings)
            metrics = timed(
                f"user_metrics (per-user frame), {label}",
                timings,
                lambda: user_metrics(client, EXPERIMENT, pre_days=days),
            )
            reference = timed(
                "readout_from_metrics (statistics of the per-user frame)",
                timings,
                lambda: readout_from_metrics(metrics),
            )
            pd.testing.assert_frame_equal(
                readout.table, reference.table, check_exact=False, rtol=1e-9
            )
            assert variant_sums_from_users(metrics).users == sums.users == dict(readout.users)
            requests = timed(
                "publisher: request_guardrails (p50/p99 latency, errors)",
                timings,
                lambda: request_guardrails(client, EXPERIMENT),
            )
            timed(
                "publisher: build_snapshot on the frame (readout from its sums, cumulative series)",
                timings,
                lambda: build_snapshot(metrics, requests, notes="benchmark"),
            )
            timed(
                "OPTIMIZE TABLE ... FINAL (events and the aggregates)",
                timings,
                lambda: merge(client),
            )
            merged = time_queries(client, days, timings, "merged (1 part)")
            check_sums("merged", merged, sums_frame(sums))
            assert merged.excluded_users == sums.excluded_users
    print(format_readout(readout))
    report = render(args, argv, loaded, metrics, readout, timings, label, load_before)
    print(report)
    if not args.no_append:
        append_section(args.results, report)


def render(
    args: argparse.Namespace,
    argv: list[str] | None,
    loaded: LoadedEvents,
    metrics: ExperimentMetrics,
    readout: Readout,
    timings: list[Timing],
    label: str,
    load_before: float,
) -> str:
    """The RESULTS.md section: what ran, the table of steps, the ratio to the reference."""
    steps: dict[str, Timing] = {}
    for step in timings:  # one line per step: its fastest run
        steps[step[0]] = best(timings, step[0])
    table = ["| step | wall s | CPU s |", "|---|---:|---:|"]
    table += [f"| {step} | {wall:.2f} | {cpu:.2f} |" for step, wall, cpu in steps.values()]
    ours = steps[f"variant_sums: the readout's SQL, {label}"]
    hand = steps[f"hand-written query of the same sums, {label}"]
    public, by_hand = steps[PUBLIC_PATH], steps[BY_HAND]
    ctr = readout.table.set_index("metric").loc["ctr"]
    command_line = " ".join(["python -m benchmarks.readout_10m", *(argv or sys.argv[1:])])
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return "\n".join(
        [
            f"## Experiment readout over {loaded.rows / 1e6:.1f}M events (chdb) — {when} — "
            f"{machine()}",
            "",
            f"Command: `{command_line}`",
            "",
            f"{loaded.rows:,} rows inserted ({loaded.distinct:,} distinct events; 1 % of each "
            f"chunk redelivered in a separate insert) for {loaded.users:,} users, "
            f"{len(metrics.users):,} of them exposed; two variants, true click lift "
            f"{args.effect:+.0%}, seed 0. chdb through clickhouse-connect, one process, temp "
            f"directory, schema version {SCHEMA_VERSION}. Query steps: the fastest of "
            f"{REPEAT} interleaved runs. The readout's SQL against the hand-written query of the "
            f"same sums in the same run: {ours[1] / hand[1]:.2f}× wall, {ours[2] / hand[2]:.2f}× "
            f"CPU; the whole readout (experiment_readout) {public[1]:.2f} s wall / "
            f"{public[2]:.2f} s CPU, {public[1] / by_hand[1]:.2f}× the hand-written query with the "
            "same statistics. "
            "The queries agree (integer sums exactly, latency sums to 1e-12), and "
            "experiment_readout equals the readout of the hand-written sums and the per-user "
            "readout (rtol 1e-9). "
            f"Measured CTR lift {ctr['effect_rel']:+.2%} (95 % CI {ctr['ci_rel_low']:+.2%} to "
            f"{ctr['ci_rel_high']:+.2%}). 1-minute load average: {load_before:.2f} at start, "
            f"{os.getloadavg()[0]:.2f} at the end; wall-clock seconds vary with load, CPU seconds "
            "(this process, chdb's threads included) less.",
            "",
            "\n".join(table),
            "",
        ]
    )


if __name__ == "__main__":
    main()
