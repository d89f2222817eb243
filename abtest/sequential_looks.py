"""The readout's sequential test across looks: τ fixed once per experiment and metric.

An mSPRT p-value (``abtest.stats.sequential``) is always valid only for a mixing parameter τ fixed
before the looks it covers; re-tuning τ to the data at every look makes the false-positive rate
grow with the number of looks. So the readout fixes τ once per metric × treatment and carries,
from look to look, the running minimum of the p-value and the running intersection of the
confidence sequence in a ``SequentialState``. The publisher writes the states into the
experiment's snapshot and reads them back at its next look (``abtest.publish``), so they survive
restarts of the publisher; ``hymirec readout NAME`` reads them too, without writing.

Where τ comes from (a ``SequentialPlan``, built from the experiment's ``sequential`` block in the
experiments file, ``abtest.experiments.SequentialConfig``):

- a stated τ for the metric (``tau: {ctr: 0.002}``): the sd of the normal mixture over the effect,
  a prior guess of the effect's size in the metric's absolute units; or else
- the planned horizon: at the first look where both arms have ``min_users_per_arm`` users, the τ
  that makes the confidence sequence tightest at ``horizon_users_per_arm`` users per arm, from the
  estimator's variance at that look (``msprt_tau_at_horizon``). Only the variance is used, never
  the effect, so fixing τ does not peek at the outcome.

The effect and variance of each look are those of the readout's own estimator (CUPED-adjusted
where the readout uses CUPED). A plan that no longer matches a state (a stated τ edited or
removed, the horizon or alpha changed mid-experiment) is refused with ``ExperimentConfigError``:
the running minimum is valid for one τ only. To start a new sequence (a new phase of the
experiment), delete the experiment's snapshot file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

from abtest.stats import SequentialLook, msprt_look, msprt_tau_at_horizon
from core.errors import ExperimentConfigError

__all__ = [
    "DEFAULT_HORIZON_USERS_PER_ARM",
    "DEFAULT_MIN_USERS_PER_ARM",
    "SequentialPlan",
    "SequentialState",
    "sequential_step",
    "states_by_key",
]

DEFAULT_HORIZON_USERS_PER_ARM = 10_000
DEFAULT_MIN_USERS_PER_ARM = 100

TauSource = Literal["stated", "horizon"]


@dataclass(frozen=True)
class SequentialPlan:
    """How τ is chosen for an experiment: stated per metric, or from the planned horizon."""

    horizon_users_per_arm: int = DEFAULT_HORIZON_USERS_PER_ARM
    min_users_per_arm: int = DEFAULT_MIN_USERS_PER_ARM
    tau: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.horizon_users_per_arm < 2 or self.min_users_per_arm < 2:
            raise ValueError("horizon_users_per_arm and min_users_per_arm must be >= 2")
        bad = {m: t for m, t in self.tau.items() if not (t > 0 and math.isfinite(t))}
        if bad:
            raise ValueError(f"a stated tau must be positive and finite, got {bad}")


class SequentialState(BaseModel):
    """The mSPRT of one metric × treatment after ``looks`` looks (persisted in the snapshot).

    ``tau`` was fixed at the first look (``tau_source`` says how; ``fixed_at_users_per_arm`` is the
    mean users per arm then, None for a stated τ). ``p_value`` is the running minimum of 1/Λ and
    ``cs_low``/``cs_high`` the running intersection of the confidence sequence, in the metric's
    absolute units. ``method`` is the estimator of the last look.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    metric: str
    treatment: str
    method: str
    tau: float
    tau_source: TauSource
    horizon_users_per_arm: int | None
    fixed_at_users_per_arm: float | None
    alpha: float
    looks: int
    p_value: float
    cs_low: float
    cs_high: float
    n_control: int
    n_treatment: int

    def as_look(self) -> SequentialLook:
        return SequentialLook(
            self.tau, self.alpha, self.looks, self.p_value, (self.cs_low, self.cs_high)
        )


def states_by_key(states: Iterable[SequentialState]) -> dict[tuple[str, str], SequentialState]:
    """The states keyed by (metric, treatment)."""
    return {(s.metric, s.treatment): s for s in states}


def _check_plan(previous: SequentialState, plan: SequentialPlan, alpha: float) -> None:
    """Refuse a plan that would change τ (or α) in the middle of a sequence."""
    where = f"{previous.metric} ({previous.treatment})"
    fix = (
        "the running minimum of the sequential p-value is valid for one tau only: restore the "
        "setting, or start a new sequence by deleting the experiment's snapshot"
    )
    if previous.alpha != alpha:
        raise ExperimentConfigError(
            f"{where}: alpha changed from {previous.alpha} to {alpha} mid-experiment; {fix}"
        )
    stated = plan.tau.get(previous.metric)
    if stated is not None and not math.isclose(stated, previous.tau, rel_tol=1e-12):
        raise ExperimentConfigError(
            f"{where}: sequential.tau changed from {previous.tau!r} to {stated!r} after "
            f"{previous.looks} look(s); {fix}"
        )
    if stated is None and previous.tau_source == "stated":
        raise ExperimentConfigError(
            f"{where}: the stated sequential.tau {previous.tau!r} was removed after "
            f"{previous.looks} look(s); {fix}"
        )
    if previous.tau_source == "horizon" and (
        previous.horizon_users_per_arm != plan.horizon_users_per_arm
    ):
        raise ExperimentConfigError(
            f"{where}: sequential.horizon_users_per_arm changed from "
            f"{previous.horizon_users_per_arm} to {plan.horizon_users_per_arm} after "
            f"{previous.looks} look(s) (tau was fixed from it); {fix}"
        )


def _fixed_tau(
    metric: str, variance: float, n_per_arm: float, n_min: int, plan: SequentialPlan, alpha: float
) -> tuple[float, TauSource, float | None] | None:
    """τ for a first look, or None when the arms are still too small to fix it."""
    stated = plan.tau.get(metric)
    if stated is not None:
        return stated, "stated", None
    if n_min < plan.min_users_per_arm:
        return None
    tau = msprt_tau_at_horizon(variance, n_per_arm, plan.horizon_users_per_arm, alpha=alpha)
    return tau, "horizon", n_per_arm


def sequential_step(
    metric: str,
    treatment: str,
    method: str,
    effect: float | None,
    variance: float | None,
    n_control: int,
    n_treatment: int,
    *,
    plan: SequentialPlan,
    alpha: float,
    previous: SequentialState | None,
) -> SequentialState | None:
    """The state after one more look at cumulative data (``effect`` and its ``variance`` now).

    Returns ``previous`` unchanged when this look has no test (no variance), and None while τ
    cannot be fixed yet (no stated τ and an arm below ``plan.min_users_per_arm``).
    """
    if previous is not None:
        _check_plan(previous, plan, alpha)
    if effect is None or variance is None or not variance > 0 or not math.isfinite(variance):
        return previous
    if previous is not None:
        tau, source = previous.tau, previous.tau_source
        fixed_at = previous.fixed_at_users_per_arm
    else:
        n_per_arm = (n_control + n_treatment) / 2.0
        first = _fixed_tau(metric, variance, n_per_arm, min(n_control, n_treatment), plan, alpha)
        if first is None:
            return None
        tau, source, fixed_at = first
    look = msprt_look(
        effect,
        variance,
        tau=tau,
        alpha=alpha,
        previous=None if previous is None else previous.as_look(),
    )
    return SequentialState(
        metric=metric,
        treatment=treatment,
        method=method,
        tau=tau,
        tau_source=source,
        horizon_users_per_arm=plan.horizon_users_per_arm if source == "horizon" else None,
        fixed_at_users_per_arm=fixed_at,
        alpha=alpha,
        looks=look.looks,
        p_value=look.p_value,
        cs_low=look.cs[0],
        cs_high=look.cs[1],
        n_control=n_control,
        n_treatment=n_treatment,
    )
