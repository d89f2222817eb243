"""The kafka-python group-join fix is applied once and only to the version it was written for.

Its effect on a real group is tested on the embedded broker in ``tests/abtest/test_sink.py``
(``test_a_rebalance_inserts_the_pending_batch_and_loses_nothing``).
"""

from __future__ import annotations

import re

import kafka
import pytest
from kafka.coordinator.base import BaseCoordinator

import streaming.kafka_group as kafka_group
from core.errors import ConfigError


def test_the_fix_wraps_the_join_once() -> None:
    kafka_group.fix_group_join()
    patched = BaseCoordinator.join_group_async
    kafka_group.fix_group_join()
    assert BaseCoordinator.join_group_async is patched  # not wrapped twice
    assert patched.__wrapped__.__module__ == "kafka.coordinator.base"  # type: ignore[attr-defined]


def test_another_kafka_python_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_group, "_applied", False)
    monkeypatch.setattr(kafka, "__version__", "3.1.0")
    before = BaseCoordinator.join_group_async
    with pytest.raises(ConfigError, match=re.escape("fixes kafka-python 3.0.12, found 3.1.0")):
        kafka_group.fix_group_join()
    assert BaseCoordinator.join_group_async is before
