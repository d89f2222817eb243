from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import Settings, load_settings


def test_environment_variables_with_prefix_set_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYMIREC_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("HYMIREC_RECENT_LEN", "20")
    settings = load_settings()
    assert settings.kafka_bootstrap == "kafka-1:9092,kafka-2:9092"
    assert settings.recent_len == 20


def test_embedded_defaults_are_derived_from_the_broker_port_and_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_port=12345)
    assert settings.kafka_bootstrap == "127.0.0.1:12345"
    assert settings.clickhouse_dsn == f"chdb:///{tmp_path.resolve() / 'clickhouse'}"


@pytest.mark.parametrize(
    ("env", "value", "field"),
    [
        ("HYMIREC_BROKER_PORT", "not-a-port", "HYMIREC_BROKER_PORT"),
        ("HYMIREC_TOPIC_PARTITIONS", "0", "HYMIREC_TOPIC_PARTITIONS"),
        ("HYMIREC_NO_SUCH_FIELD", "1", r"HYMIREC_NO_SUCH_FIELD \(no setting is close\)"),
        (
            "HYMIREC_KAFKA_BOOTSTRAPP",
            "kafka:9092",
            r"HYMIREC_KAFKA_BOOTSTRAPP \(did you mean HYMIREC_KAFKA_BOOTSTRAP\?\)",
        ),
        ("hymirec_dashbaord_port", "80", r"hymirec_dashbaord_port \(did you mean "),
        ("HYMIREC_STREAM_BATCH_WINDOW_S", "0.2", r"_WINDOW_S \(removed: the stream worker takes"),
    ],
)
def test_bad_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, field: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=field):
        load_settings()


def test_every_unknown_variable_is_listed_with_its_closest_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HYMIREC_SERVE_PROT", "1")
    monkeypatch.setenv("HYMIREC_READOUTS_DIR", "/x")  # a read-only property, not a field
    monkeypatch.setenv("HYMIREC_DATA_DIR", "/tmp/fine")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "HYMIREC_READOUTS_DIR (derived from other settings, so not settable)" in message
    assert "HYMIREC_SERVE_PROT (did you mean HYMIREC_SERVE_PORT?)" in message
    assert "HYMIREC_DATA_DIR" not in message


def test_every_field_round_trips_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ServiceProcess and `hymirec dashboard` hand a child process is accepted there."""
    parent = Settings(data_dir=tmp_path, dashboard_host="0.0.0.0", broker_port=12345)
    env = parent.placeholders()
    assert len(env) >= len(Settings.model_fields) - 1  # all but a None cache_dir
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    child = load_settings()
    assert child.dashboard_host == "0.0.0.0" and child.kafka_bootstrap == "127.0.0.1:12345"
    assert child.data_dir == tmp_path.resolve()


def test_recent_history_cannot_exceed_long_history() -> None:
    with pytest.raises(ConfigError, match="recent_len"):
        load_settings(recent_len=100, long_len=50)


def test_templates_are_filled_from_settings_and_unknown_names_fail(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, redis_url="redis:6379")
    text = "path: ${HYMIREC_DATA_DIR}/x\nredis: ${HYMIREC_REDIS_URL}\n"
    assert settings.fill_template(text) == f"path: {tmp_path.resolve()}/x\nredis: redis:6379\n"
    with pytest.raises(ConfigError, match="HYMIREC_NOPE"):
        settings.fill_template("${HYMIREC_NOPE}")
