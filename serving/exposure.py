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

Sending is asynchronous: a request queues its exposure, the ``hymirec-exposures`` thread hands it
to kafka-python (which buffers, and sends from its own thread); :meth:`check` waits for the queue,
flushes and reports records the broker did not acknowledge, and the readiness probe uses it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
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
    """Exposures to ``kafka.events_topic`` through the project's :class:`EventProducer`, sent from
    a thread of their own.

    :meth:`log` only queues the exposure (a few microseconds): building the events and handing
    them to kafka-python (60 us a request measured here, most of it kafka-python's append and
    the wake-up of its network thread, which then competes for the GIL) happens on the
    ``hymirec-exposures`` thread, after the response has gone. Exposures queued within one wake-up
    are sent together. At most ``max_pending`` exposures wait: beyond that (the broker is away
    and kafka-python's buffer is full) :meth:`log` raises :class:`BrokerError` at once, so a
    request never waits for the broker. A record the producer refuses is counted in ``failed``
    and reported through ``on_failure`` (the service's metric). :meth:`check` waits for the
    queue to be handed over, then flushes.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        max_block_ms: int = 2000,
        linger_ms: int = 50,
        max_pending: int = 100_000,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        # max_block_ms bounds how long a send may block the exposure thread when the broker is
        # unreachable (kafka-python's default is 60 s). Records wait up to linger_ms to be sent
        # together: several requests' in one produce request.
        self.producer = EventProducer(kafka, max_block_ms=max_block_ms, linger_ms=linger_ms)
        self.topic = kafka.events_topic
        self.max_pending = max_pending
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: deque[Exposure] = deque()
        self._sending = 0  # exposures taken off the queue, not yet handed to the producer
        self._closing = False
        self.sent = 0
        self.failed = 0
        self.healthy = True
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="hymirec-exposures", daemon=True)
        self._thread.start()

    def log(self, exposure: Exposure) -> int:
        """Queue the exposure; return how many records it makes. BrokerError if the queue is
        full or the log is closed."""
        records = len(exposure.assignments) if exposure.items else 0
        if not records:
            return 0
        with self._lock:
            if self._closing or len(self._pending) >= self.max_pending:
                reason = "closed" if self._closing else f"{self.max_pending} exposures waiting"
                self.failed += records
                self.healthy = False
                self.last_error = f"exposure not queued: {reason}"
                raise BrokerError(self.last_error)
            self._pending.append(exposure)
            if len(self._pending) == 1:
                self._changed.notify_all()
        return records

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._changed.wait()
                if not self._pending:
                    return
                batch = list(self._pending)
                self._pending.clear()
                self._sending = len(batch)
            try:
                for exposure in batch:
                    self._send(exposure)
            finally:
                with self._lock:
                    self._sending = 0
                    self._changed.notify_all()

    def _send(self, exposure: Exposure) -> None:
        events = exposure_events(exposure)
        try:
            for event in events:
                self.producer.send(event)
        except BrokerError as exc:
            with self._lock:
                self.failed += len(events)
                self.healthy = False
                self.last_error = str(exc)
            log.error("request %s: exposure not logged: %s", exposure.request_id, exc)
            if self._on_failure is not None:
                self._on_failure()
            return
        with self._lock:
            self.sent += len(events)

    def _drained(self, timeout_s: float) -> bool:
        """Wait until every queued exposure is in the producer; False on timeout."""
        with self._lock:
            return self._changed.wait_for(
                lambda: not self._pending and not self._sending, timeout=timeout_s
            )

    def check(self, timeout_s: float = 10.0) -> bool:
        """Hand over the queue and flush; healthy when every record sent so far was
        acknowledged."""
        start = time.monotonic()
        try:
            if not self._drained(timeout_s):
                raise BrokerError(f"exposures still queued after {timeout_s:.1f} s")
            self.producer.flush(max(0.0, timeout_s - (time.monotonic() - start)))
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
        with self._lock:
            self._closing = True
            self._changed.notify_all()
        self._thread.join(timeout_s)
        self.check(max(0.0, timeout_s - (time.monotonic() - start)))
        self.producer.close()
        log.info("exposure log closed after %.2f s (%d sent)", time.monotonic() - start, self.sent)
