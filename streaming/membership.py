"""Leaving a consumer group as a static member, so that a replica stopped on purpose hands its
partitions over at once.

The worker and the sink join their groups with static membership (a stable
``group.instance.id``), so that a replica restarted after a crash takes its partitions back under
the same id without a rebalance. The price: since Kafka 2.3 a static member never sends
LeaveGroup when it closes (aiokafka and kafka-python alike), so the partitions of a replica that
was stopped for good stay with it until its session times out, and the embedded broker
(noida-db 0.2.3) never times a session out: scaling down would strand those partitions for ever.
So a replica that stops cleanly removes itself with the admin API's ``remove_group_members``
(LeaveGroup v3+, by instance id; KIP-345's way to scale static members down). A crashed replica
sends nothing and keeps its partitions until it returns under its id (or its session expires, on
Apache Kafka).
"""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.admin import MemberToRemove
from kafka.errors import KafkaError, NoError

__all__ = ["leave_group"]

log = logging.getLogger(__name__)


def leave_group(bootstrap: str, group_id: str, instance_id: str, timeout_ms: int = 5_000) -> bool:
    """Remove the static member ``instance_id`` from ``group_id``; True if the broker removed it.

    Best effort, for a process that is stopping: a failure is logged, never raised (the member
    then keeps its partitions until it rejoins or its session expires)."""
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id=f"{instance_id}-leave",
            request_timeout_ms=timeout_ms,
        )
    except KafkaError as exc:
        log.warning("%s could not leave group %s: %r", instance_id, group_id, exc)
        return False
    try:
        member = MemberToRemove(group_instance_id=instance_id, reason="stopped")
        result = admin.remove_group_members(group_id, [member])
    except KafkaError as exc:
        log.warning("%s could not leave group %s: %r", instance_id, group_id, exc)
        return False
    finally:
        admin.close()
    errors = [error for error in result.values() if error is not NoError]
    if errors:
        log.info("%s was not a member of group %s: %s", instance_id, group_id, errors)
        return False
    log.info("%s left group %s (its partitions move to the other members)", instance_id, group_id)
    return True
