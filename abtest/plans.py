"""Experiment plans: what the experiments file says that the readout needs.

Per configured experiment: the variants' weights (for the sample-ratio check), the control (the
first variant) and how the sequential test fixes τ (``abtest.sequential_looks.SequentialPlan``,
from the experiment's ``sequential`` block). The CLI builds the plans once at start, so a bad
experiments file fails there; the publisher and ``hymirec readout`` use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from abtest.readout import READOUT_METRICS
from abtest.sequential_looks import SequentialPlan
from core.errors import ExperimentConfigError

if TYPE_CHECKING:
    from abtest.experiments import ExperimentsConfig

__all__ = ["ExperimentPlan", "experiment_plans"]


@dataclass(frozen=True)
class ExperimentPlan:
    """What the configuration says about an experiment, when known: weights, the control and
    how the sequential test fixes τ."""

    weights: Mapping[str, float] | None = None
    control: str | None = None
    sequential: SequentialPlan = field(default_factory=SequentialPlan)


def experiment_plans(config: ExperimentsConfig) -> dict[str, ExperimentPlan]:
    """Each configured experiment's plan: its variants' weights; its first variant is control.

    A stated sequential τ for a metric the readout does not have is an ExperimentConfigError.
    """
    metrics = [spec.name for spec in READOUT_METRICS]
    plans = {}
    for i, e in enumerate(config.experiments):
        unknown = sorted(set(e.sequential.tau) - set(metrics))
        if unknown:
            raise ExperimentConfigError(
                f"experiments[{i}].sequential.tau: unknown metric(s) {unknown}; the readout's "
                f"metrics are {', '.join(metrics)}"
            )
        plans[e.name] = ExperimentPlan(
            {v.name: v.weight for v in e.variants},
            control=e.variants[0].name,
            sequential=SequentialPlan(
                horizon_users_per_arm=e.sequential.horizon_users_per_arm,
                min_users_per_arm=e.sequential.min_users_per_arm,
                tau=dict(e.sequential.tau),
            ),
        )
    return plans
