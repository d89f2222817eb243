"""The one settings object, built once at the edge (CLI, service start-up) and passed down.

Every field can be set from an environment variable with the ``HYMIREC_`` prefix
(``HYMIREC_KAFKA_BOOTSTRAP=kafka:9092``); the defaults are the embedded mode (local broker,
Feast local provider, in-process ClickHouse) so that a laptop or CI needs no Docker.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hymirec.errors import ConfigError

__all__ = ["Settings", "load_settings"]

FEATURE_REPO_DIR = Path(__file__).resolve().parent.parent / "features" / "feature_repo"


class Settings(BaseSettings):
    """Endpoints, paths and pipeline knobs; embedded defaults."""

    model_config = SettingsConfigDict(env_prefix="HYMIREC_", frozen=True, extra="forbid")

    data_dir: Path = Field(Path(".hymirec"), description="Root of every local data folder.")
    cache_dir: Path | None = Field(None, description="Derived-data cache; default <data_dir>/cache")

    # Event log (Kafka protocol).
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(19092, ge=1, le=65535, description="Port of the embedded broker.")
    kafka_bootstrap: str = Field("", description="host:port list; empty means the embedded broker.")
    events_topic: str = "events"
    dead_letter_topic: str = "events-dead-letter"
    training_topic: str = "training-samples"
    topic_partitions: int = Field(4, ge=1, le=256)
    max_event_bytes: int = Field(
        64 * 1024, ge=1024, description="Larger payloads are dead-lettered."
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024 * 1024, description="Largest record the clients move."
    )

    # Stream processing.
    faust_app_id: str = "hymirec-features"
    worker_web_port: int = Field(6066, ge=1, le=65535)
    stream_batch_size: int = Field(1000, ge=1, le=100_000)
    stream_batch_window_s: float = Field(0.2, gt=0, le=60)
    worker_instance_id: str = Field(
        "worker-0", min_length=1, max_length=100, description="Stable, unique per worker replica"
    )
    worker_session_timeout_s: float = Field(10.0, ge=2, le=300)
    worker_max_poll_interval_s: float = Field(120.0, ge=10, le=3600)

    # User history features.
    recent_len: int = Field(50, ge=1, le=10_000, description="R: recent item ids kept verbatim.")
    long_len: int = Field(1000, ge=1, le=100_000, description="P: long history, kept as codes.")

    # Residual cosine codebook and item text embeddings.
    codebook_levels: int = Field(3, ge=1, le=16)
    codebook_size: int = Field(255, ge=2, le=65_535, description="255 keeps codes in one byte")
    codebook_seed: int = 0
    embedding_batch_size: int = Field(128, ge=1)

    # Feature store: a feature_store.yaml whose ${HYMIREC_*} placeholders are filled from here.
    feast_config: Path = FEATURE_REPO_DIR / "feature_store.yaml"
    redis_url: str = "localhost:6379"

    # Analytics.
    clickhouse_dsn: str = Field("", description="empty means chdb:///<data_dir>/clickhouse")
    sink_group_id: str = Field(
        "hymirec-clickhouse-sink", min_length=1, description="Consumer group of the event sink."
    )
    sink_batch_size: int = Field(
        5000, ge=1, le=1_000_000, description="Events per insert, at most."
    )
    sink_batch_window_s: float = Field(
        1.0, gt=0, le=300, description="Longest wait before a partial batch is inserted."
    )
    cuped_pre_days: int = Field(
        14, ge=1, le=365, description="Days before first exposure counted as the CUPED covariate."
    )

    @model_validator(mode="after")
    def _fill_derived(self) -> Settings:
        if not self.kafka_bootstrap:
            object.__setattr__(self, "kafka_bootstrap", f"{self.broker_host}:{self.broker_port}")
        if not self.clickhouse_dsn:
            object.__setattr__(self, "clickhouse_dsn", f"chdb:///{self.clickhouse_dir}")
        if self.recent_len > self.long_len:
            raise ValueError(
                f"recent_len ({self.recent_len}) must not exceed long_len ({self.long_len})"
            )
        return self

    @property
    def broker_dir(self) -> Path:
        return self.data_dir.resolve() / "broker"

    @property
    def feast_dir(self) -> Path:
        return self.data_dir.resolve() / "feast"

    @property
    def embedding_cache_dir(self) -> Path:
        return (self.cache_dir or self.data_dir / "cache").resolve()

    @property
    def codebook_dir(self) -> Path:
        return self.data_dir.resolve() / "codebook"

    @property
    def clickhouse_dir(self) -> Path:
        return self.data_dir.resolve() / "clickhouse"

    def placeholders(self) -> dict[str, str]:
        """``HYMIREC_<FIELD>`` -> value, for filling ``${...}`` in config templates."""
        values: dict[str, Any] = self.model_dump()
        values["data_dir"] = self.data_dir.resolve()
        values["cache_dir"] = self.embedding_cache_dir
        return {f"HYMIREC_{k.upper()}": str(v) for k, v in values.items() if v is not None}

    def fill_template(self, text: str) -> str:
        """Replace ``${HYMIREC_X}`` with the setting X; an unknown name is an error."""
        known = self.placeholders()

        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in known:
                raise ConfigError(f"unknown placeholder ${{{name}}}; known: {sorted(known)}")
            return known[name]

        return re.sub(r"\$\{(HYMIREC_[A-Z0-9_]+)\}", repl, text)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment (plus explicit overrides), with a clear error."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"HYMIREC_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
