"""The one settings object, built once at the edge (CLI, service start-up) and passed down.

Every field can be set from an environment variable with the ``HYMIREC_`` prefix
(``HYMIREC_KAFKA_BOOTSTRAP=kafka:9092``); ``load_settings`` refuses a ``HYMIREC_`` variable that
names no field, so a typo fails at start-up instead of leaving the default. The defaults are the
embedded mode (local broker, Feast local provider, in-process ClickHouse) so that a laptop or CI
needs no Docker.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError

__all__ = ["ENV_PREFIX", "Settings", "load_settings", "unknown_environment"]

ENV_PREFIX = "HYMIREC_"

FEATURE_REPO_DIR = Path(__file__).resolve().parent.parent / "features" / "feature_repo"
EXPERIMENTS_FILE = Path(__file__).resolve().parent.parent / "abtest" / "experiments.yaml"


class Settings(BaseSettings):
    """Endpoints, paths and pipeline knobs; embedded defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    data_dir: Path = Field(Path(".hymirec"), description="Root of every local data folder.")
    cache_dir: Path | None = Field(None, description="Derived-data cache; default <data_dir>/cache")

    # Event log (Kafka protocol).
    broker_host: str = Field("127.0.0.1", description="Address the embedded broker listens on.")
    broker_port: int = Field(19092, ge=1, le=65535, description="Port of the embedded broker.")
    kafka_bootstrap: str = Field("", description="host:port list; empty means the embedded broker.")
    events_topic: str = Field(
        "events", description="Topic of impressions, clicks and plays (keyed by user)."
    )
    dead_letter_topic: str = Field(
        "events-dead-letter",
        description="Topic of records the worker or trainer could not use, with the reason.",
    )
    training_topic: str = Field(
        "training-samples",
        description="Topic of training samples the worker writes for the trainer.",
    )
    # Partitions are the unit of scale: each worker or sink replica owns some of them, so a
    # topic's count caps how many replicas share its work (README: "Scaling out").
    events_topic_partitions: int = Field(
        4,
        ge=1,
        le=256,
        description="Partitions of the events topic (and of the dead-letter topic and the "
        "worker's table changelog, which follow it): the most worker or sink replicas that "
        "share the events. Set it before the topic is first created.",
    )
    training_topic_partitions: int = Field(
        4,
        ge=1,
        le=256,
        description="Partitions of the training-samples topic (its readers are the trainers, one "
        "per checkpoint registry). Set it before the topic is first created.",
    )
    max_event_bytes: int = Field(
        64 * 1024, ge=1024, description="Larger payloads are dead-lettered."
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024 * 1024, description="Largest record the clients move."
    )
    kafka_empty_fetch_backoff_ms: int = Field(
        500,
        ge=0,
        le=1000,
        description="Longest pause of a consumer after fetches that found no records "
        "(streaming/fetch_backoff.py): the embedded broker answers them at once, so an idle "
        "consumer would spin. A pause ends early when a producer on this host rings the "
        "broker's doorbell (streaming/doorbell.py) after an acknowledgement; a record from a "
        "producer that does not ring waits up to about this long. "
        "0: off, for a broker that waits server-side (Apache Kafka: docker/compose.yaml).",
    )

    # Stream processing.
    faust_app_id: str = Field(
        "hymirec-features",
        description="Faust app id of the stream worker: its consumer group and table names.",
    )
    worker_web_port: int = Field(
        6066, ge=1, le=65535, description="Port of the Faust worker's web server (its health page)."
    )
    stream_batch_size: int = Field(
        1000, ge=1, le=100_000, description="Most events the worker applies in one batch."
    )
    worker_instance_id: str = Field(
        "worker-0", min_length=1, max_length=100, description="Stable, unique per worker replica"
    )
    worker_push_attempts: int = Field(
        5, ge=1, le=100, description="Feast push attempts per batch before the worker exits"
    )
    worker_session_timeout_s: float = Field(
        10.0,
        ge=2,
        le=300,
        description="Kafka group session timeout of the worker (heartbeat: a fifth of it).",
    )
    worker_fault_drop: str = Field(
        "",
        pattern=r"^([0-9]{1,6}:[0-9]{1,18}-[0-9]{1,18}(,[0-9]{1,6}:[0-9]{1,18}-[0-9]{1,18})*)?$",
        description="Fault injection, for tests only: 'P:A-B,...' makes the worker ignore "
        "offsets A..B of events partition P the first time they are delivered, as if the "
        "consumer had skipped them. Empty (no fault) by default.",
    )
    worker_max_poll_interval_s: float = Field(
        120.0,
        ge=10,
        le=3600,
        description="Longest the worker may take between two polls before it leaves its group.",
    )

    # User history features.
    recent_len: int = Field(50, ge=1, le=10_000, description="R: recent item ids kept verbatim.")
    long_len: int = Field(1000, ge=1, le=100_000, description="P: long history, kept as codes.")

    # Residual cosine codebook and item text embeddings.
    codebook_levels: int = Field(
        3, ge=1, le=16, description="Residual levels of the long-history codebook (bytes per item)."
    )
    codebook_size: int = Field(255, ge=2, le=65_535, description="255 keeps codes in one byte")
    codebook_seed: int = Field(0, description="Seed of the codebook's k-means fit.")
    embedding_batch_size: int = Field(
        128, ge=1, description="Item texts encoded per batch by the text embedding model."
    )

    # Feature store: a feature_store.yaml whose ${HYMIREC_*} placeholders are filled from here.
    feast_config: Path = Field(
        FEATURE_REPO_DIR / "feature_store.yaml",
        description="Feast feature_store.yaml (the embedded one; docker/ has the Redis one).",
    )
    redis_url: str = Field(
        "localhost:6379",
        description="Redis host:port for Feast's online store in the production yaml.",
    )

    # Analytics.
    clickhouse_dsn: str = Field("", description="empty means chdb:///<data_dir>/clickhouse")
    sink_group_id: str = Field(
        "hymirec-clickhouse-sink", min_length=1, description="Consumer group of the event sink."
    )
    sink_instance_id: str = Field(
        "sink-0",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Stable, unique per sink replica (static group membership)",
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

    # Incremental trainer, checkpoint registry (model/training/, model/checkpoint_registry.py).
    trainer_models: str = Field(
        "", description="Comma-separated model names; empty means the models the experiments serve."
    )
    trainer_group_id: str = Field(
        "hymirec-trainer", min_length=1, description="Kafka consumer group of the online trainer."
    )
    trainer_batch_size: int = Field(256, ge=1, le=100_000, description="Samples per micro-batch.")
    trainer_replay_ratio: float = Field(
        1.0, ge=0, le=64, description="Replayed examples per new example in a training step."
    )
    trainer_publish_every_samples: int = Field(
        5000, ge=1, description="The trainer publishes a version after this many new samples..."
    )
    trainer_publish_every_s: float = Field(
        30.0,
        gt=0,
        le=86_400,
        description="...or after this many seconds with new samples, whichever comes first.",
    )
    trainer_keep_versions: int = Field(5, ge=2, le=10_000, description="Versions kept per model.")
    trainer_device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (CUDA when there is a GPU), cpu, cuda or cuda:N.",
    )
    trainer_lr: float = Field(
        1e-3, gt=0, le=1, description="Learning rate of the online trainer's optimiser."
    )
    trainer_threads: int = Field(
        0, ge=0, le=1024, description="Torch threads of the trainer; 0: one per usable CPU."
    )
    trainer_seed: int = Field(
        0, description="Seed of the online trainer (replay sampling, prequential probes)."
    )
    trainer_max_item_id: int = Field(
        1_000_000, ge=1, description="Larger item ids are refused (they would grow the tables)."
    )

    # Experiments and the recommendation service.
    experiments_file: Path = Field(
        EXPERIMENTS_FILE, description="YAML file with the experiments, layers and holdout."
    )
    serve_host: str = Field(
        "127.0.0.1", description="Address the recommendation service listens on."
    )
    serve_port: int = Field(8000, ge=1, le=65535, description="Port of the recommendation service.")
    serve_max_inflight: int = Field(
        8,
        ge=1,
        le=100_000,
        description="Requests in progress beyond this get a 503. A few times the ranking "
        "threads, so an accepted request waits behind few others.",
    )
    serve_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="Threads that rank requests, first come first served; 0: one per CPU the "
        "service may run on. Ranking is CPU-bound: more threads than CPUs only share them, so "
        "every request in progress finishes late.",
    )
    serve_registry_poll_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="How often the service looks for new model versions (hot swap).",
    )

    # Closed-loop simulator.
    sim_population: Literal["movielens", "text-clusters"] = Field(
        "movielens",
        description="movielens: the 943 ML-100K users with tastes fitted on their ratings "
        "(simulator/grounded.py); text-clusters: HYMIREC_SIM_USERS new users over clusters of "
        "the items' text embeddings.",
    )
    sim_users: int = Field(
        500, ge=1, le=10_000_000, description="Users of the text-clusters population."
    )
    sim_rate_per_s: float = Field(20.0, gt=0, le=100_000, description="Requests per second.")
    sim_interests: int = Field(3, ge=1, le=32, description="Latent interests per user.")
    sim_drift: float = Field(0.05, ge=0, le=1, description="Interest drift per simulated hour.")
    sim_seed: int = Field(0, description="Seed of the simulated users' choices.")

    # Dashboard and the readout snapshots it reads.
    dashboard_host: str = Field(
        "127.0.0.1", description="Streamlit's bind address; 0.0.0.0 in a container."
    )
    dashboard_port: int = Field(
        8501, ge=1, le=65535, description="Port of the Streamlit dashboard."
    )
    readout_publish_s: float = Field(
        10.0,
        gt=0,
        le=86_400,
        description="How often the readout publisher writes the dashboard's snapshots.",
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

    @property
    def registry_dir(self) -> Path:
        """``model_registry/<model>/<version>/`` lives here."""
        return self.data_dir.resolve() / "model_registry"

    @property
    def readouts_dir(self) -> Path:
        """Readout snapshots (one JSON per experiment) that the dashboard reads."""
        return self.data_dir.resolve() / "readouts"

    @property
    def ground_truth_dir(self) -> Path:
        """The closed-loop simulator's ground truth (one JSON per experiment) for the readouts."""
        return self.data_dir.resolve() / "ground-truth"

    @property
    def trainer_model_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.trainer_models.split(",") if name.strip())

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


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """``HYMIREC_*`` names in ``environ`` that set no field (pydantic-settings ignores them)."""
    fields = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
    return sorted(
        key for key in environ if key.upper().startswith(ENV_PREFIX) and key.upper() not in fields
    )


# Settings that were removed, and why: naming one is refused with this reason.
RETIRED = {
    "topic_partitions": "replaced by HYMIREC_EVENTS_TOPIC_PARTITIONS and "
    "HYMIREC_TRAINING_TOPIC_PARTITIONS (one count per topic)",
    "stream_batch_window_s": "removed: the stream worker takes the records that are waiting "
    "(no batch window)",
}


def _did_you_mean(name: str) -> str:
    field = name[len(ENV_PREFIX) :].lower()
    if field in RETIRED:
        return f"{name} ({RETIRED[field]})"
    if isinstance(getattr(Settings, field, None), property):
        return f"{name} (derived from other settings, so not settable)"
    close = difflib.get_close_matches(field, list(Settings.model_fields), n=1, cutoff=0.6)
    if not close:
        return f"{name} (no setting is close)"
    return f"{name} (did you mean {ENV_PREFIX}{close[0].upper()}?)"


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment (plus explicit overrides), with a clear error.

    A ``HYMIREC_*`` variable that names no setting is an error (a typo would otherwise be
    silently ignored and the default used).
    """
    unknown = unknown_environment(os.environ)
    if unknown:
        raise ConfigError(
            f"unknown settings in the environment: {', '.join(map(_did_you_mean, unknown))}; "
            "fix or unset them (the settings: core/settings.py, or the table in the README)"
        )
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"HYMIREC_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
