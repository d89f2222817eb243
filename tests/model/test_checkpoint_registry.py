"""The registry's publish protocol: readers only ever see complete versions."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from core.errors import DataError, TrainerError
from model.checkpoint_registry import CheckpointRegistry, PublishedVersion
from tests.conftest import wait_until

PAYLOAD_BYTES = 2 * 2**20


def _writer(number: int) -> Any:
    def write(folder: Path) -> dict[str, Any]:
        # Several megabytes written in pieces, so a reader racing the writer would see a
        # truncated file if the protocol let it.
        blob = hashlib.sha256(str(number).encode()).digest() * (PAYLOAD_BYTES // 32)
        with open(folder / "model.pt", "wb") as handle:
            for start in range(0, len(blob), 65536):
                handle.write(blob[start : start + 65536])
        return {"samples_seen": number, "sha256": hashlib.sha256(blob).hexdigest()}

    return write


def _check(published: PublishedVersion) -> int:
    data = (published.path / "model.pt").read_bytes()
    if hashlib.sha256(data).hexdigest() != published.metadata["sha256"]:
        raise AssertionError(f"{published.version}: model.pt does not match its metadata")
    return int(published.metadata["samples_seen"])


def test_publish_moves_latest_and_prunes_old_versions(tmp_path: Path) -> None:
    store = CheckpointRegistry(tmp_path)
    assert store.latest("sasrec") is None
    for number in range(1, 6):
        published = store.publish("sasrec", _writer(number), keep=3)
        assert published.version == f"v{number:06d}"
    assert store.latest_version("sasrec") == "v000005"
    assert store.versions("sasrec") == ["v000003", "v000004", "v000005"]
    latest = store.latest("sasrec")
    assert latest is not None and _check(latest) == 5
    assert latest.metadata["model"] == "sasrec" and latest.metadata["published_at_ms"] > 0
    assert store.models() == ["sasrec"]
    with pytest.raises(DataError, match="must match"):
        store.model_dir("../etc")


def test_reader_never_loads_a_half_written_version(tmp_path: Path) -> None:
    store = CheckpointRegistry(tmp_path)
    store.publish("hymirec", _writer(0), keep=2)
    done = threading.Event()
    seen: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def read(mine: list[int]) -> None:
        reader = CheckpointRegistry(tmp_path)
        while not done.is_set():
            try:
                loaded = reader.open_latest("hymirec", _check)
                assert loaded is not None
                mine.append(loaded[1])
            except BaseException as exc:  # every failure is a test failure
                errors.append(exc)
                return

    readers = [threading.Thread(target=read, args=(mine,)) for mine in seen]
    for thread in readers:
        thread.start()
    for number in range(1, 41):
        store.publish("hymirec", _writer(number), keep=2)
    done.set()
    for thread in readers:
        thread.join()
    assert not errors, errors[0]
    for mine in seen:
        assert len(mine) > 5
        assert mine == sorted(mine)  # a reader never goes back to an older version
    assert max(max(mine) for mine in seen) >= 1


def _publish_forever(root: str) -> None:
    store = CheckpointRegistry(Path(root))
    number = 100
    while True:
        number += 1
        store.publish("sasrec", _writer(number), keep=3)


def test_publisher_killed_mid_write_leaves_latest_complete(tmp_path: Path) -> None:
    store = CheckpointRegistry(tmp_path)
    store.publish("sasrec", _writer(1), keep=3)
    context = multiprocessing.get_context("spawn")
    for _ in range(3):
        process = context.Process(target=_publish_forever, args=(str(tmp_path),))
        process.start()
        first = store.latest_version("sasrec")

        def moved(first: str | None = first) -> bool:
            return store.latest_version("sasrec") != first

        wait_until(moved, 60, "a new version from the publisher process")
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        latest = store.latest("sasrec")
        assert latest is not None
        _check(latest)
    # The next publish removes what the killed publishers left behind.
    store.publish("sasrec", _writer(999), keep=3)
    leftovers = [p.name for p in (tmp_path / "sasrec").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []
    latest = store.latest("sasrec")
    assert latest is not None and latest.metadata["samples_seen"] == 999
    on_disk = json.loads((latest.path / "metadata.json").read_text())
    assert on_disk == latest.metadata


def _hold_lock(root: str, ready: Any) -> None:
    with CheckpointRegistry(Path(root)).lock():
        ready.set()
        threading.Event().wait()


def test_one_trainer_per_registry_and_the_lock_dies_with_its_owner(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready))
    holder.start()
    assert ready.wait(60)
    with (
        pytest.raises(TrainerError, match=f"pid {holder.pid}"),
        CheckpointRegistry(tmp_path).lock(),
    ):
        pass
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    with CheckpointRegistry(tmp_path).lock():
        pass
