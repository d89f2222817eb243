"""Replay MovieLens-100K ratings as the event stream, in timestamp order.

Each rating becomes a ``rating`` event whose ``event_id`` is a UUIDv5 of (user, item, time), so
replaying the same file produces the same ids (redeliveries stay recognisable downstream).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pandas as pd

from streaming.kafka_io import EventProducer
from streaming.schema import Event

__all__ = ["movielens_events", "replay_events"]

_NAMESPACE = uuid.UUID("9a1f1f5e-7f43-4cb8-9a47-6e1f00c0ffee")


def movielens_events(ratings: pd.DataFrame) -> Iterator[Event]:
    """One validated ``rating`` event per row, in the frame's (replay) order."""
    columns = zip(
        ratings["user_id"].tolist(),
        ratings["item_id"].tolist(),
        ratings["ts_ms"].tolist(),
        ratings["rating"].tolist(),
        strict=True,
    )
    for user, item, ts_ms, rating in columns:
        yield Event(
            event_id=uuid.uuid5(_NAMESPACE, f"ml-100k/{user}/{item}/{ts_ms}"),
            user_id=int(user),
            item_id=int(item),
            event_type="rating",
            ts_ms=int(ts_ms),
            value=float(rating),
        )


def replay_events(
    producer: EventProducer,
    events: Iterator[Event],
    rate_per_s: float | None = None,
    progress: Callable[[int], None] | None = None,
    progress_every: int = 10_000,
) -> int:
    """Send events (paced to ``rate_per_s`` if given), flush, and return how many were sent."""
    started = time.perf_counter()
    sent = 0
    for event in events:
        producer.send(event)
        sent += 1
        if rate_per_s:
            ahead_s = sent / rate_per_s - (time.perf_counter() - started)
            if ahead_s > 0:
                time.sleep(ahead_s)
        if progress is not None and sent % progress_every == 0:
            progress(sent)
    producer.flush()
    if progress is not None and sent % progress_every:
        progress(sent)
    return sent
