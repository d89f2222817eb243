"""The pause after empty fetches: its schedule, the kafka-python hook, the aiokafka hook.

The kafka-python hook's pause is tested as a function (the sink and trainer tests run the hook on
the embedded broker); the aiokafka hook on the embedded broker, by counting the fetch requests an
idle consumer sends (an upper bound that the pauses guarantee whatever the machine's speed), and
that a record sent to an idle consumer arrives.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aiokafka
import kafka
import pytest
from aiokafka.consumer.fetcher import Fetcher
from kafka.consumer.fetcher import Fetcher as KafkaFetcher

import streaming.fetch_backoff as fetch_backoff
from core.errors import ConfigError
from core.settings import Settings
from core.settings_groups import KafkaSettings
from streaming.fetch_backoff import (
    EmptyFetchBackoff,
    install_aiokafka_backoff,
    install_kafka_python_backoff,
    pause_after_fetch,
)
from streaming.kafka_io import EventProducer, ensure_topics
from tests.docker_stack import hymirec_services, settings_of

# -- the schedule ------------------------------------------------------------------------------


def test_empty_fetches_double_the_pause_up_to_the_cap_and_records_reset_it() -> None:
    backoff = EmptyFetchBackoff(cap_ms=40)
    pauses_ms = [round(1000 * backoff.after_fetch(0), 6) for _ in range(8)]
    assert pauses_ms == [1, 2, 4, 8, 16, 32, 40, 40]
    assert backoff.after_fetch(3) == 0
    assert backoff.after_fetch(0) == pytest.approx(0.001)


def test_a_cap_of_zero_never_pauses() -> None:
    backoff = EmptyFetchBackoff(cap_ms=0)
    assert not backoff.enabled
    assert [backoff.after_fetch(0) for _ in range(5)] == [0.0] * 5


def test_a_negative_cap_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be >= 0 ms, got -1"):
        EmptyFetchBackoff(cap_ms=-1)


def test_the_production_stack_turns_the_pauses_off_and_the_embedded_default_has_them() -> None:
    for service in hymirec_services():
        assert settings_of(service).kafka.empty_fetch_backoff_ms == 0, service
    assert KafkaSettings.model_fields["empty_fetch_backoff_ms"].default > 0


# -- the kafka-python hook ----------------------------------------------------------------------


def test_an_empty_fetch_round_pauses_within_the_polls_remaining_time() -> None:
    backoff = EmptyFetchBackoff(40)
    pauses = [pause_after_fetch(backoff, {}, False, 200) for _ in range(7)]
    assert [round(1000 * p, 6) for p in pauses] == [1, 2, 4, 8, 16, 32, 40]
    assert pause_after_fetch(backoff, {}, False, 15) == pytest.approx(0.015)  # the poll's time
    assert pause_after_fetch(backoff, {}, False, 0) == 0
    assert pause_after_fetch(backoff, {}, False, None) == pytest.approx(0.04)


def test_records_reset_the_pause_and_nothing_to_fetch_adds_none() -> None:
    backoff = EmptyFetchBackoff(40)
    for _ in range(5):
        pause_after_fetch(backoff, {}, False, 200)
    assert pause_after_fetch(backoff, {"tp": [1, 2]}, False, 200) == 0
    assert pause_after_fetch(backoff, {}, False, 200) == pytest.approx(0.001)
    # idle: no assignment or no position, so no fetch; kafka-python sleeps itself then
    assert pause_after_fetch(backoff, {}, True, 200) == 0


class FakeConsumer:
    def __init__(self) -> None:
        self._fetcher = type("FakeFetcher", (), {})()
        self.config = {"bootstrap_servers": "127.0.0.1:9"}


def test_a_cap_of_0_touches_nothing_and_another_version_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fetch_backoff, "_kp_installed", False)
    monkeypatch.setattr(kafka, "__version__", "3.1.0")
    before = KafkaFetcher.fetch_records
    consumer = FakeConsumer()
    install_kafka_python_backoff(consumer, 0)  # off: any version will do
    assert consumer._fetcher not in fetch_backoff._kp_backoffs
    with pytest.raises(ConfigError, match=re.escape("hooks kafka-python 3.0.12, found 3.1.0")):
        install_kafka_python_backoff(consumer, 40)
    assert KafkaFetcher.fetch_records is before


def test_the_kafka_python_hook_wraps_once_and_only_configured_consumers_pause() -> None:
    first, second = FakeConsumer(), FakeConsumer()
    install_kafka_python_backoff(first, 40)  # fails on another kafka-python: re-check the hook
    hooked = KafkaFetcher.fetch_records
    assert hooked.__wrapped__.__module__ == "kafka.consumer.fetcher"  # type: ignore[attr-defined]
    install_kafka_python_backoff(second, 25)
    assert KafkaFetcher.fetch_records is hooked  # not wrapped twice
    assert fetch_backoff._kp_backoffs[first._fetcher].cap_s == pytest.approx(0.04)
    assert fetch_backoff._kp_backoffs[second._fetcher].cap_s == pytest.approx(0.025)


# -- the aiokafka hook -------------------------------------------------------------------------


def test_the_hook_wraps_the_fetch_once_and_0_turns_it_into_a_pass_through() -> None:
    install_aiokafka_backoff(40)  # fails on another aiokafka version: re-check the hook then
    hooked = Fetcher._proc_fetch_request
    assert hooked.__wrapped__.__module__ == "aiokafka.consumer.fetcher"  # type: ignore[attr-defined]
    install_aiokafka_backoff(0)
    assert Fetcher._proc_fetch_request is hooked  # not wrapped twice
    assert fetch_backoff._cap_ms == 0


def test_another_aiokafka_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_backoff, "_installed", False)
    monkeypatch.setattr(aiokafka, "__version__", "0.15.0")
    before = Fetcher._proc_fetch_request
    with pytest.raises(ConfigError, match=re.escape("hooks aiokafka 0.14.0, found 0.15.0")):
        install_aiokafka_backoff(40)
    assert Fetcher._proc_fetch_request is before
    install_aiokafka_backoff(0)  # off: no private API is touched, so any version will do


CAP_MS = 50


@pytest.fixture
def counted_fetches(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], int]]:
    """The hook on (``CAP_MS``), and the number of fetch requests aiokafka consumers send."""
    install_aiokafka_backoff(CAP_MS)
    count = 0
    hooked = Fetcher._proc_fetch_request

    async def counting(self: Any, *args: Any) -> bool:
        nonlocal count
        count += 1
        result: bool = await hooked(self, *args)
        return result

    monkeypatch.setattr(Fetcher, "_proc_fetch_request", counting)
    yield lambda: count
    install_aiokafka_backoff(0)


@pytest.mark.integration
def test_an_idle_consumer_fetches_at_most_once_per_cap_and_still_gets_the_next_record(
    make_settings: Callable[..., Settings], counted_fetches: Callable[[], int]
) -> None:
    settings = make_settings(kafka_events_topic_partitions=1, kafka_training_topic_partitions=1)
    ensure_topics(settings.kafka)

    async def idle_then_one_record() -> tuple[int, float, bytes | None]:
        consumer = aiokafka.AIOKafkaConsumer(
            settings.kafka.events_topic,
            bootstrap_servers=settings.kafka.bootstrap,
            group_id=f"idle-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while counted_fetches() < 10:  # assigned, and the pause up to the cap
                assert loop.time() < deadline, "the consumer never fetched"
                await asyncio.sleep(0.05)
            before, started = counted_fetches(), loop.time()
            await asyncio.sleep(2.0)  # idle: only the pauses pace the fetches
            fetched, elapsed = counted_fetches() - before, loop.time() - started
            with EventProducer(settings.kafka) as producer:
                producer.send_raw(b"k", b"after the idle spell")
            record = await asyncio.wait_for(consumer.getone(), timeout=30)
            return fetched, elapsed, record.value
        finally:
            await consumer.stop()  # cancels a pause in progress

    fetched, elapsed, value = asyncio.run(idle_then_one_record())
    assert value == b"after the idle spell"
    # An empty fetch is followed by a pause of the cap (once doubled up to it): at most one fetch
    # per cap, plus the one in flight; a slower machine sends fewer. Without the hook the broker
    # answers thousands a second.
    assert fetched <= elapsed / (CAP_MS / 1000) + 2, fetched
