"""The one settings object, built once at the edge (CLI, service start-up); each component is
given its own group of it (``core.settings_groups``) and the paths it needs.

Every field can be set from an environment variable: the ``HYMIREC_`` prefix, the group and the
field (``HYMIREC_KAFKA_BOOTSTRAP=kafka:9092`` sets ``settings.kafka.bootstrap``); a few that
every component shares (``HYMIREC_DATA_DIR``) have no group. ``load_settings`` refuses a
``HYMIREC_`` variable that names no field (a typo fails at start-up instead of leaving the
default; a renamed one names its new name). The same flat names work as keyword arguments
(``Settings(worker_instance_id="worker-1")``). The defaults are the embedded mode (local broker,
Feast local provider, in-process ClickHouse) so that a laptop or CI needs no Docker.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError
from core.settings_groups import (
    FEATURE_REPO_DIR,
    BrokerSettings,
    ClickHouseSettings,
    CodebookSettings,
    DashboardSettings,
    FeatureSettings,
    KafkaSettings,
    ReadoutSettings,
    ServeSettings,
    SimulatorSettings,
    SinkSettings,
    TrainerSettings,
    WorkerSettings,
)

__all__ = [
    "ENV_PREFIX",
    "FEATURE_REPO_DIR",
    "GROUPS",
    "Settings",
    "load_settings",
    "setting_names",
    "unknown_environment",
]

ENV_PREFIX = "HYMIREC_"
EXPERIMENTS_FILE = Path(__file__).resolve().parent.parent / "abtest" / "experiments.yaml"


class Settings(BaseSettings):
    """The shared paths and one group per component; embedded defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,
        frozen=True,
        extra="forbid",
    )

    data_dir: Path = Field(Path(".hymirec"), description="Root of every local data folder.")
    cache_dir: Path | None = Field(None, description="Derived-data cache; default <data_dir>/cache")
    experiments_file: Path = Field(
        EXPERIMENTS_FILE, description="YAML file with the experiments, layers and holdout."
    )
    broker: BrokerSettings = Field(
        BrokerSettings(),
        description="The embedded broker (`hymirec broker`): where it listens.",
    )
    kafka: KafkaSettings = Field(
        KafkaSettings(),
        description="Every Kafka client: bootstrap servers, topics, record sizes, idle fetches.",
    )
    worker: WorkerSettings = Field(
        WorkerSettings(),
        description="The stream worker (`hymirec worker`, Faust): its group, batches, pushes.",
    )
    features: FeatureSettings = Field(
        FeatureSettings(),
        description="User-history features and the Feast store they are served from.",
    )
    codebook: CodebookSettings = Field(
        CodebookSettings(),
        description="The residual cosine codebook that compresses the long history.",
    )
    clickhouse: ClickHouseSettings = Field(
        ClickHouseSettings(),
        description="Where exposures and outcomes land (ClickHouse or embedded chdb).",
    )
    sink: SinkSettings = Field(
        SinkSettings(),
        description="The event sink (`hymirec sink`): broker -> ClickHouse.",
    )
    readout: ReadoutSettings = Field(
        ReadoutSettings(),
        description="The experiment readout and the publisher of its snapshots.",
    )
    trainer: TrainerSettings = Field(
        TrainerSettings(),
        description="The incremental trainer (`hymirec trainer`) and its checkpoint registry.",
    )
    serve: ServeSettings = Field(
        ServeSettings(), description="The recommendation service (`hymirec serve`)."
    )
    sim: SimulatorSettings = Field(
        SimulatorSettings(),
        description="The closed-loop simulator (`hymirec simulate`).",
    )
    dashboard: DashboardSettings = Field(
        DashboardSettings(),
        description="The Streamlit dashboard (`hymirec dashboard`).",
    )

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_names(cls, data: Any) -> Any:
        """``worker_instance_id=...`` (a flat name, as in the environment) -> ``worker``'s field."""
        if not isinstance(data, dict):
            return data
        nested: dict[str, Any] = {}
        flat: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            group, _, field = key.partition("_")
            if key not in cls.model_fields and group in GROUPS and field:
                flat.setdefault(group, {})[field] = value
            else:
                nested[key] = value
        for group, fields in flat.items():
            given = nested.get(group, {})
            given = given.model_dump() if isinstance(given, BaseModel) else dict(given)
            nested[group] = given | fields
        return nested

    @model_validator(mode="after")
    def _fill_derived(self) -> Settings:
        if not self.kafka.bootstrap:
            bootstrap = f"{self.broker.host}:{self.broker.port}"
            object.__setattr__(
                self, "kafka", self.kafka.model_copy(update={"bootstrap": bootstrap})
            )
        if not self.clickhouse.dsn:
            dsn = f"chdb:///{self.clickhouse_dir}"
            object.__setattr__(self, "clickhouse", self.clickhouse.model_copy(update={"dsn": dsn}))
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

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name (``worker_instance_id``): the environment's names."""
        values: dict[str, Any] = {}
        for name in Settings.model_fields:
            value = getattr(self, name)
            if isinstance(value, BaseModel):
                values |= {f"{name}_{k}": v for k, v in value.model_dump().items()}
            else:
                values[name] = value
        return values

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """Pydantic's unvalidated copy, refusing names that are not fields (a flat name such as
        ``trainer_threads`` would be set as a stray attribute and change nothing): use
        :meth:`updated`."""
        stray = sorted(set(update or {}) - set(type(self).model_fields))
        if stray:
            raise ConfigError(f"not fields of Settings: {stray}; use Settings.updated(...)")
        return super().model_copy(update=update, deep=deep)

    def updated(self, **changes: Any) -> Settings:
        """A copy with some settings changed, by flat name (``sink_instance_id="sink-1"``),
        validated as the originals were."""
        unknown = set(changes) - set(self.flat())
        if unknown:
            raise ConfigError(f"no such settings: {sorted(unknown)}")
        return type(self)(**(self.flat() | changes))

    def placeholders(self) -> dict[str, str]:
        """``HYMIREC_<FLAT NAME>`` -> value, for filling ``${...}`` in config templates."""
        values = self.flat()
        values["data_dir"] = self.data_dir.resolve()
        values["cache_dir"] = self.embedding_cache_dir
        return {f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in values.items() if v is not None}

    def fill_template(self, text: str) -> str:
        """Replace ``${HYMIREC_X}`` with the setting X; an unknown name is an error."""
        known = self.placeholders()

        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in known:
                raise ConfigError(f"unknown placeholder ${{{name}}}; known: {sorted(known)}")
            return known[name]

        return re.sub(r"\$\{(HYMIREC_[A-Z0-9_]+)\}", repl, text)


GROUPS: dict[str, type[BaseModel]] = {
    name: field.annotation
    for name, field in Settings.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}


def setting_names() -> Iterator[tuple[str, Any]]:
    """(flat name, pydantic field) of every setting, in declaration order."""
    for name, field in Settings.model_fields.items():
        group = GROUPS.get(name)
        if group is None:
            yield name, field
        else:
            yield from ((f"{name}_{sub}", f) for sub, f in group.model_fields.items())


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """``HYMIREC_*`` names in ``environ`` that set no field."""
    fields = {f"{ENV_PREFIX}{name}".upper() for name, _ in setting_names()}
    return sorted(
        key for key in environ if key.upper().startswith(ENV_PREFIX) and key.upper() not in fields
    )


# Settings that were removed or renamed: naming one is refused with this reason.
RETIRED = {
    "topic_partitions": "replaced by HYMIREC_KAFKA_EVENTS_TOPIC_PARTITIONS and "
    "HYMIREC_KAFKA_TRAINING_TOPIC_PARTITIONS (one count per topic)",
    "stream_batch_window_s": "removed: the stream worker takes the records that are waiting "
    "(no batch window)",
    # Renamed when the settings were grouped by component (2026-12-05).
    "events_topic": "renamed HYMIREC_KAFKA_EVENTS_TOPIC",
    "dead_letter_topic": "renamed HYMIREC_KAFKA_DEAD_LETTER_TOPIC",
    "training_topic": "renamed HYMIREC_KAFKA_TRAINING_TOPIC",
    "events_topic_partitions": "renamed HYMIREC_KAFKA_EVENTS_TOPIC_PARTITIONS",
    "training_topic_partitions": "renamed HYMIREC_KAFKA_TRAINING_TOPIC_PARTITIONS",
    "max_event_bytes": "renamed HYMIREC_KAFKA_MAX_EVENT_BYTES",
    "max_message_bytes": "renamed HYMIREC_KAFKA_MAX_MESSAGE_BYTES",
    "faust_app_id": "renamed HYMIREC_WORKER_APP_ID",
    "stream_batch_size": "renamed HYMIREC_WORKER_BATCH_SIZE",
    "recent_len": "renamed HYMIREC_FEATURES_RECENT_LEN",
    "long_len": "renamed HYMIREC_FEATURES_LONG_LEN",
    "embedding_batch_size": "renamed HYMIREC_FEATURES_EMBEDDING_BATCH_SIZE",
    "feast_config": "renamed HYMIREC_FEATURES_STORE_CONFIG",
    "redis_url": "renamed HYMIREC_FEATURES_REDIS_URL",
    "cuped_pre_days": "renamed HYMIREC_READOUT_CUPED_PRE_DAYS",
}


def _did_you_mean(name: str) -> str:
    field = name[len(ENV_PREFIX) :].lower()
    if field in RETIRED:
        return f"{name} ({RETIRED[field]})"
    if isinstance(getattr(Settings, field, None), property):
        return f"{name} (derived from other settings, so not settable)"
    names = [n for n, _ in setting_names()]
    close = difflib.get_close_matches(field, names, n=1, cutoff=0.6)
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
            f"{ENV_PREFIX}{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
