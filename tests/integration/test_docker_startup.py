"""Every service's command in docker/compose.yaml starts in the embedded mode: the session broker
stands in for Kafka, chdb for ClickHouse, Feast's SQLite store for Redis, the CPU for the GPU.

STARTUP_PROBES is the table: one row per compose service whose `hymirec` command exists, with
the probe that says it is up. PENDING_COMMANDS lists the services whose command is not in
`hymirec --help` yet; a check keeps the two in step with the compose file.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings, setting_names
from hymirec.processes import ServiceProcess
from tests.conftest import free_port, wait_until
from tests.docker_stack import (
    command,
    environment,
    hymirec_services,
    run_tool,
    services,
    settings_of,
)


@dataclass(frozen=True)
class Running:
    service: str
    process: ServiceProcess
    settings: Settings


@dataclass(frozen=True)
class Startup:
    """How to tell that a service's command is up: ``ready`` is polled until it holds. A one-shot
    command is up when it has exited 0. ``after`` names services whose commands run first."""

    ready: Callable[[Running], bool]
    one_shot: bool = False
    after: tuple[str, ...] = ()
    fails_on: str = ""  # a log line that means it will not come up: stop waiting


def healthcheck_passes(run: Running) -> bool:
    """The service's own compose healthcheck, aimed at the port the embedded process listens on."""
    argv = [str(a) for a in services()[run.service]["healthcheck"]["test"]]
    for key, value in environment(run.service).items():
        if key.endswith("_PORT"):
            port = run.settings.flat()[key.removeprefix("HYMIREC_").lower()]
            argv = [a.replace(f"127.0.0.1:{value}", f"127.0.0.1:{port}") for a in argv]
    if argv[0] == "CMD-SHELL":
        argv = ["sh", "-c", argv[1]]
    else:
        argv = [sys.executable if a == "python" else a for a in argv[1:]]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


def log_says(text: str) -> Callable[[Running], bool]:
    return lambda run: text in run.process.tail(400)


def file_written(path: Callable[[Settings], Path]) -> Callable[[Running], bool]:
    return lambda run: path(run.settings).is_file()


def exited_cleanly(run: Running) -> bool:
    return not run.process.alive() and run.process.stop() == 0


# One row per service whose `hymirec` command exists; add the pending ones here as they land.
STARTUP_PROBES: dict[str, Startup] = {
    "dashboard": Startup(healthcheck_passes),
    "features-init": Startup(exited_cleanly, one_shot=True),
    "recommender": Startup(healthcheck_passes, after=("features-init",)),
    "simulator": Startup(log_says("requests/s"), after=("features-init", "recommender")),
    "readout-publisher": Startup(
        file_written(lambda s: s.readouts_dir / "_pipeline.json"), fails_on="publish failed"
    ),
    "sink": Startup(log_says("sink assigned")),
    "trainer": Startup(log_says("trainer ready"), after=("features-init",)),
    "worker": Startup(healthcheck_passes, after=("features-init",)),
}
# Compose services whose command is not in `hymirec --help` yet (being written), or that need a
# pending one to start (the simulator needs the recommendation service).
PENDING_COMMANDS: dict[str, str] = {}
# Compose services that are replicas of a probed one: the same command and environment but for
# their own instance id, so the original's start-up probe covers them (README: "Scaling out").
REPLICAS: dict[str, str] = {"worker-1": "worker", "worker-2": "worker"}
INSTANCE_IDS = {"HYMIREC_WORKER_INSTANCE_ID", "HYMIREC_SINK_INSTANCE_ID"}


@functools.cache
def cli_help(*args: str) -> str:
    result = run_tool([sys.executable, "-m", "hymirec.cli", *args, "--help"])
    return result.stdout if result.returncode == 0 else ""


def missing_from_cli(args: list[str]) -> str | None:
    """Why ``hymirec <args>`` would not parse today, or None."""
    choices = re.search(r"\{([\w,-]+)\}", cli_help())
    assert choices, cli_help()
    if args[0] not in choices.group(1).split(","):
        return f"`hymirec {args[0]}` is not a command (hymirec --help: {choices.group(0)})"
    for arg in args[1:]:
        if not re.search(rf"(?<![\w-]){re.escape(arg)}(?![\w-])", cli_help(args[0])):
            return f"`{arg}` is not in `hymirec {args[0]} --help`"
    return None


# What differs between the stack and the embedded mode: endpoints, listening addresses, device.
EMBEDDED_FIELDS = {
    "data_dir",
    "kafka_bootstrap",
    "clickhouse_dsn",
    "features_store_config",
    "features_redis_url",
}
EMBEDDED_FIELDS |= {
    "serve_host",
    "dashboard_host",
    "trainer_device",
    "kafka_empty_fetch_backoff_ms",
}


# Settings every service of one stack shares: its data folder (features-init writes the feature
# repository the others read), its topics and its worker's app id.
SHARED_FIELDS = (
    "data_dir",
    "kafka_events_topic",
    "kafka_dead_letter_topic",
    "kafka_training_topic",
    "worker_app_id",
)
# chdb lets one process own a ClickHouse folder: in the stack both talk to one server, here each
# gets a data folder of its own (neither reads the feature repository).
OWN_DATA_DIR = {"sink", "readout-publisher"}


def flat_set(settings: Settings) -> dict[str, Any]:
    """The settings the compose file sets explicitly, by flat name."""
    values: dict[str, Any] = {}
    for name, value in settings.model_dump(exclude_unset=True).items():
        if isinstance(value, dict):
            values |= {f"{name}_{k}": v for k, v in value.items()}
        else:
            values[name] = value
    return values


def embedded_settings(
    service: str, make_settings: Callable[..., Settings], stack: Settings, tmp_path: Path
) -> Settings:
    """The service's own settings from the compose file, with embedded endpoints, free ports,
    consumer groups of its own on the session broker, and the stack's shared fields."""
    production = flat_set(settings_of(service))
    values = {k: v for k, v in production.items() if k not in EMBEDDED_FIELDS}
    fields = [f for f, _ in setting_names() if f != "broker_port"]
    values |= {f: free_port() for f in fields if f.endswith("_port")}
    values |= {f: f"{f}-{uuid.uuid4().hex[:8]}" for f in fields if f.endswith("_group_id")}
    values |= {f: stack.flat()[f] for f in SHARED_FIELDS}
    if service in OWN_DATA_DIR:
        values["data_dir"] = tmp_path / service
    return make_settings(**values)


def start(service: str, settings: Settings) -> Running:
    args = command(service)
    assert args[0] == "hymirec", f"{service}: {args}"
    if (missing := missing_from_cli(args[1:])) is not None:
        pytest.fail(f"{service}: {missing}")
    return Running(service, ServiceProcess(service, args[1:], settings).start(), settings)


def waves(probes: dict[str, Startup]) -> list[list[str]]:
    """The services in start order, as compose starts them: each wave once every service its
    members wait for (``after``) is up."""
    order: list[list[str]] = []
    done: set[str] = set()
    while len(done) < len(probes):
        wave = sorted(s for s in probes if s not in done and set(probes[s].after) <= done)
        assert wave, f"a cycle in the start-up order: {sorted(set(probes) - done)}"
        order.append(wave)
        done |= set(wave)
    return order


def wait_ready(runs: list[Running]) -> None:
    """Wait until every run's probe holds (or it exited, or its log says it will not come up)."""

    def pending() -> list[Running]:
        return [run for run in runs if not settled(run)]

    def settled(run: Running) -> bool:
        probe = STARTUP_PROBES[run.service]
        if not run.process.alive() or (probe.fails_on and probe.fails_on in run.process.tail()):
            return True
        return not probe.one_shot and probe.ready(run)

    try:
        wait_until(lambda: not pending(), 240, "the services to be up", every_s=0.5)
    except pytest.fail.Exception as exc:
        late = "\n".join(f"{run.service}:\n{run.process.tail()}" for run in pending())
        pytest.fail(f"{exc}; still not up:\n{late}")
    for run in runs:
        probe = STARTUP_PROBES[run.service]
        assert probe.one_shot or run.process.alive(), f"{run.service} exited:\n{run.process.tail()}"
        assert probe.ready(run), f"{run.service} is not ready:\n{run.process.tail()}"


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_every_service_command_starts_in_the_embedded_mode(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The whole stack once, wave by wave as compose starts it; then each stops cleanly."""
    monkeypatch.chdir(tmp_path)  # Faust keeps its scratch folder in the working directory
    stack = make_settings()
    started: list[Running] = []
    try:
        for wave in waves(STARTUP_PROBES):
            runs = [
                start(name, embedded_settings(name, make_settings, stack, tmp_path))
                for name in wave
            ]
            started += runs
            wait_ready(runs)
        for run in reversed(started):
            assert run.process.stop() == 0, (
                f"{run.service} did not stop cleanly:\n{run.process.tail()}"
            )
    finally:
        for run in started:
            run.process.kill()


def test_every_hymirec_service_has_a_startup_probe_or_is_pending() -> None:
    in_compose = {s: " ".join(command(s)) for s in hymirec_services()}
    assert not set(STARTUP_PROBES) & set(PENDING_COMMANDS)
    assert set(in_compose) == set(STARTUP_PROBES) | set(PENDING_COMMANDS) | set(REPLICAS), (
        "every compose service that runs `hymirec` needs a STARTUP_PROBES row, a "
        "PENDING_COMMANDS entry or a REPLICAS entry"
    )
    for replica, original in REPLICAS.items():
        assert original in STARTUP_PROBES and in_compose[replica] == in_compose[original]
        mine, theirs = environment(replica), environment(original)
        differs = {k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
        assert differs and differs <= INSTANCE_IDS, f"{replica} differs from {original}: {differs}"
    for service, cmd in PENDING_COMMANDS.items():
        assert in_compose[service] == cmd, f"{service}: compose runs `{in_compose[service]}`"
        # A command that exists can still wait for a pending one it needs to start.
        waits_for = [d for d in services()[service].get("depends_on", {}) if d in PENDING_COMMANDS]
        if missing_from_cli(cmd.split()[1:]) is None and not waits_for:
            pytest.fail(
                f"`{cmd}` exists now: move {service} from PENDING_COMMANDS to STARTUP_PROBES "
                "with its readiness probe"
            )
