from pathlib import Path

import pytest

from hymirec.errors import ConfigError
from hymirec.settings import Settings, load_settings


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
        ("HYMIREC_NO_SUCH_FIELD", "1", None),
    ],
)
def test_bad_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, field: str | None
) -> None:
    monkeypatch.setenv(env, value)
    if field is None:  # unknown HYMIREC_ variables are ignored by the env source, not fatal
        load_settings()
        return
    with pytest.raises(ConfigError, match=field):
        load_settings()


def test_recent_history_cannot_exceed_long_history() -> None:
    with pytest.raises(ConfigError, match="recent_len"):
        load_settings(recent_len=100, long_len=50)


def test_templates_are_filled_from_settings_and_unknown_names_fail(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, redis_url="redis:6379")
    text = "path: ${HYMIREC_DATA_DIR}/x\nredis: ${HYMIREC_REDIS_URL}\n"
    assert settings.fill_template(text) == f"path: {tmp_path.resolve()}/x\nredis: redis:6379\n"
    with pytest.raises(ConfigError, match="HYMIREC_NOPE"):
        settings.fill_template("${HYMIREC_NOPE}")
