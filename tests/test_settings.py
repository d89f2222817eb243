from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import Settings, load_settings, setting_names


def test_environment_variables_with_prefix_set_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYMIREC_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("HYMIREC_FEATURES_RECENT_LEN", "20")
    settings = load_settings()
    assert settings.kafka.bootstrap == "kafka-1:9092,kafka-2:9092"
    assert settings.features.recent_len == 20


def test_embedded_defaults_are_derived_from_the_broker_port_and_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_port=12345)
    assert settings.kafka.bootstrap == "127.0.0.1:12345"
    assert settings.clickhouse.dsn == f"chdb:///{tmp_path.resolve() / 'clickhouse'}"


@pytest.mark.parametrize(
    ("env", "value", "field"),
    [
        ("HYMIREC_BROKER_PORT", "not-a-port", "HYMIREC_BROKER_PORT"),
        ("HYMIREC_TOPIC_PARTITIONS", "0", "HYMIREC_KAFKA_EVENTS_TOPIC_PARTITIONS and"),
        ("HYMIREC_RECENT_LEN", "20", r"HYMIREC_RECENT_LEN \(renamed HYMIREC_FEATURES_RECENT_LEN\)"),
        ("HYMIREC_FAUST_APP_ID", "x", r"\(renamed HYMIREC_WORKER_APP_ID\)"),
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
    assert len(env) >= len(list(setting_names())) - 1  # all but a None cache_dir
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    child = load_settings()
    assert child.dashboard.host == "0.0.0.0" and child.kafka.bootstrap == "127.0.0.1:12345"
    unchanged = {k: v for k, v in parent.flat().items() if k != "cache_dir"}  # made explicit
    assert {k: v for k, v in child.flat().items() if k in unchanged} == unchanged
    assert child.data_dir == tmp_path.resolve()


def test_recent_history_cannot_exceed_long_history() -> None:
    with pytest.raises(ConfigError, match="recent_len"):
        load_settings(features_recent_len=100, features_long_len=50)


def test_templates_are_filled_from_settings_and_unknown_names_fail(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, features_redis_url="redis:6379")
    text = "path: ${HYMIREC_DATA_DIR}/x\nredis: ${HYMIREC_FEATURES_REDIS_URL}\n"
    assert settings.fill_template(text) == f"path: {tmp_path.resolve()}/x\nredis: redis:6379\n"
    with pytest.raises(ConfigError, match="HYMIREC_NOPE"):
        settings.fill_template("${HYMIREC_NOPE}")


def test_groups_take_flat_names_and_a_copy_is_validated(tmp_path: Path) -> None:
    """``worker_instance_id`` (the environment's name) sets ``settings.worker.instance_id``;
    ``updated`` changes some settings by the same names, validated, and refuses unknown ones."""
    settings = Settings(data_dir=tmp_path, worker_instance_id="worker-1", sink={"batch_size": 7})
    assert settings.worker.instance_id == "worker-1" and settings.sink.batch_size == 7
    copy = settings.updated(sink_instance_id="sink-2", worker_batch_size=5)
    assert (copy.sink.instance_id, copy.sink.batch_size, copy.worker.batch_size) == ("sink-2", 7, 5)
    assert copy.worker.instance_id == "worker-1" and settings.sink.instance_id == "sink-0"
    with pytest.raises(ConfigError, match="no such settings"):
        settings.updated(sink_instance="x")
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        settings.updated(sink_batch_size=0)
    with pytest.raises(ConfigError, match=r"not fields of Settings: \['trainer_threads'\]"):
        settings.model_copy(update={"trainer_threads": 1})
