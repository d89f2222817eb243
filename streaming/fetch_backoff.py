"""A client-side pause after empty fetches, for a broker that answers them at once.

Apache Kafka holds a fetch that finds no records for up to ``fetch.max.wait.ms``, so an idle
consumer sends a few requests a second. The embedded broker (noida-db 0.2.3) ignores that setting
and answers at once, so an idle consumer spins: an idle Faust worker (aiokafka) sent 6,600-8,300
empty fetches a second, 86% of a core, and the broker spent 12.5% answering them. So, when
``settings.kafka.empty_fetch_backoff_ms`` is above 0, a consumer pauses after a fetch that brought
nothing, 1 ms at first and twice as long after each further empty one, up to that cap; a fetch
with records resets it. A record that reaches an idle consumer waits at most about the cap. At 0
(production: docker/compose.yaml) nothing here changes what the clients do.

Two clients, two hooks:

- kafka-python 3.0.12 (the ClickHouse sink, the trainer): ``poll(timeout_ms)`` sends fetch after
  fetch until records come or the timeout ends (``KafkaConsumer.poll`` loops over ``_poll_once``),
  so a pause around ``poll`` is not enough; polling briefly instead left a restarted sink's group
  rebalancing for good (``tests/abtest/test_sink.py``, its restart step).
  :func:`install_kafka_python_backoff` wraps the private ``Fetcher.fetch_records`` (one round of
  fetches and the wait for them, called by ``_poll_once`` after the group work) so that an empty
  round is followed by the pause, within the poll's remaining time: ``poll`` keeps its timeout,
  its group joins and its heartbeats. Bound to kafka-python ``_KAFKA_PYTHON_VERSION``.
- aiokafka (Faust's consumer, in the worker) fetches on a background task with no public hook
  between two fetches. :func:`install_aiokafka_backoff` wraps the private
  ``Fetcher._proc_fetch_request`` (one fetch request and its response) so that a fetch that added
  no records holds its node "in flight" for the pause: the fetch loop sends the node nothing new
  until then. An unassignment or ``close()`` cancels the pause at once, as it cancels a fetch. The
  wrap is bound to the aiokafka version it was written for (``_AIOKAFKA_VERSION``).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import weakref
from collections.abc import Mapping, Sized
from typing import Any

from core.errors import ConfigError
from streaming.doorbell import DoorbellListener, doorbell_dir, register_ringer, ring

__all__ = [
    "EmptyFetchBackoff",
    "install_aiokafka_backoff",
    "install_kafka_python_backoff",
    "pause_after_fetch",
]

_AIOKAFKA_VERSION = "0.14.0"
_FIRST_PAUSE_MS = 1.0


class EmptyFetchBackoff:
    """The pause before the next fetch: doubling from 1 ms after each empty fetch, up to
    ``cap_ms``; none after a fetch with records; never with ``cap_ms`` 0 (off)."""

    def __init__(self, cap_ms: float) -> None:
        if cap_ms < 0:
            raise ConfigError(f"the empty-fetch back-off cap must be >= 0 ms, got {cap_ms}")
        self.cap_s = cap_ms / 1000
        self.pause_s = 0.0

    @property
    def enabled(self) -> bool:
        return self.cap_s > 0

    def after_fetch(self, records: int) -> float:
        """The pause (seconds) after a fetch that returned ``records`` records."""
        if records or not self.enabled:
            self.pause_s = 0.0
        else:
            self.pause_s = min(self.cap_s, max(_FIRST_PAUSE_MS / 1000, 2 * self.pause_s))
        return self.pause_s

    def rung(self) -> None:
        """The doorbell rang: records are waiting, so the next pauses start again from 1 ms."""
        self.pause_s = 0.0

    def pause(self, seconds: float, listener: DoorbellListener | None) -> None:
        """Sleep ``seconds``, or less if ``listener``'s doorbell rings meanwhile."""
        if listener is None:
            time.sleep(seconds)
        elif listener.wait(seconds):
            self.rung()

    async def pause_async(self, seconds: float, listener: DoorbellListener | None) -> None:
        """As :meth:`pause`, on the event loop."""
        if listener is None:
            await asyncio.sleep(seconds)
        elif await listener.wait_async(seconds):
            self.rung()


# -- kafka-python (private API: see the module docstring) ----------------------------------------

_KAFKA_PYTHON_VERSION = "3.0.12"
_kp_lock = threading.Lock()
_kp_installed = False
_kp_backoffs: weakref.WeakKeyDictionary[Any, EmptyFetchBackoff] = weakref.WeakKeyDictionary()
_kp_listeners: weakref.WeakKeyDictionary[Any, DoorbellListener] = weakref.WeakKeyDictionary()


def install_kafka_python_backoff(consumer: Any, cap_ms: float, *, doorbell: bool = True) -> None:
    """Pause ``consumer`` (a kafka-python ``KafkaConsumer``) after empty fetches, up to ``cap_ms``;
    with ``doorbell``, a pause ends early when a producer of this host rings its broker's doorbell
    (``streaming.doorbell``).

    With ``cap_ms`` 0, nothing is touched, whatever the kafka-python version. Otherwise wraps
    ``kafka.consumer.fetcher.Fetcher.fetch_records`` once per process (a consumer without a
    back-off passes straight through) and raises :class:`ConfigError` on a kafka-python version
    other than the one this was written for.
    """
    global _kp_installed
    backoff = EmptyFetchBackoff(cap_ms)
    if not backoff.enabled:
        return
    with _kp_lock:
        if not _kp_installed:
            _wrap_kafka_python_fetch()
            _kp_installed = True
    _kp_backoffs[consumer._fetcher] = backoff
    if doorbell:
        _kp_listeners[consumer._fetcher] = DoorbellListener(
            doorbell_dir(consumer.config["bootstrap_servers"])
        )


def pause_after_fetch(
    backoff: EmptyFetchBackoff, records: Mapping[Any, Sized], idle: bool, timeout_ms: float | None
) -> float:
    """Seconds to pause after ``Fetcher.fetch_records`` returned ``(records, idle)``: none when it
    had nothing to fetch (``idle``: kafka-python sleeps itself), and never beyond the poll's
    ``timeout_ms`` (so heartbeats and the caller's own timeout are kept)."""
    if idle:
        return 0.0
    pause_s = backoff.after_fetch(sum(len(batch) for batch in records.values()))
    if timeout_ms is not None:
        pause_s = min(pause_s, max(0.0, timeout_ms / 1000))
    return pause_s


def _wrap_kafka_python_fetch() -> None:
    import kafka
    from kafka.consumer.fetcher import Fetcher

    if kafka.__version__ != _KAFKA_PYTHON_VERSION:
        raise ConfigError(
            f"streaming.fetch_backoff hooks kafka-python {_KAFKA_PYTHON_VERSION}, found "
            f"{kafka.__version__}: check that KafkaConsumer.poll still fetches only through "
            "Fetcher.fetch_records, then update the hook (or set "
            "HYMIREC_KAFKA_EMPTY_FETCH_BACKOFF_MS=0 for a broker that waits server-side)"
        )
    original = Fetcher.fetch_records

    @functools.wraps(original)
    def fetch_records(
        self: Any,
        max_records: int | None = None,
        update_offsets: bool = True,
        timeout_ms: float | None = None,
    ) -> tuple[Any, bool]:
        records, idle = original(self, max_records, update_offsets, timeout_ms)
        backoff = _kp_backoffs.get(self)
        if backoff is not None:
            pause_s = pause_after_fetch(backoff, records, idle, timeout_ms)
            if pause_s > 0:  # the consumer's caller thread, inside its poll
                backoff.pause(pause_s, _kp_listeners.get(self))
        return records, idle

    Fetcher.fetch_records = fetch_records


# -- aiokafka (private API: see the module docstring) ---------------------------------------------

_lock = threading.Lock()
_cap_ms = 0.0  # the pauses' cap for every aiokafka consumer of this process; 0: none
_doorbell = False  # aiokafka consumers wait on their broker's doorbell, producers ring it
_installed = False
_backoffs: weakref.WeakKeyDictionary[Any, EmptyFetchBackoff] = weakref.WeakKeyDictionary()
_listeners: weakref.WeakKeyDictionary[Any, DoorbellListener] = weakref.WeakKeyDictionary()


def install_aiokafka_backoff(cap_ms: float, *, doorbell: bool = True) -> None:
    """Pause every aiokafka consumer of this process after empty fetches, up to ``cap_ms``.

    With ``doorbell`` (and a cap above 0), each consumer's pause ends early when its broker's
    doorbell rings (``streaming.doorbell``), and this process rings that doorbell whenever one of
    its aiokafka producers has a batch acknowledged (``MessageBatch.done``, wrapped here too).

    Wraps aiokafka's ``Fetcher._proc_fetch_request`` once per process (idempotent, thread-safe);
    a later call only changes the cap, and 0 turns the pauses off. With 0 and no wrap yet,
    nothing is wrapped, whatever the aiokafka version. Raises :class:`ConfigError` on a version
    other than the one this was written for: check that its fetch loop still sends a node nothing
    while that node's fetch task runs, then update or drop the hook.
    """
    global _cap_ms, _doorbell, _installed
    EmptyFetchBackoff(cap_ms)  # validates
    with _lock:
        if not _installed and cap_ms > 0:
            _wrap_aiokafka_fetch()
            _wrap_aiokafka_batch_done()
            _installed = True
        _cap_ms, _doorbell = cap_ms, doorbell and cap_ms > 0


def _aiokafka_listener(fetcher: Any) -> DoorbellListener | None:
    """``fetcher``'s doorbell (made at its first pause), its broker's doorbell rung by this
    process from then on; None with the doorbell off."""
    if not _doorbell:
        return None
    listener = _listeners.get(fetcher)
    if listener is None:
        directory = doorbell_dir(fetcher._client._bootstrap_servers)
        listener = _listeners[fetcher] = DoorbellListener(directory)
        register_ringer(directory)
    return listener


def _wrap_aiokafka_batch_done() -> None:
    from aiokafka.producer.message_accumulator import MessageBatch

    original = MessageBatch.done

    @functools.wraps(original)
    def done(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if _doorbell:
            ring()  # the batch's records are on the broker: wake this host's idle consumers
        return result

    MessageBatch.done = done


def _wrap_aiokafka_fetch() -> None:
    import aiokafka
    from aiokafka.consumer.fetcher import Fetcher

    if aiokafka.__version__ != _AIOKAFKA_VERSION:
        raise ConfigError(
            f"streaming.fetch_backoff hooks aiokafka {_AIOKAFKA_VERSION}, found "
            f"{aiokafka.__version__}: check that Fetcher._fetch_requests_routine still sends a "
            "node no fetch while its _proc_fetch_request task runs, then update the hook (or "
            "set HYMIREC_KAFKA_EMPTY_FETCH_BACKOFF_MS=0 for a broker that waits server-side)"
        )
    original = Fetcher._proc_fetch_request

    @functools.wraps(original)
    async def _proc_fetch_request(self: Any, assignment: Any, node_id: int, request: Any) -> bool:
        added: bool = await original(self, assignment, node_id, request)
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # the original swallowed a cancellation
            return added
        backoff = _backoffs.get(self)
        if backoff is None or backoff.cap_s != _cap_ms / 1000:
            backoff = _backoffs[self] = EmptyFetchBackoff(_cap_ms)
        pause_s = backoff.after_fetch(1 if added else 0)
        if pause_s:
            try:  # the node stays in flight: no fetch meanwhile
                await backoff.pause_async(pause_s, _aiokafka_listener(self))
            except asyncio.CancelledError:
                return added  # unassigned or closing: as the original does when cancelled
        return added

    Fetcher._proc_fetch_request = _proc_fetch_request
