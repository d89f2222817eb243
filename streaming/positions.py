"""The stream worker's offset ledger: where it stands in each partition of ``events``.

A pure core (no Faust, no Kafka). A *position* is the newest offset of a source partition whose
effects the worker's table holds durably. For each delivered record the ledger answers one of:

- ``apply``: the next offset after the position (or after the batch's newest applied one);
- ``redelivery``: at or before it (its effects are already in, or about to be, so skip it);
- ``gap``: beyond the next offset, so records were skipped: ignore it, and after the batch seek
  the partition back to the first missing offset (a :class:`Rewind`).

After a batch the ledger gives the positions to write beside the users' states and to commit
(offset + 1), and, once the table holds them, takes them as durable (:meth:`OffsetLedger.settle`).
At an assignment it gives the offset to resume each partition from: one past its position, or
its earliest offset when the table has no position for it yet (a new worker group, or a lost
changelog), so that a skip of even its very first record shows as a gap.

This assumes a partition's offsets are contiguous, as they are with the project's producers: a
transactional producer's markers, compaction, or retention deleting unread records would leave
holes that no seek fills (the worker would seek back for ever).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["BatchLedger", "OffsetLedger", "Rewind", "Verdict"]

Verdict = Literal["apply", "redelivery", "gap"]


@dataclass(frozen=True)
class Rewind:
    """Seek ``partition`` back to ``wanted``: ``got`` was delivered where ``wanted`` was next.

    ``first`` is true the first time the ledger asks for this seek (log it once; the seek itself
    is repeated after every batch that still shows the gap)."""

    partition: int
    wanted: int
    got: int
    first: bool


class OffsetLedger:
    """Durable positions per partition, and the seeks asked for since the last assignment."""

    def __init__(self) -> None:
        self._durable: dict[int, int] = {}  # partition -> position the table holds
        self._rewound_to: dict[int, int] = {}  # partition -> offset last sought back to

    def assign(
        self, positions: Mapping[int, int | None], earliest: Mapping[int, int]
    ) -> dict[int, int]:
        """Start over with a new assignment: ``positions`` are the table's (``None`` where it has
        none), ``earliest`` the first offsets of those without one (where known). Returns the
        offset to resume each partition from; a partition with neither is left out (its first
        delivered record is then taken as its start)."""
        self._durable.clear()
        self._rewound_to.clear()
        resume: dict[int, int] = {}
        for partition, position in positions.items():
            if position is None:
                if partition not in earliest:
                    continue
                position = earliest[partition] - 1
            self._durable[partition] = position
            resume[partition] = position + 1
        return resume

    def learn(self, partition: int, position: int | None) -> None:
        """Take ``position`` for a partition not known yet (``None``: none in the table)."""
        if position is not None:
            self._durable.setdefault(partition, position)

    def position(self, partition: int) -> int | None:
        """The durable position of ``partition``, or ``None`` if not known."""
        return self._durable.get(partition)

    def positions(self) -> dict[int, int]:
        return dict(self._durable)

    def begin(self) -> BatchLedger:
        """A ledger for one batch of deliveries."""
        return BatchLedger(self)

    def settle(self, batch: BatchLedger) -> None:
        """The table now durably holds ``batch``'s positions: they are the new baseline."""
        self._durable.update(batch.taken)

    def _rewind(self, partition: int, wanted: int, got: int) -> Rewind:
        first = self._rewound_to.get(partition) != wanted
        self._rewound_to[partition] = wanted
        return Rewind(partition, wanted, got, first)


@dataclass
class BatchLedger:
    """Classifies one batch's deliveries against the durable positions.

    ``taken`` holds, per partition, the newest offset applied in this batch: the positions to
    write and commit once the batch's effects are durable."""

    ledger: OffsetLedger
    taken: dict[int, int] = field(default_factory=dict)
    _ignored: dict[int, list[int]] = field(default_factory=dict)  # partition -> gap offsets

    def classify(self, partition: int, offset: int) -> Verdict:
        applied = self.taken.get(partition)
        if applied is None:
            durable = self.ledger.position(partition)
            # Not known (no table position and no earliest offset): start at this record.
            applied = offset - 1 if durable is None else durable
        if offset <= applied:
            return "redelivery"
        if offset > applied + 1:
            self._ignored.setdefault(partition, []).append(offset)
            return "gap"
        self.taken[partition] = offset
        return "apply"

    def rewinds(self) -> list[Rewind]:
        """The seeks this batch needs (ask once per batch): one per partition where a record
        delivered past a gap is still not applied at the batch's end, back to the first offset
        not applied.

        Asked again after every batch that shows the gap: records the consumer had already
        fetched still arrive after a seek and move its read position past the missing offset;
        the seek after the last of them holds."""
        rewinds = []
        for partition, ignored in self._ignored.items():
            wanted = self.taken[partition] + 1 if partition in self.taken else None
            if wanted is None:
                durable = self.ledger.position(partition)
                assert durable is not None, "a gap needs a position to be a gap"
                wanted = durable + 1
            unapplied = [offset for offset in ignored if offset >= wanted]
            if unapplied:
                rewinds.append(self.ledger._rewind(partition, wanted, min(unapplied)))
        return rewinds
