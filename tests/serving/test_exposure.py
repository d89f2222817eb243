"""The exposure record (one per request and layer) and what it stands for: exactly the impressions
the service used to send, one per item with its position, and the ClickHouse sink stores those
rows from new records and old ones alike, once each however often a record is delivered."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from abtest.clickhouse import analytics_client, query_df
from abtest.sink import EventSink
from core.errors import BrokerError, InvalidEvent
from core.settings import Settings
from serving.exposure import Exposure, ExposureLog, exposure_events
from streaming.kafka_io import EventProducer, ensure_topics
from streaming.schema import Event, exposure_impressions, parse_event
from tests.conftest import wait_until
from tests.serving.conftest import read_impressions

LIMIT = 64 * 1024


def exposure(items: list[int], assignments: list[tuple[str | None, str | None]]) -> Exposure:
    return Exposure(
        user_id=42,
        request_id=uuid.uuid4().hex,
        items=items,
        assignments=assignments,
        model_version="v000007",
        latency_ms=3.25,
        ts_ms=1_700_000_000_123,
    )


def old_impressions(e: Exposure) -> list[dict[str, Any]]:
    """The impressions the service sent before issue 19 (``serving/exposure.py`` then), without
    their random event ids: one per item and assignment, positions 0..k-1 in list order."""
    return [
        {
            "user_id": e.user_id, "item_id": item, "event_type": "impression", "ts_ms": e.ts_ms,
            "experiment": experiment, "variant": variant, "request_id": e.request_id,
            "model_version": e.model_version, "position": position, "latency_ms": e.latency_ms,
        }
        for experiment, variant in e.assignments
        for position, item in enumerate(e.items)
    ]  # fmt: skip


def without_id(event: Event) -> dict[str, Any]:
    fields = event.model_dump(exclude_none=True, exclude={"event_id", "schema_version"})
    return fields


@pytest.mark.parametrize(
    "assignments",
    [[(None, None)], [("holdout", "holdout")], [("models-ab", "treatment"), ("ui", "small")]],
)
def test_one_record_per_layer_stands_for_the_old_impressions(
    assignments: list[tuple[str | None, str | None]],
) -> None:
    e = exposure([5, 3, 1683, 9], assignments)
    records = exposure_events(e)
    assert len(records) == len(assignments)
    parsed = [parse_event(r.to_json_bytes(), LIMIT) for r in records]
    assert parsed == records
    impressions = [i for r in parsed for i in exposure_impressions(r)]
    expected = [{k: v for k, v in row.items() if v is not None} for row in old_impressions(e)]
    assert [without_id(i) for i in impressions] == expected
    again = [i for r in parsed for i in exposure_impressions(r)]  # a redelivered record
    assert [i.event_id for i in again] == [i.event_id for i in impressions]
    assert len({i.event_id for i in impressions}) == len(impressions)
    assert len({r.event_id for r in records}) == len(records)


def test_an_empty_list_logs_nothing() -> None:
    assert exposure_events(exposure([], [(None, None)])) == []


def _payload(**fields: Any) -> bytes:
    base = {"event_id": str(uuid.uuid4()), "user_id": 1, "ts_ms": 5}
    return json.dumps(base | fields).encode()


@pytest.mark.parametrize(
    "raw, mentions",
    [
        (_payload(event_type="exposure"), "carries its list in item_ids"),
        (_payload(event_type="exposure", item_ids=[1], item_id=1), "without item_id"),
        (_payload(event_type="exposure", item_ids=[1], position=0), "without item_id"),
        (_payload(event_type="exposure", item_ids=[]), "item_ids"),
        (_payload(event_type="exposure", item_ids=[1, -2]), "item_ids"),
        (_payload(event_type="impression", item_id=1, item_ids=[1]), "only for exposure"),
    ],
)
def test_malformed_exposures_are_invalid_events(raw: bytes, mentions: str) -> None:
    with pytest.raises(InvalidEvent, match=mentions) as info:
        parse_event(raw, LIMIT)
    assert info.value.reason == "validation"


@pytest.mark.integration
def test_the_sink_stores_new_and_old_records_as_the_same_impression_rows(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(sink_batch_size=50, sink_batch_window_s=0.2)
    ensure_topics(settings.kafka)
    served = [
        exposure([10 + i, 20 + i, 30 + i], [("exp", "a")] if i % 2 else [("exp", "b"), ("ui", "x")])
        for i in range(12)
    ]
    new = [r for e in served[:8] for r in exposure_events(e)]
    old = [  # the old format, as a service of the previous release sends it
        Event(event_id=uuid.uuid4(), **fields) for e in served[8:] for fields in old_impressions(e)
    ]
    with EventProducer(settings.kafka) as producer:
        for i, record in enumerate([*new, *old]):
            for _ in range(2 if i % 3 == 0 else 1):  # every third delivered twice
                producer.send(record)
    expected = Counter(
        (row["request_id"], row["experiment"], row["position"], row["item_id"])
        for e in served
        for row in old_impressions(e)
    )
    delivered = len(new) + len(old) + len(range(0, len(new) + len(old), 3))
    with analytics_client(settings.clickhouse) as client:
        sink = EventSink(settings.kafka, settings.sink, client)
        stop = threading.Event()
        thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
        thread.start()
        try:
            wait_until(lambda: sink.stats.committed >= delivered, 90, "every record committed")
        finally:
            stop.set()
            thread.join(timeout=30)
        assert sink.stats.invalid == Counter()
        rows = query_df(
            client,
            "SELECT request_id, experiment, position, item_id, event_type FROM events FINAL",
        )
    assert set(rows["event_type"]) == {"impression"}
    got = Counter(
        (r.request_id, r.experiment, int(r.position), int(r.item_id)) for r in rows.itertuples()
    )
    assert got == expected


@pytest.mark.integration
def test_a_full_queue_fails_at_once_and_everything_queued_reaches_the_topic(
    make_settings: Callable[..., Settings],
) -> None:
    """Requests only queue their exposure: while the exposure thread is held (as by a broker
    that takes no records), ``log`` queues up to ``max_pending`` and then raises BrokerError
    without waiting; once the thread runs again, ``check`` hands every queued exposure over and
    the broker holds each one's record exactly once, and ``close`` sends what was queued last."""
    settings = make_settings(kafka_events_topic_partitions=1)
    ensure_topics(settings.kafka)
    failures: list[int] = []
    exposures = ExposureLog(settings.kafka, max_pending=5, on_failure=lambda: failures.append(1))
    held, release = threading.Event(), threading.Event()
    send = exposures._send

    def held_send(e: Exposure) -> None:
        held.set()
        release.wait(60)
        send(e)

    exposures._send = held_send  # type: ignore[method-assign]
    served = [exposure([i, i + 1], [("exp", "a")]) for i in range(7)]
    try:
        assert exposures.log(served[0]) == 1
        assert held.wait(30)  # the thread has taken served[0] and waits
        for e in served[1:6]:
            assert exposures.log(e) == 1
        for _ in range(2):  # the same error each time, not one wrapped in the last
            with pytest.raises(BrokerError, match=r"^exposure not queued: 5 exposures waiting$"):
                exposures.log(served[6])
        assert exposures.failed == 2 and not exposures.healthy
        assert exposures.log(exposure([], [("exp", "a")])) == 0  # an empty list logs nothing
        release.set()
        assert exposures.check(timeout_s=30)
        assert exposures.sent == 6 and exposures.healthy
        last = exposure([99], [("exp", "b"), ("ui", "x")])
        assert exposures.log(last) == 2
    finally:
        release.set()
        exposures.close(timeout_s=30)
    assert exposures.sent == 8 and failures == []  # the refused one was the caller's to count
    wanted = {e.request_id for e in [*served[:6], last]}
    found = read_impressions(settings, wanted, expected=2 * 6 + 2, timeout_s=30)
    assert Counter((f["request_id"], f["position"]) for f in found) == {
        **{(e.request_id, p): 1 for e in served[:6] for p in (0, 1)},
        (last.request_id, 0): 2,
    }
