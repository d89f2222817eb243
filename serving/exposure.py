"""Exposure logging: what a response showed, as ``exposure`` events on the events topic.

One record per request and experiment layer: the shown items in ``item_ids`` (best first), the
request id, the model version and the request's latency. The ClickHouse sink stores each as one
``impression`` per item with its 0-based position (``streaming.schema.exposure_impressions``), so
the analytics see the rows they always did (``abtest.metrics`` counts impressions per user,
distinct request ids as exposures, and each request's latency once). A user in experiments of
several layers gets one record per layer, tagged with that layer's experiment and variant, so
each experiment's analytics see every exposure of its users; a held-out user's are tagged
``holdout``/``holdout``, and a user in no experiment gets an untagged one. (Until issue 19 the
service sent the impressions themselves, ten or more records per request; the sink still reads
those.)

Sending is asynchronous (kafka-python buffers and a background thread sends); :meth:`check`
flushes and reports records the broker did not acknowledge, and the readiness probe uses it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from core.errors import BrokerError
from core.settings_groups import KafkaSettings
from streaming.kafka_io import EventProducer
from streaming.schema import Event

__all__ = ["Exposure", "ExposureLog", "exposure_events"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exposure:
    """One served list and the assignments it is logged under."""

    user_id: int
    request_id: str
    items: Sequence[int]
    assignments: Sequence[tuple[str | None, str | None]]  # (experiment, variant) pairs
    model_version: str
    latency_ms: float
    ts_ms: int


def exposure_events(exposure: Exposure) -> list[Event]:
    """One ``exposure`` event per assignment (none for an empty list)."""
    if not exposure.items:
        return []
    return [
        Event(
            event_id=uuid.uuid4(),
            user_id=exposure.user_id,
            event_type="exposure",
            ts_ms=exposure.ts_ms,
            experiment=experiment,
            variant=variant,
            request_id=exposure.request_id,
            model_version=exposure.model_version,
            latency_ms=max(0.0, exposure.latency_ms),
            item_ids=[int(item) for item in exposure.items],
        )
        for experiment, variant in exposure.assignments
    ]


class ExposureLog:
    """Exposures to ``kafka.events_topic`` through the project's :class:`EventProducer`."""

    def __init__(self, kafka: KafkaSettings, max_block_ms: int = 2000, linger_ms: int = 50) -> None:
        # max_block_ms bounds how long a send may block a request thread when the broker is
        # unreachable (kafka-python's default is 60 s). Records wait up to linger_ms to be sent
        # together: several requests' in one produce request.
        self.producer = EventProducer(kafka, max_block_ms=max_block_ms, linger_ms=linger_ms)
        self.topic = kafka.events_topic
        self._lock = threading.Lock()
        self.sent = 0
        self.failed = 0
        self.healthy = True
        self.last_error: str | None = None

    def log(self, exposure: Exposure) -> int:
        """Queue the exposure's records; return how many. BrokerError if one cannot be."""
        events = exposure_events(exposure)
        try:
            for event in events:
                self.producer.send(event)
        except BrokerError as exc:
            with self._lock:
                self.failed += len(events)
                self.healthy = False
                self.last_error = str(exc)
            raise
        with self._lock:
            self.sent += len(events)
        return len(events)

    def check(self, timeout_s: float = 10.0) -> bool:
        """Flush; healthy when every record sent so far was acknowledged."""
        try:
            self.producer.flush(timeout_s)
        except BrokerError as exc:
            with self._lock:
                self.healthy = False
                self.last_error = str(exc)
            log.error("exposure events were not stored: %s", exc)
            return False
        with self._lock:
            self.healthy = True
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        start = time.monotonic()
        self.check(timeout_s)
        self.producer.close()
        log.info("exposure log closed after %.2f s (%d sent)", time.monotonic() - start, self.sent)
