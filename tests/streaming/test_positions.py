"""The offset ledger (streaming/positions.py) against a simulated consumer that redelivers, skips
records, seeks late and restarts: whatever it does, every offset is applied exactly once, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import example, given, settings
from hypothesis import strategies as st

from streaming.positions import OffsetLedger, Rewind

# -- a consumer that misbehaves -------------------------------------------------------------------


@dataclass
class Consumer:
    """Delivers each partition's records from its read position. ``seek`` lands late: the next
    ``lag`` deliveries of the partition still come from where it was (records already fetched)."""

    starts: dict[int, int]
    ends: dict[int, int]
    pos: dict[int, int]
    late_seeks: dict[int, tuple[int, int]] = field(default_factory=dict)  # p -> (lag, offset)

    def deliver(self, partition: int, n: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            if partition in self.late_seeks:
                lag, offset = self.late_seeks[partition]
                if lag == 0:
                    self.pos[partition] = offset
                    del self.late_seeks[partition]
                else:
                    self.late_seeks[partition] = (lag - 1, offset)
            if self.pos[partition] >= self.ends[partition]:
                break
            out.append((partition, self.pos[partition]))
            self.pos[partition] += 1
        return out

    def skip(self, partition: int, k: int) -> list[tuple[int, int]]:
        """Drop ``k`` records and deliver the one after them (a skip shows only that way)."""
        if self.pos[partition] + k < self.ends[partition]:
            self.pos[partition] += k
        return self.deliver(partition, 1)

    def back(self, partition: int, k: int) -> None:
        self.pos[partition] = max(self.starts[partition], self.pos[partition] - k)

    def seek(self, rewind: Rewind, lag: int) -> None:
        self.late_seeks[rewind.partition] = (lag, rewind.wanted)


# -- a worker that uses the ledger ----------------------------------------------------------------


@dataclass
class Worker:
    """Applies a batch's records to a pending list, makes them durable with the batch's positions
    (atomically: the table), and loses everything not durable when it crashes."""

    starts: dict[int, int]
    ends: dict[int, int]
    table_log: dict[int, list[int]] = field(default_factory=dict)  # what the table holds
    table_positions: dict[int, int] = field(default_factory=dict)
    ledger: OffsetLedger = field(default_factory=OffsetLedger)
    consumer: Consumer | None = None

    def restart(self) -> None:
        self.ledger = OffsetLedger()
        positions = {p: self.table_positions.get(p) for p in self.ends}
        resume = self.ledger.assign(positions, self.starts)
        assert resume == {p: self.table_positions.get(p, s - 1) + 1 for p, s in self.starts.items()}
        self.consumer = Consumer(self.starts, self.ends, resume)

    def process(self, deliveries: list[tuple[int, int]], crash: bool, seek_lag: int) -> None:
        assert self.consumer is not None
        batch = self.ledger.begin()
        applied: dict[int, list[int]] = {}
        for partition, offset in deliveries:
            if batch.classify(partition, offset) == "apply":
                applied.setdefault(partition, []).append(offset)
        for rewind in batch.rewinds():
            self.consumer.seek(rewind, seek_lag)
        assert {p: offsets[-1] for p, offsets in applied.items()} == batch.taken
        if crash:  # before the table write: the batch's effects are lost, and re-read
            self.restart()
            return
        for partition, offsets in applied.items():
            self.table_log.setdefault(partition, []).extend(offsets)
        self.table_positions.update(batch.taken)
        self.ledger.settle(batch)


partitions_st = st.dictionaries(
    st.integers(0, 2), st.tuples(st.integers(0, 3), st.integers(0, 12)), min_size=1
)
step_st = st.one_of(
    st.tuples(st.just("deliver"), st.integers(0, 2), st.integers(1, 8)),
    st.tuples(st.just("skip"), st.integers(0, 2), st.integers(1, 5)),
    st.tuples(st.just("back"), st.integers(0, 2), st.integers(1, 10)),
    st.tuples(st.just("batch"), st.booleans(), st.integers(0, 3)),
)


@settings(max_examples=400, deadline=None)
@given(partitions_st, st.lists(step_st, max_size=60))
# A gap, then the first missing record, then a second gap up to the partition's last record.
@example({0: (0, 15)}, [("deliver", 0, 11), ("skip", 0, 2), ("back", 0, 3), ("deliver", 0, 1),
                        ("skip", 0, 2), ("batch", False, 0)])  # fmt: skip
def test_every_offset_is_applied_exactly_once_in_order(
    partitions: dict[int, tuple[int, int]], steps: list[tuple[str, object, int]]
) -> None:
    starts = {p: start for p, (start, _) in partitions.items()}
    ends = {p: start + size for p, (start, size) in partitions.items()}
    worker = Worker(starts, ends)
    worker.restart()
    pending: list[tuple[int, int]] = []
    for kind, arg, n in steps:
        consumer = worker.consumer
        assert consumer is not None
        if kind == "batch":
            worker.process(pending, crash=bool(arg), seek_lag=n)
            pending = []
            continue
        partition = int(arg)  # type: ignore[call-overload]
        if partition not in ends:
            continue
        if kind == "deliver":
            pending += consumer.deliver(partition, n)
        elif kind == "skip":
            pending += consumer.skip(partition, n)
        else:
            consumer.back(partition, n)
    # Then the consumer behaves (seeks still land late): the worker must catch up exactly.
    for _ in range(20):
        consumer = worker.consumer
        assert consumer is not None
        for partition in ends:
            pending += consumer.deliver(partition, 100)
        worker.process(pending, crash=False, seek_lag=1)
        pending = []
    for partition, start in starts.items():
        assert worker.table_log.get(partition, []) == list(range(start, ends[partition]))


def test_a_gap_asks_for_one_seek_per_batch_and_logs_it_once() -> None:
    ledger = OffsetLedger()
    assert ledger.assign({0: 9, 1: None, 2: None}, {1: 4}) == {0: 10, 1: 4}
    batch = ledger.begin()
    verdicts = [batch.classify(0, o) for o in (9, 10, 13, 11, 14)]
    assert verdicts == ["redelivery", "apply", "gap", "apply", "gap"]
    assert batch.classify(1, 5) == "gap"  # its first record (4) was skipped
    assert batch.classify(2, 7) == "apply"  # no position, no earliest: its first delivery
    # 12 is still missing, though 11 came after the first gap: seek back to 12.
    assert batch.rewinds() == [Rewind(0, 12, 13, True), Rewind(1, 4, 5, True)]
    ledger.settle(batch)
    assert ledger.positions() == {0: 11, 1: 3, 2: 7}
    again = ledger.begin()
    assert again.classify(0, 14) == "gap"
    assert again.rewinds() == [Rewind(0, 12, 14, False)]  # the same seek: made, not logged
    again = ledger.begin()
    assert [again.classify(0, o) for o in (12, 13, 15)] == ["apply", "apply", "gap"]
    assert again.rewinds() == [Rewind(0, 14, 15, True)]  # a new offset wanted: logged


def test_a_gap_filled_later_in_the_batch_needs_no_seek() -> None:
    ledger = OffsetLedger()
    ledger.assign({0: -1}, {})
    batch = ledger.begin()
    assert [batch.classify(0, o) for o in (0, 2, 1, 2)] == ["apply", "gap", "apply", "apply"]
    assert batch.rewinds() == []
    assert batch.taken == {0: 2}


def test_a_new_assignment_forgets_the_old_partitions() -> None:
    ledger = OffsetLedger()
    ledger.assign({0: 5, 1: 7}, {})
    assert ledger.assign({1: 8}, {}) == {1: 9}
    assert ledger.positions() == {1: 8}
