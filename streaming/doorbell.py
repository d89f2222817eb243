"""A doorbell on this host: producers ring it when the broker acknowledges their records, idle
consumers wait on it instead of polling the broker on a timer.

The embedded broker answers a fetch that finds nothing at once (``streaming.fetch_backoff``), so
an idle consumer must pause between fetches, and a record then waits for the pause to end: the
pause trades CPU at rest against the first record's latency. With the doorbell it does not have
to: a consumer in a pause wakes as soon as any producer of this host has had a record
acknowledged by the same broker, and fetches at once; the pause itself (its cap) only bounds the
wait when a record comes from a producer that does not ring (another host, another tool).

How: each waiting consumer binds a UDP socket on 127.0.0.1 and writes its port to a file in the
broker's doorbell directory (one per bootstrap address, under the system's temporary directory).
A ring is one datagram to every port listed there, at most one ring per ``RING_INTERVAL_S`` per
process: a consumer woken by a ring fetches again within milliseconds for a while (its pauses
restart from 1 ms), so a ring left out within that interval is not needed. A datagram that
arrives while the consumer is fetching stays queued, so no ring is lost between two waits.
Nothing here is needed for correctness: a lost ring only means waiting for the pause's cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

from core.process import pid_alive

__all__ = ["RING_INTERVAL_S", "DoorbellListener", "doorbell_dir", "register_ringer", "ring"]

RING_INTERVAL_S = 0.005
_PORTS_TTL_S = 0.5  # how long a ringer trusts its listing of the listeners' ports


def doorbell_dir(bootstrap: str | Sequence[str]) -> Path:
    """The doorbell directory of the broker at ``bootstrap`` (``host:port``, comma-separated or a
    list, with or without a ``kafka://`` scheme, as each client spells it: the same broker gives
    the same directory)."""
    items = bootstrap.split(",") if isinstance(bootstrap, str) else list(bootstrap)
    servers = sorted({re.sub(r"^[a-z]+://", "", str(i).strip()) for i in items} - {""})
    name = re.sub(r"[^A-Za-z0-9._-]", "_", ",".join(servers))[:120] or "default"
    return Path(tempfile.gettempdir()) / "hymirec-doorbell" / name


def _remove_dead(directory: Path) -> None:
    """Port files of processes that are gone (a SIGKILL leaves its file behind)."""
    for entry in os.scandir(directory):
        pid = entry.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


class DoorbellListener:
    """One consumer's end of the doorbell: a UDP socket whose port is listed in ``directory``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_dead(directory)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.setblocking(False)
        port = self._sock.getsockname()[1]
        self.path = directory / f"{os.getpid()}-{port}"
        scratch = directory / f".{self.path.name}.tmp"
        scratch.write_text(str(port))
        os.replace(scratch, self.path)  # ringers never read a half-written file
        self._finalizer = weakref.finalize(self, _close, self._sock, self.path)

    def _drain(self) -> bool:
        rang = False
        while True:
            try:
                self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return rang
            except OSError:  # closed under us
                return rang
            rang = True

    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s``; True when rung (now or since the last wait)."""
        if self._drain():
            return True
        try:
            ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout_s))
        except (OSError, ValueError):  # closed
            time.sleep(max(0.0, timeout_s))
            return False
        return bool(ready) and self._drain()

    async def wait_async(self, timeout_s: float) -> bool:
        """As :meth:`wait`, on the running event loop (cancellable)."""
        if self._drain():
            return True
        loop = asyncio.get_running_loop()
        rung: asyncio.Future[None] = loop.create_future()
        fd = self._sock.fileno()

        def readable() -> None:
            if not rung.done():
                rung.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(rung, max(0.0, timeout_s))
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)
        return self._drain()

    def close(self) -> None:
        self._finalizer()


def _close(sock: socket.socket, path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    sock.close()


class _Ringer:
    """This process's rings: which doorbells, when last rung, the ports last listed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.directories: set[Path] = set()
        self.last_ring = 0.0
        self.ports: list[int] = []
        self.listed_at = float("-inf")
        self.sock: socket.socket | None = None

    def _listed_ports(self, now: float) -> list[int]:
        if now - self.listed_at > _PORTS_TTL_S:
            ports = []
            for directory in self.directories:
                with contextlib.suppress(OSError):
                    names = [e.name for e in os.scandir(directory)]
                    ports += [int(n.split("-")[1]) for n in names if _is_port_file(n)]
            self.ports, self.listed_at = ports, now
        return self.ports

    def ring(self) -> int:
        now = time.monotonic()
        with self.lock:
            if not self.directories or now - self.last_ring < RING_INTERVAL_S:
                return 0
            self.last_ring = now
            ports = self._listed_ports(now)
            if self.sock is None:
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.sock.setblocking(False)
            sock = self.sock
        rung = 0
        for port in ports:
            with contextlib.suppress(OSError):  # a listener that just went away
                sock.sendto(b"!", ("127.0.0.1", port))
                rung += 1
        return rung


def _is_port_file(name: str) -> bool:
    pid, _, port = name.partition("-")
    return pid.isdigit() and port.isdigit()


_ringer = _Ringer()


def register_ringer(directory: Path) -> None:
    """From now on this process's :func:`ring` rings ``directory``'s doorbell too."""
    with _ringer.lock:
        _ringer.directories.add(directory)
        _ringer.listed_at = float("-inf")


def ring() -> int:
    """Ring every registered doorbell (rate-limited); the number of listeners rung."""
    return _ringer.ring()
