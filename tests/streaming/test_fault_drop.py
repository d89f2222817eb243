"""The worker's fault-injection setting (``worker_fault_drop``) is parsed strictly."""

from __future__ import annotations

import pydantic
import pytest

from core.errors import ConfigError
from core.settings import Settings
from streaming.batch import fault_drops


def test_spec_gives_the_offsets_per_partition() -> None:
    assert fault_drops("") == {}
    assert fault_drops("0:1-3,2:5-5,0:7-7") == {0: {1, 2, 3, 7}, 2: {5}}


@pytest.mark.parametrize("spec", ["0", "0:1", "a:1-2", "0:1-2,", "0:-1-2", "0:1-2;1:3-4"])
def test_malformed_specs_are_refused_by_settings(spec: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=r"worker\.fault_drop"):
        Settings(worker_fault_drop=spec)


@pytest.mark.parametrize("spec", ["0:5-1", "1:0-100000"])
def test_reversed_or_huge_ranges_are_refused(spec: str) -> None:
    with pytest.raises(ConfigError, match="A <= B < A \\+ 100000"):
        fault_drops(spec)
