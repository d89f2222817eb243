"""Does the readout's sequential p-value stay valid under peeking? A summary-statistics simulation.

Each simulated experiment has two arms of a per-user metric, N(1, 1) in control and N(1 + δ, 1)
in treatment, observed at ``--looks`` looks spaced geometrically from ``--min-users`` to
``--max-users`` users per arm. Between looks each arm's sufficient statistics grow by the exact
law of normal data (the batch sum is normal, its centred sum of squares σ²·χ²), so a run of 1e7
users per arm costs the same as one of 100: a Brownian-motion simulation, exact for normal data.

At every look the readout's own row is computed through its public path,
``abtest.readout.compare_statistics`` (what ``readout_from_metrics`` calls for each metric ×
treatment row), with the previous look's ``SequentialState``, exactly as the publisher advances
it from snapshot to snapshot. Its ``p_sequential`` is the mSPRT p-value with τ fixed once, at
the first look, for the planned horizon (``--horizon``, by default the last look), and the
running minimum carried. A run is a false positive (δ = 0) or a detection (δ ≠ 0) when
``p_sequential`` < α at any look, i.e. at the last look, since it is a running minimum.

For comparison, from the same simulated statistics (vectorised): the previous readout's rule, τ
re-tuned to the current users per arm at every look; Welch's fixed-horizon p-value read at every
look ("peeking"); and Welch's at the last look only. The benchmark also checks that the readout
path's p-values equal a vectorised mSPRT at the same τ (``always_valid_p_values``).

δ defaults to the effect that Welch's test detects with 80 % power at the horizon,
δ = (z₀.₉₇₅ + z₀.₈)·σ·sqrt(2/N). Run from the repository root:
``python -m benchmarks.sequential_fpr [--sims 2000] [--looks 1000] [--max-users 1e7]
[--horizon N] [--seed 0] [--no-append]``. Prints a table and appends it, with the date and the
machine, to ``benchmarks/RESULTS.md`` (or ``--results``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import stats
from scipy.stats import binomtest

from abtest.readout import READOUT_METRICS, compare_statistics
from abtest.sequential_looks import SequentialPlan, SequentialState
from abtest.stats import SampleMeanStatistic, always_valid_p_values, msprt_tau
from benchmarks.report import append_section, machine

ALPHA = 0.05
BASE_MEAN, SD = 1.0, 1.0
SPEC = next(s for s in READOUT_METRICS if s.name == "genres_consumed")  # a plain Welch metric

Array = NDArray[np.float64]


@dataclass(frozen=True)
class Arms:
    """Cumulative sufficient statistics per simulated experiment (rows) and look (columns)."""

    n: NDArray[np.int64]  # users per arm at each look (the same for every experiment)
    sum_c: Array
    sq_c: Array
    sum_t: Array
    sq_t: Array


def look_sizes(looks: int, min_users: int, max_users: int) -> NDArray[np.int64]:
    """``looks`` users-per-arm counts, geometrically spaced and distinct, ending at max_users."""
    sizes = np.unique(np.round(np.geomspace(min_users, max_users, looks)).astype(np.int64))
    if sizes.size != looks:
        raise ValueError(f"{looks} distinct looks do not fit in [{min_users}, {max_users}]")
    return sizes


def _arm(
    rng: np.random.Generator, sims: int, n: NDArray[np.int64], mean: float
) -> tuple[Array, Array]:
    """Cumulative Σx and Σx² of N(mean, SD²) users, batch by batch (exact for normal data)."""
    m = np.diff(n, prepend=0).astype(np.float64)
    batch_sum = rng.normal(m * mean, SD * np.sqrt(m), (sims, m.size))
    centred = SD**2 * rng.chisquare(np.maximum(m - 1.0, 1.0), (sims, m.size)) * (m > 1)
    return np.cumsum(batch_sum, axis=1), np.cumsum(centred + batch_sum**2 / m, axis=1)


def simulate(rng: np.random.Generator, sims: int, n: NDArray[np.int64], effect: float) -> Arms:
    sum_c, sq_c = _arm(rng, sims, n, BASE_MEAN)
    sum_t, sq_t = _arm(rng, sims, n, BASE_MEAN + effect)
    return Arms(n, sum_c, sq_c, sum_t, sq_t)


def readout_p_sequential(arms: Arms, plan: SequentialPlan) -> tuple[Array, Array]:
    """Per experiment and look, the readout's ``p_sequential`` through ``compare_statistics``,
    and the fixed τ of each experiment."""
    sims, looks = arms.sum_c.shape
    p = np.full((sims, looks), np.nan)
    taus = np.full(sims, np.nan)
    for i in range(sims):
        state: SequentialState | None = None
        for k in range(looks):
            n = int(arms.n[k])
            control = SampleMeanStatistic(n, float(arms.sum_c[i, k]), float(arms.sq_c[i, k]))
            treatment = SampleMeanStatistic(n, float(arms.sum_t[i, k]), float(arms.sq_t[i, k]))
            row, state = compare_statistics(
                SPEC,
                control,
                treatment,
                treatment_name="treatment",
                alpha=ALPHA,
                sequential=plan,
                previous=state,
            )
            if row["p_sequential"] is not None:
                p[i, k] = row["p_sequential"]
        taus[i] = np.nan if state is None else state.tau
    return p, taus


def _arm_variances(arms: Arms) -> tuple[Array, Array, Array]:
    """Effect and the two arms' sample variances per experiment and look (vectorised)."""
    n = arms.n.astype(np.float64)
    mean_c, mean_t = arms.sum_c / n, arms.sum_t / n
    var_c = (arms.sq_c - arms.sum_c * mean_c) / (n - 1)
    var_t = (arms.sq_t - arms.sum_t * mean_t) / (n - 1)
    return mean_t - mean_c, var_c, var_t


def _moments(arms: Arms) -> tuple[Array, Array, Array]:
    """Effect, its Welch variance and the pooled sd per experiment and look (vectorised)."""
    effect, var_c, var_t = _arm_variances(arms)
    return effect, (var_c + var_t) / arms.n, np.sqrt((var_c + var_t) / 2)


def retuned_each_look(arms: Arms) -> Array:
    """The previous readout's rule: τ = msprt_tau(pooled sd, users per arm now) at every look."""
    effect, variance, sd = _moments(arms)
    u = msprt_tau(1.0, 2.0, alpha=ALPHA) ** 2  # τ² = u·2sd²/n with sd = 1, n = 2
    tau2 = u * 2 * sd**2 / arms.n
    log_lr = 0.5 * np.log(variance / (variance + tau2)) + effect**2 * tau2 / (
        2 * variance * (variance + tau2)
    )
    out: Array = np.minimum.accumulate(np.exp(-np.maximum(log_lr, 0.0)), axis=1)
    return out


def welch_p(arms: Arms) -> Array:
    """Welch's two-sided p-value (Welch–Satterthwaite df) per experiment and look."""
    effect, var_c, var_t = _arm_variances(arms)
    vc, vt = var_c / arms.n, var_t / arms.n
    df = (vc + vt) ** 2 / ((vc**2 + vt**2) / (arms.n - 1.0))
    out: Array = 2 * stats.t.sf(np.abs(effect) / np.sqrt(vc + vt), df)
    return out


def vectorised_reference(arms: Arms, taus: Array) -> Array:
    """``always_valid_p_values`` at each experiment's τ (independent of the readout path)."""
    effect, variance, _ = _moments(arms)
    return np.vstack(
        [always_valid_p_values(effect[i], variance[i], float(taus[i])) for i in range(taus.size)]
    )


def _rate(hits: int, sims: int) -> str:
    ci = binomtest(hits, sims).proportion_ci(0.95)
    return f"{hits / sims:.2%} [{ci.low:.2%}, {ci.high:.2%}]"


def run(args: argparse.Namespace) -> tuple[str, list[str]]:
    n = look_sizes(args.looks, args.min_users, int(args.max_users))
    horizon = int(args.horizon or n[-1])
    plan = SequentialPlan(horizon_users_per_arm=horizon, min_users_per_arm=args.min_users)
    effect = args.effect or (stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(0.8)) * SD * math.sqrt(
        2 / horizon
    )
    rng = np.random.default_rng(args.seed)
    rows, notes = [], []
    results: dict[str, dict[str, int]] = {}
    for label, delta in (("null", 0.0), ("effect", effect)):
        started = time.perf_counter()
        arms = simulate(rng, args.sims, n, delta)
        p_readout, taus = readout_p_sequential(arms, plan)
        reference = vectorised_reference(arms, taus)
        gap = float(np.nanmax(np.abs(p_readout - reference) / np.maximum(reference, 1e-300)))
        welch = welch_p(arms)
        results[label] = {
            "readout": int((p_readout[:, -1] < ALPHA).sum()),
            "retuned": int((retuned_each_look(arms)[:, -1] < ALPHA).sum()),
            "peeking": int((welch < ALPHA).any(axis=1).sum()),
            "last": int((welch[:, -1] < ALPHA).sum()),
        }
        first = np.argmax(p_readout < ALPHA, axis=1)
        hit = (p_readout < ALPHA).any(axis=1)
        median_n = float(np.median(n[first[hit]])) if hit.any() else float("nan")
        notes.append(
            f"{label}: {time.perf_counter() - started:.0f} s; readout vs vectorised mSPRT at the "
            f"same τ: max relative difference {gap:.1e}; τ (fixed at the first look) median "
            f"{np.nanmedian(taus):.3g}; median users per arm at the first rejection "
            f"{median_n:,.0f}"
        )
        print(notes[-1], file=sys.stderr, flush=True)
    names = {
        "readout": "readout `p_sequential` (τ fixed once, running minimum)",
        "retuned": "τ re-tuned to the users at every look (the previous readout)",
        "peeking": "Welch's fixed-horizon p at every look (peeking)",
        "last": "Welch's fixed-horizon p at the last look only",
    }
    for key, name in names.items():
        fp, power = results["null"][key], results["effect"][key]
        rows.append(f"| {name} | {_rate(fp, args.sims)} | {_rate(power, args.sims)} |")
    header = (
        f"{args.looks:,} looks from {n[0]:,} to {n[-1]:,} users per arm (geometric), "
        f"{args.sims:,} simulated experiments per column, seed {args.seed}; metric N(1, 1) per "
        f"user; τ for the planned horizon of {horizon:,} users per arm; effect δ = {effect:.4g} "
        f"(Welch's 80 % power at the horizon); α = {ALPHA}. Rates with Clopper-Pearson 95 % "
        "intervals."
    )
    table = [
        "| test | false-positive rate (δ = 0) | power (δ as stated) |",
        "|---|---:|---:|",
        *rows,
    ]
    return header, [*table, "", *(f"- {note}" for note in notes)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sims", type=int, default=2000, help="experiments per scenario")
    parser.add_argument("--looks", type=int, default=1000)
    parser.add_argument("--min-users", type=int, default=100, help="users per arm, first look")
    parser.add_argument("--max-users", type=float, default=1e7, help="users per arm, last look")
    parser.add_argument("--horizon", type=int, default=None, help="planned users per arm")
    parser.add_argument("--effect", type=float, default=None, help="δ (default: 80%% MDE)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    header, lines = run(args)
    command_line = " ".join(["python -m benchmarks.sequential_fpr", *(argv or sys.argv[1:])])
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    report = "\n".join(
        [
            f"## Sequential p-value under peeking — {when} — {machine()}",
            "",
            f"Command: `{command_line}` ({time.perf_counter() - started:.0f} s)",
            "",
            header,
            "",
            *lines,
            "",
        ]
    )
    print(report)
    if not args.no_append:
        append_section(args.results, report)


if __name__ == "__main__":
    main()
