"""The faust-streaming app of the stream worker: its settings, topic and table, wired to the
agent, rebalance hook and timer of :class:`~streaming.worker.UserHistoryWorker`.

The worker's behaviour and guarantees are described in streaming/worker.py; this module only
builds the app (``create_app``) and runs it (``run_worker``). The agent and the timer are
registered here rather than with decorators at import time because topic names and the app id
come from the settings, which the CLI builds at start-up (tests give each run its own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faust

from core.settings import Settings
from features.codebook import ResidualCodebook
from features.item_features import ItemCodeTable
from features.store import FeatureStoreClient
from streaming.faust_compat import check_faust_version
from streaming.fetch_backoff import install_aiokafka_backoff
from streaming.membership import leave_group
from streaming.worker import UserHistoryWorker

__all__ = ["AGENT_NAME", "create_app", "run_worker"]

AGENT_NAME = "user-history"
# Largest producer batch per partition (aiokafka keeps one open batch per partition and waits for
# it to be sent before starting the next): a 1,000-event batch's samples and changelog records
# then leave in a few requests instead of one 16 KiB batch per round trip.
_PRODUCER_BATCH_BYTES = 1024 * 1024


def _faust_brokers(bootstrap: str) -> list[str]:
    return [f"kafka://{address.strip()}" for address in bootstrap.split(",") if address.strip()]


def _faust_app(settings: Settings, datadir: Path) -> faust.App:
    return faust.App(
        settings.worker.app_id,
        broker=_faust_brokers(settings.kafka.bootstrap),
        store="memory://",  # state lives in the changelog topic; recovered on start
        datadir=str(datadir),
        topic_partitions=settings.kafka.events_topic_partitions,
        topic_replication_factor=1,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
        web_port=settings.worker.web_port,
        # Static group membership: a worker restarted after a crash rejoins under the same
        # instance id and takes its partitions back at once. Without it, a new member waits for
        # the dead one's session to expire, and the embedded broker (noida-db 0.2.3) never
        # expires it: the group stays stuck in the rebalance (seen here, kafka-python and
        # aiokafka alike). Each worker replica needs its own stable id.
        consumer_group_instance_id=settings.worker.instance_id,
        broker_session_timeout=settings.worker.session_timeout_s,
        broker_heartbeat_interval=max(1.0, settings.worker.session_timeout_s / 5),
        broker_max_poll_interval=settings.worker.max_poll_interval_s,
        producer_max_request_size=settings.kafka.max_message_bytes,
        producer_max_batch_size=min(_PRODUCER_BATCH_BYTES, settings.kafka.max_message_bytes),
        consumer_max_fetch_size=settings.kafka.max_message_bytes,
        producer_acks=-1,
        stream_buffer_maxsize=max(4096, 2 * settings.worker.batch_size),
    )


def create_app(
    settings: Settings,
    codebook: ResidualCodebook,
    item_codes: ItemCodeTable,
    store: FeatureStoreClient,
) -> tuple[faust.App, UserHistoryWorker]:
    """Build the Faust app with its topic and table, and the worker registered on it."""
    check_faust_version()
    # Faust makes this folder even for memory tables; its default is "<id>-data" in the cwd.
    datadir = settings.data_dir.resolve() / "faust" / settings.worker.app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    install_aiokafka_backoff(settings.kafka.empty_fetch_backoff_ms)  # idle: no fetch spin
    app = _faust_app(settings, datadir)
    events = app.topic(
        settings.kafka.events_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.kafka.events_topic_partitions,
        acks=False,  # Faust neither tracks nor commits its offsets: the worker does
    )
    histories = app.Table(
        "user-history",
        default=None,
        schema=faust.Schema(
            key_type=int,  # type: ignore[arg-type]
            key_serializer="json",
            value_serializer="json",
        ),
        partitions=settings.kafka.events_topic_partitions,
    )
    worker = UserHistoryWorker(
        app,
        histories,
        kafka=settings.kafka,
        worker=settings.worker,
        features=settings.features,
        store=store,
        codebook=codebook,
        item_codes=item_codes,
    )
    app.agent(events, name=AGENT_NAME)(worker.consume)
    app.timer(interval=10.0)(worker.report)
    app.on_partitions_revoked.connect(worker.finish_batch_before_revoke)
    app.on_rebalance_complete.connect(worker.resume_from_table)
    return app, worker


def run_worker(settings: Settings, loglevel: str = "info") -> Any:
    """Load the item codes, open Feast, and run one Faust worker in the foreground. Once it has
    stopped (its last batch committed), it leaves its group, so that its partitions move to the
    other replicas at once (streaming/membership.py); a crash (SIGKILL, exit 70) skips that."""
    from faust.worker import Worker

    from features.item_features import load_item_features

    item_features = load_item_features(settings)
    store = FeatureStoreClient(settings)
    app, _ = create_app(settings, item_features.codebook, item_features.table, store)
    worker = Worker(app, loglevel=loglevel, quiet=True)
    try:
        return worker.execute_from_commandline()
    finally:
        leave_group(settings.kafka.bootstrap, settings.worker.app_id, settings.worker.instance_id)
