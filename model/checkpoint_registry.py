"""The checkpoint registry: ``model_registry/<model>/<version>/``, a ``LATEST`` pointer, pruning.

A version is written into a hidden temporary folder beside its final place, every file and the
folder are fsynced, and the folder is renamed into place (``rename`` of a directory is atomic on
POSIX); only then is ``LATEST`` replaced, itself through a temporary file and ``os.replace``. So
a reader that follows ``LATEST`` sees either the previous complete version or the new complete
one, never a half-written folder. Old versions are pruned after the pointer moves; a reader that
lost the race with pruning (it read ``LATEST``, then the folder vanished) reads ``LATEST`` again.

One trainer owns a registry at a time: :meth:`CheckpointRegistry.lock` takes an exclusive
``flock`` on ``<root>/.trainer.lock``, which the kernel releases when the process dies, even by
SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import DataError, TrainerError
from core.process import pid_alive

__all__ = ["REGISTRY_FORMAT", "CheckpointRegistry", "PublishedVersion"]

REGISTRY_FORMAT = "hymirec-registry/1"
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_VERSION = re.compile(r"^v(\d{6,})$")
_TEMP_PREFIX = ".tmp-"
METADATA_FILE = "metadata.json"
LATEST_FILE = "LATEST"


@dataclass(frozen=True)
class PublishedVersion:
    """One complete version on disk and its metadata."""

    model: str
    version: str
    path: Path
    metadata: dict[str, Any]

    @property
    def number(self) -> int:
        return _version_number(self.version)


def _version_number(version: str) -> int:
    match = _VERSION.match(version)
    if match is None:
        raise DataError(f"{version!r} is not a version name (expected v000001, v000002, ...)")
    return int(match.group(1))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointRegistry:
    """Versioned model folders under ``root``; see the module docstring for the protocol."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_dir(self, model: str) -> Path:
        if not _MODEL_NAME.match(model):
            raise DataError(f"model name {model!r} must match {_MODEL_NAME.pattern}")
        return self.root / model

    def models(self) -> list[str]:
        """Every model that has a published version."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if _MODEL_NAME.match(p.name) and (p / LATEST_FILE).is_file()
        )

    def versions(self, model: str) -> list[str]:
        """Complete versions of ``model`` on disk, oldest first."""
        folder = self.model_dir(model)
        if not folder.is_dir():
            return []
        names = [p.name for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name)]
        return sorted(names, key=_version_number)

    def latest_version(self, model: str) -> str | None:
        """The version ``LATEST`` names, or None before the first publish."""
        try:
            text = (self.model_dir(model) / LATEST_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        _version_number(text)
        return text

    def read(self, model: str, version: str) -> PublishedVersion:
        """A version's metadata (DataError if the folder or its metadata is missing)."""
        _version_number(version)
        path = self.model_dir(model) / version
        try:
            metadata = json.loads((path / METADATA_FILE).read_text())
        except FileNotFoundError as exc:
            raise DataError(f"{model} {version} is not in the registry at {self.root}") from exc
        except json.JSONDecodeError as exc:
            raise DataError(f"{path / METADATA_FILE} is not valid JSON: {exc}") from exc
        if metadata.get("format") != REGISTRY_FORMAT:
            raise DataError(f"{path} is not a {REGISTRY_FORMAT} version")
        return PublishedVersion(model=model, version=version, path=path, metadata=metadata)

    def latest(self, model: str, attempts: int = 5) -> PublishedVersion | None:
        """The version ``LATEST`` names; re-reads the pointer if pruning removed it meanwhile."""
        for _ in range(attempts):
            version = self.latest_version(model)
            if version is None:
                return None
            try:
                return self.read(model, version)
            except DataError:
                if self.latest_version(model) == version:
                    raise
        raise DataError(f"{model}: LATEST kept moving to pruned versions; try again")

    def open_latest(
        self, model: str, load: Callable[[PublishedVersion], Any], attempts: int = 5
    ) -> tuple[PublishedVersion, Any] | None:
        """Load the latest version with ``load``; retry when the version is pruned mid-load."""
        for _ in range(attempts):
            published = self.latest(model)
            if published is None:
                return None
            try:
                return published, load(published)
            except (FileNotFoundError, DataError):
                if self.latest_version(model) == published.version and published.path.is_dir():
                    raise
        raise DataError(f"{model}: versions were pruned faster than they could be loaded")

    def publish(
        self,
        model: str,
        write: Callable[[Path], dict[str, Any]],
        keep: int,
    ) -> PublishedVersion:
        """Write a new version with ``write(folder) -> metadata`` and make it ``LATEST``.

        ``write`` puts the files into the (temporary) folder and returns the metadata, which is
        stored as ``metadata.json`` with the model, version and publish time added.
        """
        folder = self.model_dir(model)
        folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries(folder)
        existing = self.versions(model)
        number = _version_number(existing[-1]) + 1 if existing else 1
        version = f"v{number:06d}"
        temp = folder / f"{_TEMP_PREFIX}{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temp.mkdir()
        try:
            metadata = dict(write(temp))
            metadata.update(
                format=REGISTRY_FORMAT,
                model=model,
                version=version,
                published_at_ms=int(time.time() * 1000),
            )
            (temp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
            for item in temp.iterdir():
                _fsync_path(item)
            _fsync_path(temp)
            os.rename(temp, folder / version)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        pointer = folder / f"{_TEMP_PREFIX}{LATEST_FILE}-{os.getpid()}"
        pointer.write_text(version + "\n")
        _fsync_path(pointer)
        os.replace(pointer, folder / LATEST_FILE)
        _fsync_path(folder)
        self.prune(model, keep)
        return PublishedVersion(model, version, folder / version, metadata)

    def prune(self, model: str, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions (never the one ``LATEST`` names)."""
        if keep < 1:
            raise DataError("keep must be >= 1")
        latest = self.latest_version(model)
        versions = self.versions(model)
        removed = []
        for version in versions[: max(0, len(versions) - keep)]:
            if version == latest:
                continue
            shutil.rmtree(self.model_dir(model) / version, ignore_errors=True)
            removed.append(version)
        return removed

    @staticmethod
    def _remove_stale_temporaries(folder: Path) -> None:
        """Folders a crashed publisher left behind (its pid is gone)."""
        for item in folder.iterdir():
            if not item.name.startswith(_TEMP_PREFIX):
                continue
            parts = item.name.split("-")
            pid = next((int(p) for p in parts[2:3] if p.isdigit()), None)
            if pid is None or pid == os.getpid() or not pid_alive(pid):
                if item.is_dir():
                    shutil.rmtree(item, ignore_errors=True)
                else:
                    item.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive ownership of the registry for one trainer (TrainerError if taken)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".trainer.lock"
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                raise TrainerError(
                    f"another trainer (pid {owner}) owns the registry at {self.root}; "
                    "run one trainer per registry"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
