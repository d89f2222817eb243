import uuid

from streaming.history import UserHistory
from streaming.schema import Event


def event(item: int, kind: str = "rating", ts: int = 0) -> Event:
    return Event(
        event_id=uuid.uuid4(),
        user_id=1,
        item_id=item,
        event_type=kind,  # type: ignore[arg-type]
        ts_ms=ts,
    )


def test_positive_events_append_and_emit_samples_with_the_context_before_them() -> None:
    state = UserHistory()
    samples = [
        state.apply(event(i, ts=10 * i), offset=i, recent_len=3, long_len=5)[1] for i in range(7)
    ]
    assert state.items == [2, 3, 4, 5, 6]  # the last P=5
    assert state.count == 7
    assert state.last_ts_ms == 60
    assert [s.seq for s in samples if s] == list(range(7))
    assert samples[0] is not None and samples[0].recent_item_ids == []
    assert samples[6] is not None and samples[6].recent_item_ids == [
        3,
        4,
        5,
    ]  # last R=3 before item 6


def test_redelivered_offsets_change_nothing() -> None:
    state = UserHistory()
    state.apply(event(1), offset=10, recent_len=3, long_len=5)
    before = state.to_record()
    applied, sample = state.apply(event(2), offset=10, recent_len=3, long_len=5)
    assert (applied, sample) == (False, None)
    applied, sample = state.apply(event(3), offset=4, recent_len=3, long_len=5)
    assert (applied, sample) == (False, None)
    assert state.to_record() == before


def test_impressions_move_the_offset_but_not_the_history() -> None:
    state = UserHistory()
    applied, sample = state.apply(event(5, kind="impression"), offset=3, recent_len=3, long_len=5)
    assert applied and sample is None
    assert state.items == [] and state.count == 0 and state.last_offset == 3


def test_record_round_trip() -> None:
    state = UserHistory(items=[1, 2], count=9, last_offset=44, last_ts_ms=5)
    assert UserHistory.from_record(state.to_record()) == state
    assert UserHistory.from_record(None) == UserHistory()
