"""The settings' groups, one per component: each component is given its own group (and the paths
it needs), never the whole settings object. A field's environment variable is the prefix, the
group and the field: ``HYMIREC_WORKER_INSTANCE_ID`` sets ``settings.worker.instance_id``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "BrokerSettings",
    "ClickHouseSettings",
    "CodebookSettings",
    "DashboardSettings",
    "FeatureSettings",
    "KafkaSettings",
    "ReadoutSettings",
    "ServeSettings",
    "SimulatorSettings",
    "SinkSettings",
    "TrainerSettings",
    "WorkerSettings",
]

FEATURE_REPO_DIR = Path(__file__).resolve().parent.parent / "features" / "feature_repo"


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BrokerSettings(_Group):
    """The embedded broker (`hymirec broker`): where it listens."""

    host: str = Field(default="127.0.0.1", description="Address the embedded broker listens on.")
    port: int = Field(default=19092, ge=1, le=65535, description="Port of the embedded broker.")


class KafkaSettings(_Group):
    """Every Kafka client: bootstrap servers, topics, record sizes, idle fetches."""

    bootstrap: str = Field(
        default="", description="host:port list; empty means the embedded broker."
    )
    events_topic: str = Field(
        default="events", description="Topic of impressions, clicks and plays (keyed by user)."
    )
    dead_letter_topic: str = Field(
        default="events-dead-letter",
        description="Topic of records the worker or trainer could not use, with the reason.",
    )
    training_topic: str = Field(
        default="training-samples",
        description="Topic of training samples the worker writes for the trainer.",
    )
    events_topic_partitions: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Partitions of the events topic (and of the dead-letter topic and the "
        "worker's table changelog, which follow it): the most worker or sink replicas that "
        "share the events. Set it before the topic is first created.",
    )
    training_topic_partitions: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Partitions of the training-samples topic (its readers are the trainers, one "
        "per checkpoint registry). Set it before the topic is first created.",
    )
    max_event_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Larger payloads are dead-lettered."
    )
    max_message_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024 * 1024, description="Largest record the clients move."
    )
    empty_fetch_backoff_ms: int = Field(
        default=500,
        ge=0,
        le=1000,
        description="Longest pause of a consumer after fetches that found no records "
        "(streaming/fetch_backoff.py): the embedded broker answers them at once, so an idle "
        "consumer would spin. A pause ends early when a producer on this host rings the "
        "broker's doorbell (streaming/doorbell.py) after an acknowledgement; a record from a "
        "producer that does not ring waits up to about this long. "
        "0: off, for a broker that waits server-side (Apache Kafka: docker/compose.yaml).",
    )


class WorkerSettings(_Group):
    """The stream worker (`hymirec worker`, Faust): its group, batches, pushes."""

    app_id: str = Field(
        default="hymirec-features",
        description="Faust app id of the stream worker: its consumer group and table names.",
    )
    web_port: int = Field(
        default=6066,
        ge=1,
        le=65535,
        description="Port of the Faust worker's web server (its health page).",
    )
    batch_size: int = Field(
        default=1000, ge=1, le=100_000, description="Most events the worker applies in one batch."
    )
    instance_id: str = Field(
        default="worker-0",
        min_length=1,
        max_length=100,
        description="Stable, unique per worker replica",
    )
    push_attempts: int = Field(
        default=5, ge=1, le=100, description="Feast push attempts per batch before the worker exits"
    )
    session_timeout_s: float = Field(
        default=10.0,
        ge=2,
        le=300,
        description="Kafka group session timeout of the worker (heartbeat: a fifth of it).",
    )
    fault_drop: str = Field(
        default="",
        pattern=r"^([0-9]{1,6}:[0-9]{1,18}-[0-9]{1,18}(,[0-9]{1,6}:[0-9]{1,18}-[0-9]{1,18})*)?$",
        description="Fault injection, for tests only: 'P:A-B,...' makes the worker ignore "
        "offsets A..B of events partition P the first time they are delivered, as if the "
        "consumer had skipped them. Empty (no fault) by default.",
    )
    max_poll_interval_s: float = Field(
        default=120.0,
        ge=10,
        le=3600,
        description="Longest the worker may take between two polls before it leaves its group.",
    )


class FeatureSettings(_Group):
    """User-history features and the Feast store they are served from."""

    recent_len: int = Field(
        default=50, ge=1, le=10_000, description="R: recent item ids kept verbatim."
    )
    long_len: int = Field(
        default=1000, ge=1, le=100_000, description="P: long history, kept as codes."
    )
    embedding_batch_size: int = Field(
        default=128, ge=1, description="Item texts encoded per batch by the text embedding model."
    )
    store_config: Path = Field(
        default=FEATURE_REPO_DIR / "feature_store.yaml",
        description="Feast feature_store.yaml (the embedded one; docker/ has the Redis one).",
    )
    redis_url: str = Field(
        default="localhost:6379",
        description="Redis host:port for Feast's online store in the production yaml.",
    )

    @model_validator(mode="after")
    def _recent_within_long(self) -> FeatureSettings:
        if self.recent_len > self.long_len:
            raise ValueError(
                f"recent_len ({self.recent_len}) must not exceed long_len ({self.long_len})"
            )
        return self


class CodebookSettings(_Group):
    """The residual cosine codebook that compresses the long history."""

    levels: int = Field(
        default=3,
        ge=1,
        le=16,
        description="Residual levels of the long-history codebook (bytes per item).",
    )
    size: int = Field(default=255, ge=2, le=65_535, description="255 keeps codes in one byte")
    seed: int = Field(default=0, description="Seed of the codebook's k-means fit.")


class ClickHouseSettings(_Group):
    """Where exposures and outcomes land (ClickHouse or embedded chdb)."""

    dsn: str = Field(default="", description="empty means chdb:///<data_dir>/clickhouse")


class SinkSettings(_Group):
    """The event sink (`hymirec sink`): broker -> ClickHouse."""

    group_id: str = Field(
        default="hymirec-clickhouse-sink",
        min_length=1,
        description="Consumer group of the event sink.",
    )
    instance_id: str = Field(
        default="sink-0",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Stable, unique per sink replica (static group membership)",
    )
    batch_size: int = Field(
        default=5000, ge=1, le=1_000_000, description="Events per insert, at most."
    )
    batch_window_s: float = Field(
        default=1.0, gt=0, le=300, description="Longest wait before a partial batch is inserted."
    )


class ReadoutSettings(_Group):
    """The experiment readout and the publisher of its snapshots."""

    cuped_pre_days: int = Field(
        default=14,
        ge=1,
        le=365,
        description="Days before first exposure counted as the CUPED covariate.",
    )
    publish_s: float = Field(
        default=10.0,
        gt=0,
        le=86_400,
        description="How often the readout publisher writes the dashboard's snapshots.",
    )


class TrainerSettings(_Group):
    """The incremental trainer (`hymirec trainer`) and its checkpoint registry."""

    models: str = Field(
        default="",
        description="Comma-separated model names; empty means the models the experiments serve.",
    )
    group_id: str = Field(
        default="hymirec-trainer",
        min_length=1,
        description="Kafka consumer group of the online trainer.",
    )
    batch_size: int = Field(default=256, ge=1, le=100_000, description="Samples per micro-batch.")
    replay_ratio: float = Field(
        default=1.0,
        ge=0,
        le=64,
        description="Replayed examples per new example in a training step.",
    )
    publish_every_samples: int = Field(
        default=5000,
        ge=1,
        description="The trainer publishes a version after this many new samples...",
    )
    publish_every_s: float = Field(
        default=30.0,
        gt=0,
        le=86_400,
        description="...or after this many seconds with new samples, whichever comes first.",
    )
    keep_versions: int = Field(default=5, ge=2, le=10_000, description="Versions kept per model.")
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (CUDA when there is a GPU), cpu, cuda or cuda:N.",
    )
    lr: float = Field(
        default=1e-3, gt=0, le=1, description="Learning rate of the online trainer's optimiser."
    )
    threads: int = Field(
        default=0, ge=0, le=1024, description="Torch threads of the trainer; 0: one per usable CPU."
    )
    seed: int = Field(
        default=0, description="Seed of the online trainer (replay sampling, prequential probes)."
    )
    max_item_id: int = Field(
        default=1_000_000,
        ge=1,
        description="Larger item ids are refused (they would grow the tables).",
    )

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.models.split(",") if name.strip())


class ServeSettings(_Group):
    """The recommendation service (`hymirec serve`)."""

    host: str = Field(
        default="127.0.0.1", description="Address the recommendation service listens on."
    )
    port: int = Field(
        default=8000, ge=1, le=65535, description="Port of the recommendation service."
    )
    max_inflight: int = Field(
        default=8,
        ge=1,
        le=100_000,
        description="Requests in progress beyond this get a 503. A few times the ranking "
        "threads, so an accepted request waits behind few others.",
    )
    threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Threads that rank requests, first come first served; 0: one per CPU the "
        "service may run on. Ranking is CPU-bound: more threads than CPUs only share them, so "
        "every request in progress finishes late.",
    )
    registry_poll_s: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        description="How often the service looks for new model versions (hot swap).",
    )


class SimulatorSettings(_Group):
    """The closed-loop simulator (`hymirec simulate`)."""

    population: Literal["movielens", "text-clusters"] = Field(
        default="movielens",
        description="movielens: the 943 ML-100K users with tastes fitted on their ratings "
        "(simulator/grounded.py); text-clusters: HYMIREC_SIM_USERS new users over clusters of "
        "the items' text embeddings.",
    )
    users: int = Field(
        default=500, ge=1, le=10_000_000, description="Users of the text-clusters population."
    )
    rate_per_s: float = Field(default=20.0, gt=0, le=100_000, description="Requests per second.")
    interests: int = Field(default=3, ge=1, le=32, description="Latent interests per user.")
    drift: float = Field(default=0.05, ge=0, le=1, description="Interest drift per simulated hour.")
    seed: int = Field(default=0, description="Seed of the simulated users' choices.")


class DashboardSettings(_Group):
    """The Streamlit dashboard (`hymirec dashboard`)."""

    host: str = Field(
        default="127.0.0.1", description="Streamlit's bind address; 0.0.0.0 in a container."
    )
    port: int = Field(default=8501, ge=1, le=65535, description="Port of the Streamlit dashboard.")
