"""The console view of a readout (``hymirec readout NAME``): the SRM verdict and one line per row.

Each row shows its p-value beside the interval on the same scale (``p_scale``): the lift's
interval for a relative p-value, the absolute difference's (marked "abs") otherwise, so a
significant p never sits beside an interval across zero.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from abtest.readout import Readout

__all__ = ["format_readout"]


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _interval(low: Any, high: Any, spec: str) -> str:
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return "-"
    return f"[{format(low, spec)}, {format(high, spec)}]"


def format_readout(readout: Readout) -> str:
    """A console table: one line per metric × treatment, with the SRM verdict above it."""
    lines = [f"experiment {readout.experiment!r}: control {readout.control!r}"]
    lines.append(
        "users: "
        + ", ".join(f"{v}={n}" for v, n in readout.users.items())
        + f"; excluded (exposed to several variants): {readout.excluded_users}"
    )
    if readout.srm is not None:
        verdict = "MISMATCH: do not trust the effects" if readout.srm.mismatch else "ok"
        total = sum(readout.srm.expected) or 1.0
        expected = "/".join(f"{e / total:.1%}" for e in readout.srm.expected)
        basis = "configured weights" if readout.weights else "an equal split"
        lines.append(
            f"sample ratio ({'/'.join(readout.srm_arms)}) against {basis} ({expected}): "
            f"chi2={readout.srm.chi2:.3f} p={readout.srm.p_value:.4g} -> {verdict}"
        )
    if readout.notes:
        lines.append(f"notes: {readout.notes}")
    if readout.table.empty:
        lines.append("no treatment with exposed users to compare")
        return "\n".join(lines)
    header = (
        f"{'metric':<16} {'treatment':<12} {'method':<16} {'control':>10} {'treat':>10} "
        f"{'lift':>8} {'CI (p scale)':>24} {'p':>8} {'p_holm':>8} {'p_bh':>8} {'P(win)':>7} "
        f"{'risk':>8} {'p_seq':>8}"
    )
    lines += [header, "-" * len(header)]
    for r in readout.table.itertuples(index=False):
        name = f"{r.metric}{'*' if r.guardrail else ''}"
        lines.append(
            f"{name:<16} {r.treatment:<12} {r.method:<16} {_num(r.control_mean, '10.4g')} "
            f"{_num(r.treatment_mean, '10.4g')} {_num(r.effect_rel, '+8.2%')} "
            f"{_shown_interval(r):>24} {_num(r.p_value, '8.4f')} "
            f"{_num(r.p_holm, '8.4f')} {_num(r.p_bh, '8.4f')} {_num(r.chance_to_win, '7.1%')} "
            f"{_num(r.expected_loss, '8.4f')} {_num(r.p_sequential, '8.4f')}"
            + ("" if r.message == "ok" else f"  ({r.message})")
        )
    lines.append(
        f"* guardrail (lower is better). lift = effect / control mean. p tests the lift and its CI "
        f"is the lift's (delta method); 'abs' marks rows that test the absolute difference "
        f"instead. CIs at {1 - readout.alpha:.0%}; risk = expected relative loss of shipping the "
        "treatment."
    )
    lines.append(f"Bayesian columns: {readout.prior}.")
    lines.append(_sequential_note(readout))
    return "\n".join(lines)


def _shown_interval(row: Any) -> str:
    """The interval on the scale of the row's p-value."""
    if row.p_scale == "absolute":
        return "abs " + _interval(row.ci_abs_low, row.ci_abs_high, "+.4g")
    return _interval(row.ci_rel_low, row.ci_rel_high, "+.1%")


def _sequential_note(readout: Readout) -> str:
    states = readout.sequential
    if not states:
        return "p_seq: mSPRT, tau not fixed yet (too few users per arm)."
    looks = max(s.looks for s in states)
    sources = sorted({s.tau_source for s in states})
    horizon = next((s.horizon_users_per_arm for s in states if s.horizon_users_per_arm), None)
    basis = " and ".join(
        f"the planned horizon ({horizon:,} users per arm)" if src == "horizon" else "stated values"
        for src in sources
    )
    return (
        f"p_seq: mSPRT always-valid p-value, running minimum over {looks} look(s); tau fixed once "
        f"per metric from {basis}."
    )
