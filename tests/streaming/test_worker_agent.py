"""The worker's agent under Faust's ``test_context()``: no broker, no Feast.

Sends, changelog writes, commits and seeks are recorded in order (by replacing the calls in
streaming/faust_compat.py, as Faust's testing guide replaces ``send``), and the broker's
acknowledgements can be held back, so the order the README promises is checked directly: the
push and the samples' acknowledgements before any table write, the users' states before their
partition's position, the commit last.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.errors import FeatureStoreError
from core.settings import Settings
from features.codebook import ResidualCodebook
from features.item_features import ItemCodeTable
from features.store import UserHistoryFeatures
from streaming import faust_compat
from streaming.app import AGENT_NAME, create_app
from streaming.schema import Event
from streaming.worker import UserHistoryWorker

pytestmark = pytest.mark.timeout(120)

TOPIC = "events-agent-test"


@dataclass
class Recorder:
    """What the worker did, in order; with ``hold`` set, acknowledgements wait for ``release``."""

    log: list[tuple[Any, ...]] = field(default_factory=list)
    hold: bool = False
    held: list[asyncio.Future[None]] = field(default_factory=list)
    push_failures: int = 0
    failures: list[str] = field(default_factory=list)

    def ack(self, *entry: Any) -> asyncio.Future[None]:
        self.log.append(entry)
        future = asyncio.get_running_loop().create_future()
        if self.hold:
            self.held.append(future)
        else:
            future.set_result(None)
        return future

    def release(self) -> None:
        self.hold = False
        for future in self.held:
            if not future.done():
                future.set_result(None)

    def kinds(self) -> list[str]:
        return [entry[0] for entry in self.log]

    def entries(self, kind: str) -> list[tuple[Any, ...]]:
        return [entry[1:] for entry in self.log if entry[0] == kind]

    def push_user_histories(self, rows: list[UserHistoryFeatures]) -> None:  # the Feast store
        if self.push_failures:
            self.push_failures -= 1
            raise FeatureStoreError("database is locked")
        self.log.append(("push", rows))


def patch_io(worker: UserHistoryWorker, rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = worker.kafka
    changelog = worker.table.changelog_topic.get_topic_name()

    async def send_record(
        app: Any, topic: str, key: bytes | None, value: bytes, **kw: Any
    ) -> asyncio.Future[None]:
        if topic == kafka.training_topic:
            return rec.ack("sample", json.loads(value))
        if topic == kafka.dead_letter_topic:
            return rec.ack("dead_letter", value, kw["headers"])
        assert topic == changelog, topic
        return rec.ack("changelog", kw["partition"], json.loads(key or b""), json.loads(value))

    async def commit(app: Any, offsets: dict[Any, int]) -> bool:
        rec.log.append(("commit", {tp.partition: offset for tp, offset in offsets.items()}))
        return True

    async def seek(app: Any, tp: Any, offset: int) -> None:
        rec.log.append(("seek", tp.partition, offset))

    async def producer_started() -> None:
        return None

    monkeypatch.setattr(faust_compat, "send_record", send_record)
    monkeypatch.setattr(faust_compat, "commit_offsets", commit)
    monkeypatch.setattr(faust_compat, "seek_between_fetches", seek)
    monkeypatch.setattr(worker.app, "maybe_start_producer", producer_started)


Scenario = Callable[[Any, UserHistoryWorker, Recorder], Awaitable[None]]


def run_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: Scenario, **overrides: Any
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        kafka_events_topic=TOPIC,
        features_recent_len=2,
        features_long_len=3,
        **overrides,
    )
    rng = np.random.default_rng(0)
    codebook = ResidualCodebook.fit(rng.normal(size=(64, 8)), levels=2, size=4, iters=3)
    item_ids = np.arange(1, 65, dtype=np.int64)
    table = ItemCodeTable(item_ids, codebook.encode(rng.normal(size=(64, 8))), codebook.UNKNOWN)
    rec = Recorder()
    app, worker = create_app(settings, codebook, table, rec)  # type: ignore[arg-type]
    patch_io(worker, rec, monkeypatch)
    worker.on_failure = lambda what, exc: rec.failures.append(what)

    async def main() -> None:
        async with app.agents[AGENT_NAME].test_context() as agent:
            try:
                await scenario(agent, worker, rec)
            finally:
                rec.release()  # a stopping agent finishes its batch first: let it

    asyncio.run(main())


def event(user: int, item: int, kind: str = "play") -> bytes:
    return Event(
        event_id=uuid.uuid4(), user_id=user, item_id=item, event_type=kind, ts_ms=1000 + item
    ).to_json_bytes()


async def deliver(agent: Any, partition: int, offset: int, value: bytes) -> None:
    """Put one record on the agent's channel (not waiting for the agent to run)."""
    agent.sent_offset = offset
    await agent.put(value, key=b"k", partition=partition, wait=False)


async def until(condition: Callable[[], object], what: str, timeout_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_the_push_and_samples_are_acknowledged_before_the_table_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(agent: Any, worker: UserHistoryWorker, rec: Recorder) -> None:
        rec.hold = True
        await deliver(agent, 0, 0, event(1, 10))
        await deliver(agent, 0, 1, event(1, 11, "impression"))
        await deliver(agent, 0, 2, event(2, 20))
        await deliver(agent, 1, 0, event(3, 30, "rating"))
        await until(lambda: rec.entries("push") and len(rec.held) >= 3, "push and samples")
        for _ in range(100):  # the worker could move on now, if it did not wait for the acks
            await asyncio.sleep(0)
        assert "changelog" not in rec.kinds()
        rec.release()
        await until(lambda: rec.entries("commit"), "the commit")

        assert worker.counters.batches == 1  # the four records were waiting: one batch
        kinds = rec.kinds()
        assert kinds.index("changelog") > max(kinds.index("push"), 2)  # after the 3 samples
        assert kinds[-1] == "commit" and rec.entries("commit") == [({0: 3, 1: 1},)]
        writes = rec.entries("changelog")
        user_1 = {"items": [10], "count": 1, "last_offset": 1, "last_ts_ms": 1010}
        assert writes[0] == (0, 1, user_1)  # the impression moved the offset only
        assert (0, -1, {"applied": 2}) in writes and (1, -2, {"applied": 0}) in writes
        for partition in (0, 1):  # a partition's position after its users' states
            mine = [key for p, key, _ in writes if p == partition]
            assert mine[-1] == -1 - partition and min(mine[:-1]) >= 0
        assert worker.table.data[1] == user_1
        (rows,) = rec.entries("push")
        assert [(r.user_id, r.recent_item_ids, r.history_len) for r in rows[0]] == [
            (1, [10], 1), (2, [20], 1), (3, [30], 1),
        ]  # fmt: skip
        samples = [s for (s,) in rec.entries("sample")]
        assert [(s["user_id"], s["item_id"], s["seq"]) for s in samples] == [
            (1, 10, 0), (2, 20, 0), (3, 30, 0),
        ]  # fmt: skip

    run_agent(tmp_path, monkeypatch, scenario)


def test_bad_records_redeliveries_and_gaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(agent: Any, worker: UserHistoryWorker, rec: Recorder) -> None:
        def committed() -> list[dict[int, int]]:
            return [offsets for (offsets,) in rec.entries("commit")]

        await deliver(agent, 0, 0, event(1, 1))
        await deliver(agent, 0, 1, b"not json")
        await deliver(agent, 0, 2, event(1, 2))
        await until(lambda: committed() == [{0: 3}], "the first commit")
        ((value, headers),) = rec.entries("dead_letter")
        assert value == b"not json" and headers["reason"] == b"malformed_json"
        assert headers["source"] == f"{TOPIC}/0/1".encode()

        for offset, value in ((1, b"not json"), (2, event(1, 2)), (3, event(1, 3))):
            await deliver(agent, 0, offset, value)  # two redeliveries, one new event
        await until(lambda: len(committed()) == 2, "the second commit")
        assert committed()[-1] == {0: 4} and len(rec.entries("dead_letter")) == 1
        assert worker.table.data[1]["items"] == [1, 2, 3]
        assert worker.counters.redeliveries == 2

        await deliver(agent, 0, 6, event(1, 6))  # 4 and 5 skipped
        await until(lambda: rec.entries("seek"), "the seek back")
        assert rec.entries("seek") == [(0, 4)] and len(committed()) == 2
        for offset in (4, 5, 6):
            await deliver(agent, 0, offset, event(1, offset))
        await until(lambda: len(committed()) == 3, "the third commit")
        assert committed()[-1] == {0: 7}
        assert worker.table.data[1]["items"] == [4, 5, 6]  # long_len 3
        assert worker.table.data[1]["count"] == 6

    run_agent(tmp_path, monkeypatch, scenario)


def test_a_push_that_keeps_failing_ends_the_batch_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(agent: Any, worker: UserHistoryWorker, rec: Recorder) -> None:
        rec.push_failures = 2
        await deliver(agent, 0, 0, event(1, 1))
        await until(lambda: rec.failures, "the batch to fail")
        assert rec.failures == ["a batch of 1 records failed"]
        assert worker.counters.push_retries == 1
        assert not {"changelog", "commit"} & set(rec.kinds())
        assert 1 not in worker.table.data

    run_agent(tmp_path, monkeypatch, scenario, worker_push_attempts=2)
