"""The faust-streaming app: consume ``events``, keep each user's history, push it to Feast.

One agent, ``user_history``, reads raw event bytes in batches (``stream.take_events``), because
Faust handles single events at only ~500/s on two cores. Per batch it:

1. parses every record; a record that fails goes to the dead-letter topic with its original bytes
   and the reason in headers (never dropped, never fatal);
2. applies the valid events to the users' states from the changelog-backed table (redeliveries,
   recognised by offset, change nothing);
3. pushes the changed users' rows (last R ids, last P items as packed codebook codes) to Feast;
4. sends one training sample per positive event to ``training-samples``;
5. only then writes the table, so that a crash at any step replays the batch and the idempotent
   push repeats rather than being skipped.

Faust flushes the producer (changelog, samples, dead letters) before it commits offsets.
"""

from __future__ import annotations

import asyncio
import logging
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
from hymirec.errors import InvalidEvent
from hymirec.settings import Settings
from streaming.history import UserHistory
from streaming.schema import Event, TrainingSample, parse_event

__all__ = ["PipelineCounters", "create_app"]

log = logging.getLogger(__name__)


@dataclass
class PipelineCounters:
    """What the worker has done since it started (logged; read by tests and benchmarks)."""

    events: int = 0
    dead_letters: int = 0
    redeliveries: int = 0
    samples: int = 0
    pushes: int = 0
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
    app = faust.App(
        settings.faust_app_id,
        broker=_faust_brokers(settings.kafka_bootstrap),
        store="memory://",  # state lives in the changelog topic; recovered on start
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
            await process_batch(batch)

    async def process_batch(batch: list[EventT[bytes]]) -> None:
        clock = time.perf_counter()
        changed: dict[int, UserHistory] = {}
        last_event: dict[int, EventT[bytes]] = {}
        samples: list[TrainingSample] = []
        for record in batch:
            try:
                event: Event = parse_event(record.value, settings.max_event_bytes)
            except InvalidEvent as error:
                await dead_letter(record, error)
                continue
            user = event.user_id
            state = changed.get(user)
            if state is None:
                state = UserHistory.from_record(histories.get(user))
            message = record.message
            ingest_ts_ms = int(message.timestamp * 1000) if message.timestamp else None
            applied, sample = state.apply(
                event, message.offset, settings.recent_len, settings.long_len, ingest_ts_ms
            )
            if not applied:
                counters.redeliveries += 1
                continue
            counters.events += 1
            changed[user] = state
            last_event[user] = record
            if sample is not None:
                samples.append(sample)
        if not changed:
            return
        rows = [_feature_row(user, state) for user, state in changed.items()]
        clock = _lap(counters, "apply", clock)
        await asyncio.get_running_loop().run_in_executor(pusher, store.push_user_histories, rows)
        counters.pushes += 1
        clock = _lap(counters, "push", clock)
        for sample in samples:
            # Buffered: the producer sends in the background and Faust flushes it before
            # committing the offsets of this batch.
            training_topic.send_soon(
                key=str(sample.user_id).encode(), value=sample.model_dump_json().encode()
            )
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
        _lap(counters, "table", clock)

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
            "events=%d samples=%d dead_letters=%d redeliveries=%d pushes=%d busy_s=%s",
            counters.events, counters.samples, counters.dead_letters, counters.redeliveries,
            counters.pushes, {k: round(v, 1) for k, v in counters.phase_s.items()},
        )  # fmt: skip

    return app, counters


def run_worker(settings: Settings, loglevel: str = "info") -> Any:
    """Load the item codes, open Feast, and run one Faust worker in the foreground."""
    from faust.worker import Worker

    from features.item_features import load_item_features

    item_features = load_item_features(settings)
    store = FeatureStoreClient(settings)
    app, _ = create_app(settings, item_features.codebook, item_features.table, store)
    worker = Worker(app, loglevel=loglevel, quiet=True)
    return worker.execute_from_commandline()
