"""The faust-streaming app: consume ``events``, keep each user's history, push it to Feast.

One agent, ``user_history``, reads raw event bytes in batches (``stream.take_events``), because
Faust handles single events at only ~500/s on two cores. Per batch it:

1. parses every record; a record that fails goes to the dead-letter topic with its original bytes
   and the reason in headers (never dropped, never fatal);
2. applies the valid events to the users' states from the changelog-backed table (redeliveries,
   recognised by offset, change nothing);
3. pushes the changed users' rows (last R ids, last P items as packed codebook codes) to Feast;
4. sends one training sample per positive event to ``training-samples`` and waits until the
   broker has acknowledged them (and any dead letters);
5. only then writes the table, and waits until the broker has acknowledged the changelog records,
   so that a crash at any step replays the batch (the idempotent push repeats rather than being
   skipped), and a state that makes the batch's events redeliveries is never durable before the
   samples those events produced.

Where to resume is the table's business, not Faust's. The table keeps, per source partition (key
``-1 - partition``), the newest offset whose effects it holds, written after the users' states to
the same changelog partition. Faust's own offset tracking is switched off for the events topic
(``acks=False``): faust-streaming 0.15.3 was seen committing offsets far past the records the
worker had processed (1580 committed against 556 applied, after a SIGKILL), and its flush before a
commit returns as soon as no message was sent for 0.1 s, with messages still buffered. Instead:

- after each batch, once its changelog records are acknowledged, the worker commits the batch's
  positions (offset + 1) itself, so that the group's offsets (the lag that pipeline health shows)
  never run ahead of the table;
- at every assignment, once the table is recovered and before Faust seeks to the committed
  offsets, it commits the table's positions for its partitions (``resume_from_table``), so Faust
  starts exactly after the last applied record, whatever the group held before;
- a record older than the position is a redelivery and is skipped; a record beyond the next
  expected offset means records were skipped: it is ignored and the consumer is sought back to the
  missing offset (logged once, counted in ``rewinds``); seen in a 100k-event kill run, one record
  skipped by Faust just after a restart. A partition with no position yet (a new app, or a lost
  changelog) is committed at its earliest offset at assignment and read from there, whatever the
  group held: the table has none of its effects, and a skip of its very first record shows.
  This check assumes the events topic's offsets are contiguous, as they are with the project's
  producers: a transactional producer's markers or a compacted topic would leave holes that no
  seek fills (the worker would seek back for ever); so would records that retention deletes
  before the worker has read them.

A batch must never end half-done: a failed Feast push is retried (``worker_push_attempts``,
doubling back-off); a batch that still fails stops the process at once (``os._exit``, like a
crash), before its positions are written, so that a restart re-reads it. A stop (SIGTERM) that
arrives during a batch lets the batch finish first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.streams import _current_event as _CURRENT_EVENT
from faust.types import EventT, StreamT

from features.codebook import ResidualCodebook
from features.item_features import ItemCodeTable
from features.store import FeatureStoreClient, UserHistoryFeatures
from hymirec.errors import ConfigError, FeatureStoreError, InvalidEvent
from hymirec.settings import Settings
from streaming.fetch_backoff import install_aiokafka_backoff
from streaming.history import UserHistory
from streaming.schema import Event, TrainingSample, parse_event

__all__ = ["PipelineCounters", "create_app"]

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
    skipped_deliveries: int = 0  # records delivered after a gap (ignored; see _rewind)
    rewinds: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    # Wall seconds spent per phase of batch processing (the rest is waiting for records).
    phase_s: dict[str, float] = field(
        default_factory=lambda: {"apply": 0.0, "push": 0.0, "samples": 0.0, "table": 0.0}
    )


def _lap(counters: PipelineCounters, phase: str, since: float) -> float:
    now = time.perf_counter()
    counters.phase_s[phase] += now - since
    return now


def _faust_brokers(bootstrap: str) -> list[str]:
    return [f"kafka://{address.strip()}" for address in bootstrap.split(",") if address.strip()]


def create_app(
    settings: Settings,
    codebook: ResidualCodebook,
    item_codes: ItemCodeTable,
    store: FeatureStoreClient,
) -> tuple[faust.App, PipelineCounters]:
    """Build the Faust app with its topics, table and agent, wired to the given store."""
    # Faust makes this folder even for memory tables; its default is "<id>-data" in the cwd.
    datadir = settings.data_dir.resolve() / "faust" / settings.faust_app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    install_aiokafka_backoff(settings.kafka_empty_fetch_backoff_ms)  # idle: no fetch spin
    app = faust.App(
        settings.faust_app_id,
        broker=_faust_brokers(settings.kafka_bootstrap),
        store="memory://",  # state lives in the changelog topic; recovered on start
        datadir=str(datadir),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=1,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
        web_port=settings.worker_web_port,
        # Static group membership: a worker restarted after a crash rejoins under the same
        # instance id and takes its partitions back at once. Without it, a new member waits for
        # the dead one's session to expire, and the embedded broker (noida-db 0.2.3) never
        # expires it: the group stays stuck in the rebalance (seen here, kafka-python and
        # aiokafka alike). Each worker replica needs its own stable id.
        consumer_group_instance_id=settings.worker_instance_id,
        broker_session_timeout=settings.worker_session_timeout_s,
        broker_heartbeat_interval=max(1.0, settings.worker_session_timeout_s / 5),
        broker_max_poll_interval=settings.worker_max_poll_interval_s,
        producer_max_request_size=settings.max_message_bytes,
        consumer_max_fetch_size=settings.max_message_bytes,
        producer_acks=-1,
        broker_commit_every=settings.stream_batch_size,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, 2 * settings.stream_batch_size),
    )
    events_topic = app.topic(
        settings.events_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
        acks=False,  # Faust neither tracks nor commits its offsets: the worker does (see above)
    )
    dead_letter_topic = app.topic(
        settings.dead_letter_topic, key_serializer="raw", value_serializer="raw"
    )
    training_topic = app.topic(
        settings.training_topic, key_serializer="raw", value_serializer="raw"
    )
    histories = app.Table(
        "user-history",
        default=None,
        schema=faust.Schema(
            key_type=int,  # type: ignore[arg-type]
            key_serializer="json",
            value_serializer="json",
        ),
        partitions=settings.topic_partitions,
    )
    counters = PipelineCounters()
    codebook_version = codebook.version
    pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feast-push")
    rewound_to: dict[int, int] = {}  # partition -> the offset last sought back to
    start_offsets: dict[int, int] = {}  # partition -> first offset, while it has no position
    drops = fault_drops(settings.worker_fault_drop)  # partition -> offsets to ignore once
    if drops:
        log.warning(
            "fault injection (worker_fault_drop %s): the first delivery of those offsets is "
            "ignored", settings.worker_fault_drop,
        )  # fmt: skip
    applied_now: dict[int, int] = {}  # partition -> newest applied offset (for the log)

    async def dead_letter(event: EventT[bytes], error: InvalidEvent) -> None:
        message = event.message
        counters.dead_letters += 1
        counters.reasons[error.reason] = counters.reasons.get(error.reason, 0) + 1
        log.warning(
            "dead-lettered %s[%d]@%d: %s", message.topic, message.partition, message.offset, error
        )
        await dead_letter_topic.send(
            key=message.key,
            value=event.value,
            headers={
                "reason": error.reason.encode(),
                "error": str(error.detail)[:4000].encode(),
                "source": f"{message.topic}/{message.partition}/{message.offset}".encode(),
            },
        )

    @app.agent(events_topic, name="user-history")
    async def user_history(stream: StreamT[bytes]) -> None:
        async for batch in stream.take_events(  # type: ignore[attr-defined]
            settings.stream_batch_size, within=settings.stream_batch_window_s
        ):
            await complete(batch)

    async def complete(batch: list[EventT[bytes]]) -> None:
        """Process the batch to its end, or end the process before its positions are written (a
        crashed Faust agent would leave a worker that runs but consumes nothing)."""
        task = asyncio.ensure_future(process_batch(batch))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The worker is stopping: finish this batch first. A second cancellation means it
            # cannot wait: die before the batch's positions are written.
            log.info("stopping: finishing the batch in progress (%d records)", len(batch))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                _die(f"stopped in the middle of a batch of {len(batch)} records", None)
            raise
        except BaseException as exc:
            _die(f"a batch of {len(batch)} records failed", exc)

    async def push(rows: list[UserHistoryFeatures]) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(settings.worker_push_attempts):
            try:
                await loop.run_in_executor(pusher, store.push_user_histories, rows)
                return
            except FeatureStoreError as exc:
                if attempt + 1 == settings.worker_push_attempts:
                    raise
                counters.push_retries += 1
                log.warning("Feast push failed (attempt %d), retrying: %s", attempt + 1, exc)
                await asyncio.sleep(0.2 * 2**attempt)

    async def process_batch(batch: list[EventT[bytes]]) -> None:
        clock = time.perf_counter()
        dead_before = counters.dead_letters
        changed: dict[int, UserHistory] = {}
        last_event: dict[int, EventT[bytes]] = {}
        samples: list[TrainingSample] = []
        positions: dict[int, int] = {}  # partition -> newest offset applied, this batch on
        last_record: dict[int, EventT[bytes]] = {}
        gaps: dict[int, tuple[Any, int, int]] = {}  # partition -> (tp, wanted, first got)
        for record in batch:
            message = record.message
            partition, offset = message.partition, message.offset
            if drops and offset in drops.get(partition, ()):  # fault injection (tests)
                drops[partition].discard(offset)  # the fault: as if never delivered
                continue
            applied_to = positions.get(partition)
            if applied_to is None:
                applied_to = _applied_offset(partition, offset)
            if offset <= applied_to:
                counters.redeliveries += 1
                continue
            if offset > applied_to + 1:
                counters.skipped_deliveries += 1
                gaps.setdefault(partition, (message.tp, applied_to + 1, offset))
                continue
            positions[partition] = offset
            last_record[partition] = record
            try:
                event: Event = parse_event(record.value, settings.max_event_bytes)
            except InvalidEvent as error:
                await dead_letter(record, error)
                continue
            user = event.user_id
            state = changed.get(user)
            if state is None:
                state = UserHistory.from_record(histories.get(user))
            ingest_ts_ms = int(message.timestamp * 1000) if message.timestamp else None
            applied, sample = state.apply(
                event, offset, settings.recent_len, settings.long_len, ingest_ts_ms
            )
            if not applied:
                counters.redeliveries += 1
                continue
            counters.events += 1
            changed[user] = state
            last_event[user] = record
            if sample is not None:
                samples.append(sample)
        for partition, (tp, wanted, got) in gaps.items():
            if positions.get(partition, wanted - 1) < wanted:  # not filled later in the batch
                await _rewind(tp, wanted, got)
        if not positions:
            return
        if not changed:
            if counters.dead_letters != dead_before:
                await flush_producer()
            _write_positions(positions, last_record)
            await flush_producer()
            await _commit_positions(positions, last_record)
            return
        rows = [_feature_row(user, state) for user, state in changed.items()]
        clock = _lap(counters, "apply", clock)
        await push(rows)
        counters.pushes += 1
        clock = _lap(counters, "push", clock)
        for sample in samples:
            training_topic.send_soon(
                key=str(sample.user_id).encode(), value=sample.model_dump_json().encode()
            )
        await flush_producer()  # samples and dead letters durable before the state moves on
        counters.samples += len(samples)
        clock = _lap(counters, "samples", clock)
        for user, state in changed.items():
            # A table write goes to the changelog partition of the task's "current event". In a
            # batch that would be whichever event came last; make it this user's own event so the
            # state lands on the user's partition (what recovery after a rebalance reads).
            token = _CURRENT_EVENT.set(weakref.ref(last_event[user]))
            try:
                histories[user] = state.to_record()
            finally:
                _CURRENT_EVENT.reset(token)
        _write_positions(positions, last_record)  # after the users, on the same partitions
        await flush_producer()  # the changelog durable before the offsets are committed
        await _commit_positions(positions, last_record)
        _lap(counters, "table", clock)

    def _partition_key(partition: int) -> int:
        return -1 - partition  # user ids are >= 0

    def _applied_offset(partition: int, first_offset: int) -> int:
        """The newest offset of ``partition`` whose effects are in the table; with no record yet
        (a new app), the offset before the partition's earliest one (``resume_from_table``), or
        before the first one delivered if that was not known."""
        record = histories.get(_partition_key(partition))
        if record is not None:
            return int(record["applied"])
        return start_offsets.get(partition, first_offset) - 1

    async def _rewind(tp: Any, wanted: int, got: int) -> None:
        """Faust delivered ``got`` where ``wanted`` was next: seek back for the skipped records.

        Sought again after every batch with such deliveries (once per partition and batch: each
        seek waits for the consumer thread's fetch in progress): records Faust had already
        fetched still arrive after a seek and move its read position past ``wanted``; the seek
        after the last of them holds (a record behind Faust's read position would be dropped,
        not delivered)."""
        if rewound_to.get(tp.partition) != wanted:
            rewound_to[tp.partition] = wanted
            counters.rewinds += 1
            log.warning(
                "%s[%d]: offset %d delivered where %d was next; seeking back to %d",
                tp.topic, tp.partition, got, wanted, wanted,
            )  # fmt: skip
        await _seek(app, tp, wanted)

    def _write_positions(positions: dict[int, int], records: dict[int, EventT[bytes]]) -> None:
        """Each partition's newest applied offset, to its own changelog partition (see above)."""
        for partition, offset in positions.items():
            token = _CURRENT_EVENT.set(weakref.ref(records[partition]))
            try:
                histories[_partition_key(partition)] = {"applied": offset}
            finally:
                _CURRENT_EVENT.reset(token)

    async def _commit_positions(
        positions: dict[int, int], records: dict[int, EventT[bytes]]
    ) -> None:
        """Commit the group's offsets up to what the table now holds (never beyond it)."""
        applied_now.update(positions)
        await _commit(app, {records[p].message.tp: offset + 1 for p, offset in positions.items()})

    @app.on_rebalance_complete.connect
    async def resume_from_table(sender: Any, /, *_: Any, signal: Any, **__: Any) -> None:
        """Once the table is recovered, and before Faust seeks its partitions to the committed
        offsets: commit the table's positions, so that it seeks to the first unapplied record."""
        rewound_to.clear()
        start_offsets.clear()
        offsets: dict[Any, int] = {}
        unknown: list[Any] = []  # partitions with no position in the table: a new app
        for tp in sender.consumer.assignment():
            if tp.topic != settings.events_topic:
                continue
            record = histories.get(_partition_key(tp.partition))
            if record is not None:
                offsets[tp] = int(record["applied"]) + 1
            else:
                unknown.append(tp)
        if unknown:
            # The table has none of these partitions' effects, so they are read from their first
            # record; knowing that offset also reveals a skip of the very first record.
            try:
                earliest = await sender.consumer.earliest_offsets(*unknown)
            except Exception as exc:  # then the first offset delivered is taken as the start
                log.warning("could not read the earliest offsets of %s: %r", unknown, exc)
            else:
                for tp, offset in earliest.items():
                    start_offsets[tp.partition] = offsets[tp] = int(offset)
        if not offsets:
            return
        log.info(
            "resuming %s at the table's positions %s (new partitions from their earliest: %s)",
            settings.events_topic,
            {tp.partition: o for tp, o in sorted(offsets.items()) if tp not in unknown},
            sorted(start_offsets.items()),
        )  # fmt: skip
        try:
            await _commit(sender, offsets)
        except Exception as exc:  # the delivery check below still seeks back if need be
            log.warning("could not commit the table's positions at assignment: %r", exc)

    async def flush_producer() -> None:
        """Return once the broker has acknowledged every message handed to the producer."""
        producer = app.producer
        while producer.buffer.size:  # its flush may return early: loop until it is empty
            await producer.buffer.flush_atmost(producer.buffer.size)
        await producer.flush()  # then the aiokafka producer's in-flight batches

    def _feature_row(user: int, state: UserHistory) -> UserHistoryFeatures:
        codes = item_codes.lookup(state.items)
        return UserHistoryFeatures(
            user_id=user,
            recent_item_ids=state.items[-settings.recent_len :],
            long_codes=codebook.pack(codes),
            history_len=state.count,
            last_ts_ms=state.last_ts_ms,
            last_offset=state.last_offset,
            codebook_version=codebook_version,
        )

    @app.timer(interval=10.0)  # type: ignore[untyped-decorator]
    async def report() -> None:
        log.info(
            "events=%d samples=%d dead_letters=%d redeliveries=%d pushes=%d rewinds=%d busy_s=%s "
            "applied=%s",
            counters.events, counters.samples, counters.dead_letters, counters.redeliveries,
            counters.pushes, counters.rewinds,
            {k: round(v, 1) for k, v in counters.phase_s.items()},
            dict(sorted(applied_now.items())),
        )  # fmt: skip

    return app, counters


def fault_drops(spec: str) -> dict[int, set[int]]:
    """``settings.worker_fault_drop`` ('P:A-B,...') as partition -> offsets."""
    drops: dict[int, set[int]] = {}
    for part in filter(None, spec.split(",")):
        partition, span = part.split(":")
        first, last = (int(x) for x in span.split("-"))
        if last < first or last - first >= 100_000:
            raise ConfigError(f"worker_fault_drop: {part!r} must be P:A-B with A <= B < A + 100000")
        drops.setdefault(int(partition), set()).update(range(first, last + 1))
    return drops


async def _commit(app: faust.App, offsets: dict[Any, int]) -> None:
    """Commit these offsets for the group, as Faust commits acknowledged ones (its consumer's
    ``_commit_offsets``: drops partitions no longer assigned, records what it committed)."""
    consumer: Any = app.consumer
    await consumer._commit_offsets(offsets)


async def _seek(app: faust.App, tp: Any, offset: int) -> None:
    """Seek ``tp`` to ``offset`` on the consumer's own thread, then move Faust's read offset.

    Not ``app.consumer.seek``: it seeks from the calling thread while the aiokafka consumer
    fetches on its own, and a 100k-event kill run crashed on that race (aiokafka's
    ``fetched_records`` raised ``KeyError`` for the partition just sought, and the worker died).
    Run through the thread's call queue, the seek lands between two fetches."""
    consumer: Any = app.consumer
    thread = consumer._thread
    await thread.call_thread(thread.seek, tp, offset)
    consumer._read_offset[tp] = offset


def _die(what: str, exc: BaseException | None) -> None:
    """End the process now, before the batch's positions are written: a restart re-reads it."""
    log.critical(
        "%s; exiting with code %d before its offsets can be committed (a restart re-reads it)",
        what, EXIT_BATCH_FAILED, exc_info=exc,
    )  # fmt: skip
    logging.shutdown()
    sys.stderr.flush()
    os._exit(EXIT_BATCH_FAILED)


def run_worker(settings: Settings, loglevel: str = "info") -> Any:
    """Load the item codes, open Feast, and run one Faust worker in the foreground."""
    from faust.worker import Worker

    from features.item_features import load_item_features

    item_features = load_item_features(settings)
    store = FeatureStoreClient(settings)
    app, _ = create_app(settings, item_features.codebook, item_features.table, store)
    worker = Worker(app, loglevel=loglevel, quiet=True)
    return worker.execute_from_commandline()
