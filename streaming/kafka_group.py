"""A fix for kafka-python 3.0.12's group join, applied before a subscribing consumer starts.

The fault. ``BaseCoordinator.join_group_async`` runs one JoinGroup/SyncGroup attempt as a task and
waits for it at most the caller's ``poll`` timeout. When the wait times out the task is kept, so
that the next ``poll`` waits for the same attempt. But the next ``poll`` starts a *new* attempt
when the kept task is already done, so an attempt that succeeded between two polls is thrown away:
the member sends JoinGroup again right after its SyncGroup succeeded. For a group leader that
starts one more rebalance. A short ``poll`` timeout makes this likely; a rebalance listener that
does real work (the ClickHouse sink inserts its pending batch there) uses up the poll's time
before the attempt is even sent.

Seen on the embedded broker: the sink leader re-joined 1 ms after its generation-2 SyncGroup
succeeded; the other member never got its generation-2 JoinGroup answer and the group stayed
rebalancing until the test gave up (``tests/abtest/test_sink.py``, half of the runs).

The fix: when the kept attempt succeeded, finish the join with its assignment, as the library does
after a successful wait, instead of starting another. A failed attempt, or one whose generation was
reset since, is left to the library, which starts a new one (an error's side effects, such as a
generation reset, were already applied). The patch is bound to the exact version it was written for.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import kafka
from kafka.coordinator.base import BaseCoordinator
from kafka.structs import MemberState

from core.errors import ConfigError

__all__ = ["fix_group_join"]

log = logging.getLogger(__name__)

_FIXED_VERSION = "3.0.12"
_lock = threading.Lock()
_applied = False


def fix_group_join() -> None:
    """Patch ``BaseCoordinator.join_group_async`` once per process (idempotent, thread-safe).

    Raises :class:`ConfigError` on another kafka-python version: the fault and the private
    attributes used here must be checked again before the patch is moved to it.
    """
    global _applied
    with _lock:
        if _applied:
            return
        if kafka.__version__ != _FIXED_VERSION:
            raise ConfigError(
                f"streaming.kafka_group fixes kafka-python {_FIXED_VERSION}, found "
                f"{kafka.__version__}: check whether join_group_async still discards a join "
                "attempt that completed between two polls, then update or drop the fix"
            )
        original = BaseCoordinator.join_group_async

        @functools.wraps(original)
        async def join_group_async(self: Any, timeout_ms: float | None = None) -> bool:
            attempt = self._join_task
            if (
                attempt is not None
                and attempt.is_done
                and attempt.succeeded()
                and not self._generation.is_lost()  # no reset since the attempt joined
            ):
                await _complete_join(self, attempt.value)
                return True
            result: bool = await original(self, timeout_ms)
            return result

        BaseCoordinator.join_group_async = join_group_async
        _applied = True


async def _complete_join(coordinator: Any, assignment: bytes) -> None:
    """What ``join_group_async`` does after a successful wait for its attempt."""
    coordinator._join_task = None
    generation = coordinator._generation
    log.info(
        "group %s: the join attempt completed between two polls; applying its assignment "
        "(generation %s) instead of joining again",
        coordinator.group_id,
        generation.generation_id,
    )
    with coordinator._lock:
        coordinator.rejoining = False
        coordinator.rejoin_needed = False
        coordinator.state = MemberState.STABLE
        coordinator._enable_heartbeat()
    await coordinator._on_join_complete_async(
        generation.generation_id, generation.member_id, generation.protocol, assignment
    )
