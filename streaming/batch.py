"""What one batch of delivered records does to the users' histories (a pure core of the worker).

:func:`apply_batch` takes the records in delivery order and returns every effect the batch must
have, for the worker to make durable in order: the dead letters, the changed users' states (each
with the source partition its changelog record belongs on), one training sample per positive
event, the positions to write and commit, and the seeks back over skipped records. No Faust,
Kafka or Feast here: the same records give the same outcome.

Two checks keep a replayed batch from counting anything twice: the offset ledger skips records at
or before a partition's position (streaming/positions.py), and a user's state skips events at or
before the newest offset it has applied (streaming/history.py), which covers a crash that left
some users' states written and not the partition's position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from core.errors import ConfigError, InvalidEvent
from streaming.history import UserHistory
from streaming.positions import BatchLedger, Rewind
from streaming.schema import TrainingSample, parse_event

__all__ = ["BatchOutcome", "Delivery", "FaultDrops", "apply_batch", "fault_drops"]

FaultDrops = dict[int, set[int]]  # partition -> offsets whose first delivery is ignored (tests)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One record as the consumer delivered it."""

    partition: int
    offset: int
    value: bytes | None
    timestamp_ms: int | None = None  # when it entered Kafka
    key: bytes | None = None


@dataclass
class BatchOutcome:
    """A batch's effects; ``changed`` and ``samples`` are in the order the events came."""

    ledger: BatchLedger
    changed: dict[int, UserHistory] = field(default_factory=dict)  # user -> new state
    partition_of: dict[int, int] = field(default_factory=dict)  # user -> source partition
    samples: list[TrainingSample] = field(default_factory=list)
    dead_letters: list[tuple[Delivery, InvalidEvent]] = field(default_factory=list)
    events: int = 0  # events applied
    redeliveries: int = 0
    skipped: int = 0  # deliveries past a gap, ignored
    rewinds: list[Rewind] = field(default_factory=list)

    @property
    def positions(self) -> dict[int, int]:
        """Partition -> the newest offset this batch applied (write these, commit them + 1)."""
        return self.ledger.taken


def apply_batch(
    deliveries: list[Delivery],
    ledger: BatchLedger,
    state_of: Callable[[int], UserHistory],
    *,
    recent_len: int,
    long_len: int,
    max_event_bytes: int,
    drops: FaultDrops | None = None,
) -> BatchOutcome:
    """Apply ``deliveries`` in order to the users' states (``state_of(user)`` reads a user's
    state as the table holds it; it is not changed). Invalid records become dead letters with
    their reason; they still move their partition's position."""
    outcome = BatchOutcome(ledger)
    changed = outcome.changed
    for delivery in deliveries:
        partition, offset = delivery.partition, delivery.offset
        if drops and offset in drops.get(partition, ()):  # fault injection (tests)
            drops[partition].discard(offset)  # the fault: as if never delivered
            continue
        verdict = ledger.classify(partition, offset)
        if verdict != "apply":
            if verdict == "redelivery":
                outcome.redeliveries += 1
            else:
                outcome.skipped += 1
            continue
        try:
            event = parse_event(delivery.value, max_event_bytes)
        except InvalidEvent as error:
            outcome.dead_letters.append((delivery, error))
            continue
        user = event.user_id
        state = changed.get(user)
        if state is None:
            state = state_of(user)
        applied, sample = state.apply(event, offset, recent_len, long_len, delivery.timestamp_ms)
        if not applied:
            outcome.redeliveries += 1
            continue
        outcome.events += 1
        changed[user] = state
        outcome.partition_of[user] = partition
        if sample is not None:
            outcome.samples.append(sample)
    outcome.rewinds = ledger.rewinds()
    return outcome


def fault_drops(spec: str) -> FaultDrops:
    """``settings.worker.fault_drop`` ('P:A-B,...') as partition -> offsets."""
    drops: FaultDrops = {}
    for part in filter(None, spec.split(",")):
        partition, span = part.split(":")
        first, last = (int(x) for x in span.split("-"))
        if last < first or last - first >= 100_000:
            raise ConfigError(f"worker_fault_drop: {part!r} must be P:A-B with A <= B < A + 100000")
        drops.setdefault(int(partition), set()).update(range(first, last + 1))
    return drops
