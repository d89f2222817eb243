"""The production stack's files (docker/compose.yaml and the Dockerfiles) as the tests read them:
the services, their environment with Compose's variable substitution, and the settings object
each service builds from it. Shared by tests/test_docker.py and
tests/integration/test_docker_startup.py."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from core.settings import Settings
from tests.conftest import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker" / "compose.yaml"
DOCKERFILES = [REPO_ROOT / "docker" / "Dockerfile", REPO_ROOT / "docker" / "Dockerfile.gpu"]
DCLINT = REPO_ROOT / ".tools" / "dclint" / "node_modules" / ".bin" / "dclint"
HADOLINT = Path(sys.executable).parent / "hadolint"
# What a deployment puts in docker/.env; any value will do for the checks.
COMPOSE_VARIABLES = {"CLICKHOUSE_PASSWORD": "test-password"}
APP_DIR = "/app"  # where the Dockerfiles put the repository


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's variable substitution: ``$$``, ``${X}``, ``${X:-default}``, ``${X:?error}``."""

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        value = variables.get(name, "")
        if op == ":?" and not value:
            raise ValueError(f"{name} is required: {arg}")
        return value if value or op != ":-" else arg

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", repl, value)


@functools.cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())  # merges the << anchors
    return loaded


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def environment(service: str) -> dict[str, str]:
    raw = services()[service].get("environment") or {}
    return {k: interpolate(str(v), COMPOSE_VARIABLES) for k, v in raw.items()}


def hymirec_env(service: str) -> dict[str, str]:
    """The HYMIREC_* variables a service's settings object reads: the image's ENV, then the
    service's environment (which overrides it)."""
    dockerfile = dockerfile_of(service)
    image_env = dict(re.findall(r"\b(HYMIREC_[A-Z0-9_]+)=(\S+)", dockerfile.read_text()))
    return {
        **image_env,
        **{k: v for k, v in environment(service).items() if k.startswith("HYMIREC_")},
    }


class _ServiceSettings(Settings):
    """The settings object, reading only what it is given (not this machine's environment)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def settings_of(service: str, **overrides: Any) -> Settings:
    """The settings the service builds at start-up. Built from keyword arguments so that the
    settings' ``extra="forbid"`` rejects a misspelt name (pydantic-settings ignores unknown
    HYMIREC_* environment variables)."""
    values = {k.removeprefix("HYMIREC_").lower(): v for k, v in hymirec_env(service).items()}
    return _ServiceSettings(**{**values, **overrides})


def dockerfile_of(service: str) -> Path:
    build = services()[service].get("build") or {"dockerfile": "docker/Dockerfile"}
    return (
        COMPOSE_FILE.parent / str(build.get("context", "..")) / str(build["dockerfile"])
    ).resolve()


def command(service: str) -> list[str]:
    cmd = services()[service].get("command") or []
    assert isinstance(cmd, list), f"{service}: write the command as a list (exec form)"
    return [str(part) for part in cmd]


def hymirec_services() -> list[str]:
    return sorted(s for s in services() if command(s)[:1] == ["hymirec"])


def long_running(service: str) -> bool:
    return str(services()[service].get("restart", "no")) != "no"


def run_tool(
    args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root; ``env`` adds to this process's environment."""
    return subprocess.run(
        args,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
