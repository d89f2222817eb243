"""The embedded Kafka-protocol broker: a real broker process that the CLI starts and stops.

It runs ``noida-db`` (a single binary shipped in a PyPI wheel) with only its Kafka service. The
process is detached from the CLI, its pid is kept in ``<broker_dir>/broker.pid``, its output goes
to ``<broker_dir>/broker.log`` and its data to ``<broker_dir>/data``. noida-db keeps the log in
memory and saves it to the data folder about once a second and when it stops (SIGTERM); a SIGKILL
loses what was acknowledged since the last save (up to ~1 s; benchmarks/RESULTS.md, fault
injection). Production uses Apache Kafka (docker/), which replicates every acknowledged record.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import BrokerError
from core.process import pid_alive

__all__ = ["BrokerStatus", "LocalBroker"]


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    ready: bool
    pid: int | None
    address: str
    data_dir: Path


def _broker_binary() -> str:
    """The noida-db binary itself (not its Python wrapper, so that signals reach the broker)."""
    spec = importlib.util.find_spec("noida_db")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "noida-db"
        if binary.is_file():
            if not os.access(binary, os.X_OK):  # wheels do not always keep the exec bit
                binary.chmod(0o755)
            return str(binary)
    raise BrokerError("noida-db is not installed: run the README's set-up command")


def _pid_alive(pid: int) -> bool:
    """Our broker process is running: alive, a noida-db, not a zombie."""
    if not pid_alive(pid):
        return False
    try:  # a reaped pid may be reused: check it is still our broker
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    if b"noida-db" not in cmdline:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is not running


class LocalBroker:
    """Start, stop and probe one embedded broker bound to ``host:port``."""

    def __init__(self, broker_dir: Path, host: str = "127.0.0.1", port: int = 19092) -> None:
        self.broker_dir = broker_dir
        self.host = host
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None  # set when this object started it

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def _pid_file(self) -> Path:
        return self.broker_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.broker_dir / "broker.log"

    def _read_pid(self) -> int | None:
        try:
            pid = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def status(self) -> BrokerStatus:
        pid = self._read_pid()
        return BrokerStatus(
            running=pid is not None,
            ready=pid is not None and self.answers(),
            pid=pid,
            address=self.address,
            data_dir=self.broker_dir / "data",
        )

    def start(self, timeout_s: float = 30.0) -> BrokerStatus:
        """Start the broker unless it already runs, then wait until it answers Kafka requests."""
        if self._read_pid() is None:
            # A port that just closed can still answer for a moment (seen in CI right after a
            # stop: a connect to a local ephemeral-range port can meet itself); look again.
            deadline = time.monotonic() + 3.0
            while self._port_taken() and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._port_taken():
                raise BrokerError(
                    f"port {self.port} on {self.host} is already in use by another process; "
                    "set HYMIREC_BROKER_PORT to a free port"
                )
            (self.broker_dir / "data").mkdir(parents=True, exist_ok=True)
            command = [
                _broker_binary(), "start",
                "--data-dir", str(self.broker_dir / "data"),
                "--host", self.host,
                "--only", "kafka",
                "--kafka-port", str(self.port),
            ]  # fmt: skip
            with self.log_file.open("ab") as log:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives the CLI that started it
                )
            self._pid_file.write_text(str(process.pid))
            self._process = process
        self.wait_ready(timeout_s)
        return self.status()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Poll until the broker answers a Kafka metadata request, or raise BrokerError."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # Our own child may not have exec'd the binary yet, so ask it rather than /proc.
            exited = (
                self._process.poll() is not None
                if self._process is not None
                else self._read_pid() is None
            )
            if exited:
                raise BrokerError(f"the broker exited during start-up; see {self.log_file}")
            if self.answers():
                return
            time.sleep(0.1)
        raise BrokerError(
            f"the broker did not become ready in {timeout_s:.0f} s; see {self.log_file}"
        )

    def stop(self, timeout_s: float = 20.0) -> bool:
        """SIGTERM the broker (it saves its log) and wait; SIGKILL after the timeout."""
        pid = self._read_pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid) and time.monotonic() < deadline:
            self._reap(pid)
            time.sleep(0.05)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        self._reap(pid)
        self._pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """SIGKILL the broker: a crash, for fault tests."""
        pid = self._read_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            while _pid_alive(pid):
                self._reap(pid)
                time.sleep(0.02)
        self._pid_file.unlink(missing_ok=True)

    @staticmethod
    def _reap(pid: int) -> None:
        # Only succeeds when this process is the broker's parent (tests); harmless otherwise.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

    def _port_taken(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            return sock.connect_ex((self.host, self.port)) == 0

    def answers(self) -> bool:
        """Whether a Kafka-protocol broker (any, not only ours) answers at the address."""
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        if not self._port_taken():
            return False
        try:
            consumer = KafkaConsumer(bootstrap_servers=self.address, request_timeout_ms=2000)
        except KafkaError:
            return False
        try:
            consumer.topics()
            return True
        except KafkaError:
            return False
        finally:
            consumer.close()
