"""streaming/faust_compat.py is bound to the Faust version it was checked on, and the private
surface it uses is still there (these fail on the next release, on purpose)."""

from __future__ import annotations

import inspect

import faust
import pytest
from faust.tables.table import Table
from faust.transport.consumer import Consumer, ThreadDelegateConsumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

from core.errors import ConfigError
from streaming.faust_compat import FAUST_VERSION, check_faust_version


def test_the_installed_faust_is_the_checked_version() -> None:
    assert faust.__version__ == FAUST_VERSION
    check_faust_version()


def test_another_version_is_refused_with_what_to_check() -> None:
    with pytest.raises(ConfigError, match=r"found 0\.16\.0: check Consumer\._commit_offsets"):
        check_faust_version("0.16.0")


def test_the_private_surface_is_as_used() -> None:
    assert list(inspect.signature(Consumer._commit_offsets).parameters) == [
        "self", "offsets", "start_new_transaction",
    ]  # fmt: skip
    assert "_read_offset" in Consumer.__annotations__
    assert "_thread" in ThreadDelegateConsumer.__annotations__
    assert list(inspect.signature(AIOKafkaConsumerThread.seek).parameters) == [
        "self", "partition", "offset",
    ]  # fmt: skip
    # A table write is the store write plus the changelog record (and nothing else this
    # non-windowed table needs: ``on_key_set`` adds TTL bookkeeping and sensors).
    source = inspect.getsource(Table.on_key_set)
    assert "send_changelog(self.partition_for_key(key), key, value)" in source
