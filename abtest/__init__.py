"""A/B testing: the statistics engine and the ClickHouse analytics around it.

- ``abtest.stats``: pure statistics over per-user arrays or sufficient statistics (no I/O);
- ``abtest.clickhouse``: the ClickHouse adapter (client, schema, inserts, parameterised queries);
- ``abtest.sink``: the Kafka consumer group that copies the events topic into ClickHouse;
- ``abtest.metrics``: per-user metrics of one experiment, computed in SQL;
- ``abtest.readout``: every metric and treatment against control, with the SRM check;
- ``abtest.experiments``: experiments, layers and the holdout as a validated YAML config;
- ``abtest.splitter``: the deterministic traffic splitter (``Splitter.assign``, ``Splitter.route``).

Nothing is imported eagerly, so the pure statistics load without the ClickHouse and Kafka clients;
the experiment names below are re-exported lazily (the config imports the model registry).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from abtest.experiments import ExperimentsConfig, load_experiments
    from abtest.splitter import Route, Splitter

__all__ = ["ExperimentsConfig", "Route", "Splitter", "load_experiments"]

_LAZY = {
    "ExperimentsConfig": "abtest.experiments",
    "load_experiments": "abtest.experiments",
    "Route": "abtest.splitter",
    "Splitter": "abtest.splitter",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'abtest' has no attribute {name!r}")
