"""The stream worker's agent: consume ``events``, keep each user's history, push it to Feast.

:class:`UserHistoryWorker` holds the agent (:meth:`~UserHistoryWorker.consume`), its rebalance
hook (:meth:`~UserHistoryWorker.resume_from_table`) and its report timer
(:meth:`~UserHistoryWorker.report`); ``streaming/app.py`` builds the Faust app and registers them.
The agent reads raw event bytes, one batch at a time: whatever records are already waiting, up to
``worker.batch_size``, so an idle worker handles a lone event at once and a busy one takes what
arrived while it worked (Faust handles single events at only ~500/s on two cores). Per batch:

1. the records are classified by the offset ledger and applied to the users' states
   (streaming/batch.py): a record that fails parsing goes to the dead-letter topic with its
   original bytes and the reason in headers (never dropped, never fatal); redeliveries change
   nothing; records past a gap are ignored and the partition sought back after the batch;
2. the changed users' rows (last R ids, last P items as packed codebook codes) are pushed to Feast
   while one training sample per positive event (and each dead letter) is sent, and the worker
   waits until the push is done and the broker has acknowledged every record;
3. only then does it write the users' states to the table, then each partition's position
   (the newest offset the table holds), and wait until the broker has acknowledged the changelog;
4. then it commits the batch's offsets (position + 1) for the group.

So a crash at any step replays the batch (the idempotent push repeats rather than being skipped),
and a state that makes the batch's events redeliveries is never durable before the samples those
events produced.

**Where Faust is not used as it is meant to be, and why.** Where to resume is the table's
business, not Faust's: Faust's offset tracking is off for ``events`` (``acks=False``), because
faust-streaming 0.15.3 was seen committing offsets far past the records the worker had applied
(1,580 committed against 556 applied after a SIGKILL; a restarted worker then waited for ever for
records that never came), and its flush before a commit returns as soon as no message was sent for
0.1 s, with messages still buffered. So the worker commits each batch's offsets itself, and at
every assignment, once the table is recovered and before Faust seeks to the committed offsets, it
commits the table's positions for its partitions; a partition with no position (a new group, or a
lost changelog) is committed at its earliest offset. Faust also once delivered offset N + 1 where
N was next, just after a restart: the ledger catches that and the worker seeks back. The table is
written around Faust's ``table[key] = value`` (to the user's own changelog partition, with the
write's acknowledgement awaited), and records are sent with ``await topic.send`` rather than
through Faust's buffer, which hands one record per event-loop turn to aiokafka (a 1,000-sample
batch took ~200 ms that way, ~25 ms sent directly). The private calls this takes live in
streaming/faust_compat.py.

**Replicas** share the topic by group assignment (README: "Scaling out"); a partition's position
and users' states move with it in the changelog. A revocation waits for the batch in progress
(Faust does not: it tracks no acknowledgements for ``events``); otherwise the next owner could
recover the changelog without that batch's writes, and this worker's recovery of the partitions
it keeps could overwrite newer states with older ones. Records of partitions it no longer owns
are ignored (``not_owned``).

A batch never ends half-done: a failed Feast push is retried (``worker_push_attempts``, doubling
back-off); a batch that still fails stops the process at once (exit code 70, like a crash) before
its positions are written, so that a restart re-reads it. A stop (SIGTERM) that arrives during a
batch lets the batch finish first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.types import TP, EventT, StreamT, TableT

from core.errors import FeatureStoreError, InvalidEvent
from core.settings_groups import FeatureSettings, KafkaSettings, WorkerSettings
from features.codebook import ResidualCodebook
from features.item_features import ItemCodeTable
from features.store import FeatureStoreClient, UserHistoryFeatures
from streaming import faust_compat
from streaming.batch import BatchOutcome, Delivery, apply_batch, fault_drops
from streaming.history import UserHistory
from streaming.positions import OffsetLedger, Rewind

__all__ = [
    "EXIT_BATCH_FAILED",
    "PipelineCounters",
    "UserHistoryWorker",
    "exit_before_commit",
    "waiting_batches",
]

log = logging.getLogger(__name__)

EXIT_BATCH_FAILED = 70  # the process exit code when a batch could not be completed


@dataclass
class PipelineCounters:
    """What the worker has done since it started (logged; read by tests and benchmarks)."""

    events: int = 0
    dead_letters: int = 0
    redeliveries: int = 0
    samples: int = 0
    pushes: int = 0
    push_retries: int = 0
    skipped_deliveries: int = 0  # records delivered after a gap (ignored; see the ledger)
    not_owned: int = 0  # records of partitions revoked from this worker (ignored)
    rewinds: int = 0
    batches: int = 0
    push_s: float = 0.0  # wall seconds inside Feast pushes (on their thread, within publish)
    reasons: dict[str, int] = field(default_factory=dict)
    # Wall seconds per phase of batch processing (the rest is waiting for records): apply,
    # publish (the Feast push beside the samples and dead letters, until all are acknowledged),
    # table (states, positions, commit).
    phase_s: dict[str, float] = field(
        default_factory=lambda: {"apply": 0.0, "publish": 0.0, "table": 0.0}
    )

    def lap(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.phase_s[phase] += now - since
        return now


def exit_before_commit(what: str, exc: BaseException | None) -> None:
    """End the process now, before the batch's positions are written: a restart re-reads it."""
    log.critical(
        "%s; exiting with code %d before its offsets can be committed (a restart re-reads it)",
        what, EXIT_BATCH_FAILED, exc_info=exc,
    )  # fmt: skip
    logging.shutdown()
    sys.stderr.flush()
    os._exit(EXIT_BATCH_FAILED)


async def waiting_batches(
    stream: StreamT[bytes], max_records: int
) -> AsyncIterator[list[EventT[bytes]]]:
    """The stream's events in batches of those already waiting: a batch ends at ``max_records``
    or as soon as no further event is waiting in the stream's queue (no time window)."""
    channel: Any = stream.channel  # typed as an AsyncIterator; an agent's is a Topic
    queue = channel.queue
    batch: list[EventT[bytes]] = []
    async for event in stream.events():
        batch.append(event)
        if len(batch) >= max_records or queue.empty():
            yield batch
            batch = []


def _position_key(partition: int) -> int:
    return -1 - partition  # a partition's position, in the table beside the users (ids >= 0)


class UserHistoryWorker:
    """The agent, rebalance hook and timer of the user-history worker (see the module doc)."""

    def __init__(
        self,
        app: faust.App,
        table: TableT[int, Any],
        *,
        kafka: KafkaSettings,
        worker: WorkerSettings,
        features: FeatureSettings,
        store: FeatureStoreClient,
        codebook: ResidualCodebook,
        item_codes: ItemCodeTable,
        on_failure: Callable[[str, BaseException | None], None] = exit_before_commit,
    ) -> None:
        self.app, self.table = app, table
        self.kafka, self.worker, self.features = kafka, worker, features
        self.store, self.codebook, self.item_codes = store, codebook, item_codes
        self.codebook_version = codebook.version  # a hash of the arrays: computed once
        self.on_failure = on_failure
        self.counters = PipelineCounters()
        self.ledger = OffsetLedger()
        self.drops = fault_drops(worker.fault_drop)
        if self.drops:
            log.warning(
                "fault injection (worker_fault_drop %s): the first delivery of those offsets is "
                "ignored", worker.fault_drop,
            )  # fmt: skip
        self._pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feast-push")
        self._in_flight: asyncio.Future[None] | None = None  # the batch being processed
        self._owned: set[int] | None = None  # events partitions assigned; None: not known yet

    # -- the agent ---------------------------------------------------------------------------

    async def consume(self, stream: StreamT[bytes]) -> None:
        """The agent: every batch processed to its end before the next is taken."""
        await self.app.maybe_start_producer()  # send_record hands records to it directly
        async for batch in waiting_batches(stream, self.worker.batch_size):
            await self.complete(batch)

    async def complete(self, batch: list[EventT[bytes]]) -> None:
        """Process the batch to its end, or end the process before its positions are written (a
        crashed Faust agent would leave a worker that runs but consumes nothing)."""
        task = self._in_flight = asyncio.ensure_future(self.process(batch))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The worker is stopping: finish this batch first. A second cancellation means it
            # cannot wait: die before the batch's positions are written.
            log.info("stopping: finishing the batch in progress (%d records)", len(batch))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                self.on_failure(f"stopped in the middle of a batch of {len(batch)} records", None)
            raise
        except BaseException as exc:
            self.on_failure(f"a batch of {len(batch)} records failed", exc)

    async def process(self, batch: list[EventT[bytes]]) -> None:
        clock = time.perf_counter()
        outcome = self._apply(batch)
        for rewind in outcome.rewinds:
            await self._rewind(rewind)
        if not outcome.positions:
            return
        clock = self.counters.lap("apply", clock)
        await self._publish(outcome)
        clock = self.counters.lap("publish", clock)
        await self._persist(outcome)
        self.counters.lap("table", clock)

    def _apply(self, batch: list[EventT[bytes]]) -> BatchOutcome:
        deliveries, owned = [], self._owned
        for event in batch:
            message = event.message
            if owned is not None and message.partition not in owned:
                self.counters.not_owned += 1
                continue
            stamp = int(message.timestamp * 1000) if message.timestamp else None
            deliveries.append(
                Delivery(message.partition, message.offset, event.value, stamp, message.key)
            )
        for partition in {d.partition for d in deliveries}:
            if self.ledger.position(partition) is None:  # not seen at the last assignment
                self.ledger.learn(partition, self._table_position(partition))
        counters = self.counters
        outcome = apply_batch(
            deliveries,
            self.ledger.begin(),
            lambda user: UserHistory.from_record(self.table.get(user)),
            recent_len=self.features.recent_len,
            long_len=self.features.long_len,
            max_event_bytes=self.kafka.max_event_bytes,
            drops=self.drops,
        )
        counters.batches += 1
        counters.events += outcome.events
        counters.redeliveries += outcome.redeliveries
        counters.skipped_deliveries += outcome.skipped
        return outcome

    async def _publish(self, outcome: BatchOutcome) -> None:
        """The Feast push (on its thread) beside the dead letters and training samples; returns
        once the push is done and the broker has acknowledged every record."""
        rows = [self._feature_row(user, state) for user, state in outcome.changed.items()]
        push = asyncio.ensure_future(self._push(rows))
        acks = [await self._dead_letter(d, error) for d, error in outcome.dead_letters]
        app, topic = self.app, self.kafka.training_topic
        for sample in outcome.samples:
            key, value = str(sample.user_id).encode(), sample.model_dump_json().encode()
            acks.append(await faust_compat.send_record(app, topic, key, value))
        for ack in acks:  # in send order: most are done by the time the first is
            await ack
        await push
        self.counters.samples += len(outcome.samples)

    async def _persist(self, outcome: BatchOutcome) -> None:
        """The users' states, then the positions on the same partitions (so a position is never
        durable before the states it covers), acknowledged; then the group's offsets."""
        table, acks = self.table, list[Awaitable[Any]]()
        for user, state in outcome.changed.items():
            partition = outcome.partition_of[user]
            acks.append(await faust_compat.write_table(table, partition, user, state.to_record()))
        for partition, offset in outcome.positions.items():
            record = {"applied": offset}
            acks.append(
                await faust_compat.write_table(table, partition, _position_key(partition), record)
            )
        for ack in acks:
            await ack
        topic = self.kafka.events_topic
        offsets = {TP(topic, p): offset + 1 for p, offset in outcome.positions.items()}
        await faust_compat.commit_offsets(self.app, offsets)
        self.ledger.settle(outcome.ledger)

    async def _dead_letter(self, delivery: Delivery, error: InvalidEvent) -> Awaitable[Any]:
        counters = self.counters
        counters.dead_letters += 1
        counters.reasons[error.reason] = counters.reasons.get(error.reason, 0) + 1
        source = f"{self.kafka.events_topic}/{delivery.partition}/{delivery.offset}"
        log.warning("dead-lettered %s: %s", source, error)
        headers = {
            "reason": error.reason.encode(),
            "error": str(error.detail)[:4000].encode(),
            "source": source.encode(),
        }
        return await faust_compat.send_record(
            self.app,
            self.kafka.dead_letter_topic,
            delivery.key,
            delivery.value,
            headers=headers,
        )

    async def _push(self, rows: list[UserHistoryFeatures]) -> None:
        if not rows:
            return
        attempts = self.worker.push_attempts
        for attempt in range(attempts):
            try:
                await self._push_once(rows)
                break
            except FeatureStoreError as exc:
                if attempt + 1 == attempts:
                    raise
                self.counters.push_retries += 1
                log.warning("Feast push failed (attempt %d), retrying: %s", attempt + 1, exc)
                await asyncio.sleep(0.2 * 2**attempt)
        self.counters.pushes += 1

    async def _push_once(self, rows: list[UserHistoryFeatures]) -> None:
        start = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pusher, self.store.push_user_histories, rows)
        finally:
            self.counters.push_s += time.perf_counter() - start

    async def _rewind(self, rewind: Rewind) -> None:
        """Seek back to the first record not applied (see ``BatchLedger.rewinds``)."""
        topic = self.kafka.events_topic
        if rewind.first:
            self.counters.rewinds += 1
            log.warning(
                "%s[%d]: offset %d delivered where %d was next; seeking back to %d",
                topic, rewind.partition, rewind.got, rewind.wanted, rewind.wanted,
            )  # fmt: skip
        tp = TP(topic, rewind.partition)
        await faust_compat.seek_between_fetches(self.app, tp, rewind.wanted)

    def _feature_row(self, user: int, state: UserHistory) -> UserHistoryFeatures:
        codes = self.item_codes.lookup(state.items)
        return UserHistoryFeatures(
            user_id=user,
            recent_item_ids=state.items[-self.features.recent_len :],
            long_codes=self.codebook.pack(codes),
            history_len=state.count,
            last_ts_ms=state.last_ts_ms,
            last_offset=state.last_offset,
            codebook_version=self.codebook_version,
        )

    def _table_position(self, partition: int) -> int | None:
        record = self.table.get(_position_key(partition))
        return None if record is None else int(record["applied"])

    # -- the rebalance hook and the timer ------------------------------------------------------

    async def resume_from_table(self, sender: Any, /, *_: Any, **__: Any) -> None:
        """Once the table is recovered, and before Faust seeks its partitions to the committed
        offsets: commit the table's positions, so that it seeks to the first unapplied record.
        A partition the table has no position for starts at its earliest offset."""
        topic = self.kafka.events_topic
        assigned = [tp for tp in sender.consumer.assignment() if tp.topic == topic]
        self._owned = {tp.partition for tp in assigned}
        positions = {tp.partition: self._table_position(tp.partition) for tp in assigned}
        unknown = [tp for tp in assigned if positions[tp.partition] is None]
        earliest: dict[int, int] = {}
        if unknown:
            try:
                found = await sender.consumer.earliest_offsets(*unknown)
            except Exception as exc:  # then the first offset delivered is taken as the start
                log.warning("could not read the earliest offsets of %s: %r", unknown, exc)
            else:
                earliest = {tp.partition: int(offset) for tp, offset in found.items()}
        resume = self.ledger.assign(positions, earliest)
        if not resume:
            return
        log.info(
            "resuming %s at the table's positions %s (new partitions from their earliest: %s)",
            topic,
            {p: o for p, o in sorted(resume.items()) if p not in earliest},
            sorted(earliest.items()),
        )  # fmt: skip
        try:
            await faust_compat.commit_offsets(
                sender, {TP(topic, p): offset for p, offset in resume.items()}
            )
        except Exception as exc:  # the ledger still seeks back if need be
            log.warning("could not commit the table's positions at assignment: %r", exc)

    async def finish_batch_before_revoke(self, sender: Any, /, *_: Any, **__: Any) -> None:
        """On a revocation (every rebalance): let the batch in progress finish before the
        partitions move on (see the module doc); until the next assignment, own none."""
        self._owned = set()
        task = self._in_flight
        if task is None or task.done():
            return
        log.info("rebalance: finishing the batch in progress before giving up partitions")
        try:
            await asyncio.shield(task)
        except BaseException:  # the agent's complete() handles the failure (it ends the process)
            log.warning("the batch in progress failed during a rebalance")

    async def report(self) -> None:
        """The timer: the counters, every 10 s (benchmarks read this line)."""
        counters = self.counters
        log.info(
            "events=%d samples=%d dead_letters=%d redeliveries=%d pushes=%d rewinds=%d "
            "batches=%d busy_s=%s push_s=%.1f applied=%s not_owned=%d",
            counters.events, counters.samples, counters.dead_letters, counters.redeliveries,
            counters.pushes, counters.rewinds, counters.batches,
            {k: round(v, 1) for k, v in counters.phase_s.items()}, counters.push_s,
            dict(sorted(self.ledger.positions().items())), counters.not_owned,
        )  # fmt: skip
