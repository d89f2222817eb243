"""Per-user history state and how events update it (the pure core of the Faust agent).

A user's state holds the last P item ids (oldest first), the count of positive events ever seen and
the source offset of the newest event applied. Events of one user come from one partition in order,
so an event whose offset is not newer than ``last_offset`` is a redelivery and is skipped: that
makes the agent idempotent under Kafka's at-least-once delivery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streaming.schema import Event, TrainingSample

__all__ = ["UserHistory"]


@dataclass
class UserHistory:
    items: list[int] = field(default_factory=list)
    count: int = 0
    last_offset: int = -1
    last_ts_ms: int = 0

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> UserHistory:
        if record is None:
            return cls()
        return cls(
            items=list(record["items"]),
            count=int(record["count"]),
            last_offset=int(record["last_offset"]),
            last_ts_ms=int(record["last_ts_ms"]),
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "count": self.count,
            "last_offset": self.last_offset,
            "last_ts_ms": self.last_ts_ms,
        }

    def apply(
        self,
        event: Event,
        offset: int,
        recent_len: int,
        long_len: int,
        ingest_ts_ms: int | None = None,
    ) -> tuple[bool, TrainingSample | None]:
        """Apply one event read at ``offset``; return (applied, training sample or None).

        A redelivered event (offset not newer than the last applied) changes nothing. A positive
        event is appended to the history and yields one training sample whose context is the
        recent items *before* it; other events only move the offset.
        """
        if offset <= self.last_offset:
            return False, None
        self.last_offset = offset
        if not event.is_positive or event.item_id is None:
            return True, None
        sample = TrainingSample(
            event_id=event.event_id,
            user_id=event.user_id,
            item_id=event.item_id,
            event_type=event.event_type,
            ts_ms=event.ts_ms,
            seq=self.count,
            recent_item_ids=self.items[-recent_len:],
            value=event.value,
            ingest_ts_ms=ingest_ts_ms,
        )
        self.items.append(event.item_id)
        if len(self.items) > long_len:
            del self.items[: len(self.items) - long_len]
        self.count += 1
        self.last_ts_ms = max(self.last_ts_ms, event.ts_ms)
        return True, sample
