import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import InvalidEvent
from streaming.schema import Event, parse_event

LIMIT = 64 * 1024


def valid_payload(**changes: object) -> dict[str, object]:
    payload: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "user_id": 7,
        "item_id": 42,
        "event_type": "click",
        "ts_ms": 1_700_000_000_000,
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


@given(
    user=st.integers(0, 2**63 - 1),
    item=st.integers(0, 2**63 - 1),
    kind=st.sampled_from(["impression", "click", "play", "rating"]),
    ts=st.integers(0, 2**63 - 1),
    value=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    position=st.none() | st.integers(0, 10_000),
)
def test_valid_events_round_trip(
    user: int, item: int, kind: str, ts: int, value: float | None, position: int | None
) -> None:
    event = Event(
        event_id=uuid.uuid4(),
        user_id=user,
        item_id=item,
        event_type=kind,  # type: ignore[arg-type]
        ts_ms=ts,
        value=value,
        position=position,
    )
    assert parse_event(event.to_json_bytes(), LIMIT) == event


@given(st.binary(max_size=300))
def test_arbitrary_bytes_either_parse_or_raise_invalid_event(raw: bytes) -> None:
    try:
        parse_event(raw, LIMIT)
    except InvalidEvent as error:
        assert error.reason in {"malformed_json", "validation"}
        assert error.detail


@given(st.dictionaries(st.text(max_size=12), st.none() | st.integers() | st.text(max_size=20)))
def test_arbitrary_json_objects_either_parse_or_raise_invalid_event(payload: dict) -> None:
    try:
        parse_event(json.dumps(payload).encode(), LIMIT)
    except InvalidEvent as error:
        assert error.reason == "validation"


@pytest.mark.parametrize(
    ("raw", "reason", "mentions"),
    [
        (b'{"event_id": ', "malformed_json", "not UTF-8 JSON"),
        (b"\xff\xfe\x00garbage", "malformed_json", "not UTF-8 JSON"),
        (b"[1, 2, 3]", "validation", "expected a JSON object"),
        (None, "empty", "no value"),
        (json.dumps(valid_payload(item_id=None)).encode(), "validation", "item_id is required"),
        (json.dumps(valid_payload(user_id="7")).encode(), "validation", "user_id"),
        (json.dumps(valid_payload(user_id=True)).encode(), "validation", "user_id"),
        (json.dumps(valid_payload(user_id=-1)).encode(), "validation", "user_id"),
        (json.dumps(valid_payload(event_type="purchase")).encode(), "validation", "event_type"),
        (json.dumps(valid_payload(event_id="nope")).encode(), "validation", "event_id"),
        (json.dumps(valid_payload(colour="red")).encode(), "validation", "colour"),
        (json.dumps(valid_payload(ts_ms=1.5)).encode(), "validation", "ts_ms"),
        (b'{"value": NaN}', "validation", "value"),
        (b" " * (LIMIT + 1), "too_large", f"limit is {LIMIT}"),
    ],
)
def test_bad_events_say_what_is_wrong(raw: bytes | None, reason: str, mentions: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(raw, LIMIT)
    assert caught.value.reason == reason
    assert mentions in str(caught.value)


def test_error_events_need_no_item() -> None:
    raw = json.dumps(valid_payload(event_type="error", item_id=None, latency_ms=12.5)).encode()
    event = parse_event(raw, LIMIT)
    assert event.item_id is None and event.latency_ms == 12.5 and not event.is_positive


def test_integer_value_is_accepted_as_float() -> None:
    event = parse_event(json.dumps(valid_payload(value=4)).encode(), LIMIT)
    assert event.value == 4.0
