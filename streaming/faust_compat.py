"""What the stream worker asks of Faust beyond its public API, in one place, bound to one version.

faust-streaming 0.15.3 gives no public call for three things the worker does (streaming/worker.py
says why it does them), and its public way to send is slow. Each is done here with as little
private surface as it takes:

1. **Commit offsets the worker chooses** (:func:`commit_offsets`). ``Consumer.commit()`` commits
   what Faust's acknowledgement tracking holds, and the worker has that tracking off for ``events``
   (``acks=False``): Faust was seen committing offsets far past the records the worker had
   applied. ``Consumer._commit_offsets`` is the step Faust's own commit ends with: it drops
   partitions no longer assigned, flushes the producer, commits and records what it committed.
   Its signature has changed between releases (``start_new_transaction`` was added).
2. **Seek between two fetches** (:func:`seek_between_fetches`). The public ``Consumer.seek`` seeks
   the aiokafka consumer from the event loop's thread while that consumer fetches on its own
   thread; a 100k-event kill run crashed on the race (aiokafka's ``fetched_records`` raised
   ``KeyError`` for the partition just sought). Sent through the consumer thread's call queue
   (``Consumer._thread``), the seek lands between two fetches. Then Faust's read offset
   (``Consumer._read_offset``, below which its fetch loop drops records) is moved back too.
3. **Write a table key to a chosen changelog partition, and know when it is stored**
   (:func:`write_table`). ``table[key] = value`` sends the changelog record to the partition of
   the task's *current event* (one per batch, when a batch holds users of every partition) through
   the producer buffer (``send_soon``), which hands aiokafka one record per event-loop turn and
   whose flush returns when no record was sent for 0.1 s, possibly with records still buffered.
   Instead the store is written (``table.data``) and the changelog record, encoded with the
   table's own serializers, sent to the user's partition; the caller awaits its acknowledgement.
   That ``Table.__setitem__`` does nothing else this table needs (its other work is TTL
   bookkeeping for windowed tables, and sensors) is checked on this version only.
4. **Send without yielding** (:func:`send_record`, public calls). ``Topic.send`` goes through
   ``App.maybe_start_producer``, whose ``@stampede`` wrapper yields to the event loop three times
   per call, so aiokafka's sender wakes between two records and sends nearly every record in a
   request of its own: 1,000 records took 75-200 ms here, against ~5 ms handed to the producer
   directly (``App.producer.send``, which the worker's running app has started).

:func:`check_faust_version` refuses any other version: re-check these before moving on.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import faust
from faust.serializers import codecs
from faust.types import TP, AppT, TableT

from core.errors import ConfigError

__all__ = [
    "FAUST_VERSION",
    "check_faust_version",
    "commit_offsets",
    "seek_between_fetches",
    "send_record",
    "write_table",
]

FAUST_VERSION = "0.15.3"


def check_faust_version(found: str = faust.__version__) -> None:
    """Raise :class:`ConfigError` unless Faust is the version this module was checked on."""
    if found != FAUST_VERSION:
        raise ConfigError(
            f"streaming.faust_compat was written for faust-streaming {FAUST_VERSION}, found "
            f"{found}: check Consumer._commit_offsets, Consumer._thread, Consumer._read_offset "
            "and Table.__setitem__ (see the module docstring), then update the pin"
        )


async def commit_offsets(app: faust.App, offsets: dict[TP, int]) -> bool:
    """Commit these offsets (the next offset to read, per partition) for the app's group; a
    partition no longer assigned is left out. True if anything was committed."""
    consumer: Any = app.consumer
    committed: bool = await consumer._commit_offsets(offsets)
    return committed


async def seek_between_fetches(app: faust.App, tp: TP, offset: int) -> None:
    """Seek ``tp`` to ``offset`` on the consumer's own thread, then let Faust deliver from there."""
    consumer: Any = app.consumer
    thread = consumer._thread
    await thread.call_thread(thread.seek, tp, offset)
    consumer._read_offset[tp] = offset


async def send_record(
    app: AppT,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    *,
    partition: int | None = None,
    headers: dict[str, bytes] | None = None,
) -> Awaitable[Any]:
    """Hand one record to the app's producer; returns the future of the broker's
    acknowledgement (await it before relying on the record)."""
    ack: Awaitable[Any] = await app.producer.send(topic, key, value, partition, None, headers)
    return ack


async def write_table(
    table: TableT[Any, Any], partition: int, key: Any, value: Any
) -> Awaitable[Any]:
    """Set ``table[key] = value`` with its changelog record on ``partition``; returns the future
    of the broker's acknowledgement of that record (await it before relying on the write)."""
    table.data[key] = value
    collection: Any = table  # a Collection's serializers; TableT does not declare them
    return await send_record(
        table.app,
        table.changelog_topic.get_topic_name(),
        codecs.dumps(collection.key_serializer, key),
        codecs.dumps(collection.value_serializer, value),
        partition=partition,
    )
