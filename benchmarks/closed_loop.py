"""Does the A/B readout find the truth? Many seeded short closed-loop runs per scenario.

Each run is :func:`hymirec.closed_loop.run_closed_loop`: the 943 grounded ML-100K users
(``simulator.grounded``, world seed ``--world-seed``) arrive as a Poisson stream, the splitter's
hash (salted by the run's seed) puts each in an arm, the arm's pretrained model ranks the user's
history with the service's own code, the simulated user clicks and plays, and the readout's own
statistics judge the per-user frame. Shortcuts: no HTTP, broker, Feast or ClickHouse, no online
learning (models fixed at their pretrained version), histories in memory; latency and errors are
not simulated.

Per scenario (``aa``: sasrec in both arms; ``popular-vs-sasrec``; ``hymirec-vs-sasrec``; control
first) it reports the coverage of the true CTR lift by the readout's 95 % interval, for both
truths (the lists each arm served; everyone on treatment vs everyone on control), the share of
runs where CTR is significant after Holm (in A/A the false-positive rate, elsewhere the power:
significant and on the side of the truth), the share where any metric is (A/A's family-wise
error), the mean true and measured lifts, and the run time. Proportions carry Clopper-Pearson
95 % intervals: over 20 runs they are wide.

Run from the repository root: ``python -m benchmarks.closed_loop [--runs 20] [--requests N]
[--scenarios aa popular-vs-sasrec hymirec-vs-sasrec] [--results PATH]``. Prints a table and
appends it, with the date and the machine, to ``benchmarks/RESULTS.md`` (or ``--results``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest

from benchmarks.report import append_section, machine
from core.movielens import load_ratings
from core.settings import Settings
from hymirec.closed_loop import (
    SCENARIOS,
    ClosedLoopResult,
    pretrained_models,
    run_closed_loop,
    scenario_arms,
)
from model.data import build_catalog
from simulator.grounded import grounded_population

DEFAULT_REQUESTS = 3000


@dataclass(frozen=True)
class RunRow:
    """What one run contributes to its scenario's summary (the treatment's CTR row)."""

    seed: int
    served_truth: float
    counterfactual_truth: float
    measured: float
    ci_low: float
    ci_high: float
    significant: bool
    found: bool
    any_metric: bool
    users: int
    elapsed_s: float

    @classmethod
    def of(cls, result: ClosedLoopResult) -> RunRow:
        lift = result.lifts["treatment"]
        return cls(
            seed=result.seed,
            served_truth=lift.served_truth,
            counterfactual_truth=lift.counterfactual_truth,
            measured=lift.measured,
            ci_low=lift.ci_low,
            ci_high=lift.ci_high,
            significant=lift.significant_holm,
            found=lift.found,
            any_metric=result.any_holm_rejection,
            users=len(result.metrics.users),
            elapsed_s=result.elapsed_s,
        )


def share(hits: int, n: int) -> str:
    """``k/n (p %; Clopper-Pearson 95 % low-high)``."""
    ci = binomtest(hits, n).proportion_ci(0.95)
    return f"{hits}/{n} ({hits / n:.0%}; {ci.low:.0%}-{ci.high:.0%})"


def summary_row(scenario: str, rows: list[RunRow]) -> str:
    n = len(rows)
    served = sum(r.ci_low <= r.served_truth <= r.ci_high for r in rows)
    counterfactual = sum(r.ci_low <= r.counterfactual_truth <= r.ci_high for r in rows)
    aa = SCENARIOS[scenario][0] == SCENARIOS[scenario][1]
    ctr = sum(r.significant for r in rows) if aa else sum(r.found for r in rows)
    mean = {
        name: float(np.mean([getattr(r, name) for r in rows]))
        for name in ("served_truth", "counterfactual_truth", "measured", "users", "elapsed_s")
    }
    half = float(np.mean([(r.ci_high - r.ci_low) / 2 for r in rows]))
    cells = [
        scenario,
        f"{mean['served_truth']:+.1%}",
        f"{mean['counterfactual_truth']:+.1%}",
        f"{mean['measured']:+.1%} ± {half:.1%}",
        share(served, n),
        share(counterfactual, n),
        ("FPR " if aa else "power ") + share(ctr, n),
        share(sum(r.any_metric for r in rows), n),
        f"{mean['users']:.0f}",
        f"{mean['elapsed_s']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| scenario (control vs treatment) | true lift, served lists | true lift, counterfactual "
    "| measured CTR lift ± mean CI half-width | CI covers served truth | CI covers counterfactual "
    "| CTR significant after Holm | any metric significant after Holm | users per run | s per run |"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20, help="seeded runs per scenario")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="per run")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=[*SCENARIOS])
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--world-seed", type=int, default=0, help="the simulated users' fit")
    parser.add_argument("--rate", type=float, default=20.0, help="arrivals per simulated second")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()

    settings = Settings(cache_dir=Path(".hymirec/cache"))
    catalog = build_catalog(settings)
    population = grounded_population(
        load_ratings(), seed=args.world_seed, cache_dir=settings.embedding_cache_dir
    )
    names = {name for scenario in args.scenarios for name in SCENARIOS[scenario]}
    models = pretrained_models(sorted(names), catalog, settings.embedding_cache_dir)
    setup_s = time.perf_counter() - started

    lines = []
    for scenario in args.scenarios:
        arms = scenario_arms(scenario, models)
        rows = []
        for seed in range(args.first_seed, args.first_seed + args.runs):
            result = run_closed_loop(
                population,
                arms,
                catalog=catalog,
                requests=args.requests,
                seed=seed,
                control="control",
                rate_per_s=args.rate,
            )
            rows.append(RunRow.of(result))
            r = rows[-1]
            print(
                f"{scenario} seed {seed}: truth {r.served_truth:+.3f} / "
                f"{r.counterfactual_truth:+.3f}, measured {r.measured:+.3f} "
                f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}], significant {r.significant}, "
                f"any metric {r.any_metric}, {r.elapsed_s:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        lines.append(summary_row(scenario, rows))

    total_s = time.perf_counter() - started
    table = "\n".join([HEADER, "|---" + "|---:" * 9 + "|", *lines])
    command_line = " ".join(["python -m benchmarks.closed_loop", *(argv or sys.argv[1:])])
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    versions = ", ".join(f"{name} {m.version}" for name, m in sorted(models.items()))
    report = "\n".join(
        [
            f"## Closed-loop A/B readout against the simulator's truth — {when} — {machine()}",
            "",
            f"Command: `{command_line}`",
            "",
            f"{args.runs} seeded runs per scenario (seeds {args.first_seed}-"
            f"{args.first_seed + args.runs - 1}: arrivals, the splitter's salt, clicks), "
            f"{args.requests:,} requests each at {args.rate:g}/s simulated, k = 10, equal "
            f"split; the 943 grounded ML-100K users (world seed {args.world_seed}); models fixed "
            f"at their pretrained versions ({versions}). In process "
            "(`hymirec.closed_loop`): the service's ranking code and the readout's statistics, "
            "but no HTTP, broker, Feast or ClickHouse, no online learning, histories in memory "
            "(clicks and plays appended as the stream worker does), no latency or errors "
            "simulated. Truths: the ratio of mean exact expected CTR over the lists each arm "
            "served, and over all requests had everyone got treatment vs control (0 in A/A). "
            "CTR lift and interval: the readout's delta method, relative; Holm over the 5 "
            "metrics with a p-value. Proportions: k/n (share; Clopper-Pearson 95 % interval). "
            f"Set-up (catalogue, world, models) {setup_s:.0f} s, total {total_s:.0f} s; "
            f"1-minute load average {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at the "
            "end (seconds per run vary with load; the statistics do not).",
            "",
            table,
            "",
        ]
    )
    print(report)
    if not args.no_append:
        append_section(args.results, report)


if __name__ == "__main__":
    main()
