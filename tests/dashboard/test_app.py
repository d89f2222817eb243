"""The Streamlit dashboard under Streamlit's AppTest, on snapshots the real publisher wrote."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from abtest.ground_truth import GroundTruthRecorder
from abtest.metrics import USER_METRIC_COLUMNS, ExperimentMetrics
from abtest.publish import ExperimentPlan, build_snapshot, publish_pipeline_health
from abtest.snapshot import (
    PIPELINE_FILE,
    SNAPSHOT_SCHEMA_VERSION,
    FreshnessPoint,
    ModelFreshness,
    PipelineSnapshot,
    snapshot_filename,
    write_json_atomic,
)
from core.settings import Settings
from dashboard.charts import FRESHNESS_AGE_TITLE, GROUND_TRUTH_TITLE, TRAINING_LAG_TITLE
from dashboard.data import (
    EXPECTED,
    OBSERVED,
    ServedModel,
    ServiceProbe,
    ServiceStatus,
    effects_frame,
    fetch_service_status,
    freshness_age_frame,
    ground_truth_frame,
    load_readouts,
    load_registry,
    model_versions_frame,
    training_lag_frame,
    true_lifts,
)
from model.checkpoint_registry import REGISTRY_FORMAT
from streaming.kafka_io import EventProducer, ensure_topics
from tests.conftest import free_port
from tests.dashboard.conftest import BALANCED, BROKEN, Published

REQUEST_COLUMNS = (
    "variant",
    "requests",
    "latency_requests",
    "latency_p50_ms",
    "latency_p99_ms",
    "errors",
)
APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def data_dir_with(published: Published, tmp_path: Path) -> Path:
    """A fresh data dir holding a copy of the published snapshots."""
    data_dir = tmp_path / "data"
    shutil.copytree(published.folder, data_dir / "readouts")
    return data_dir


@pytest.fixture
def run_app(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], AppTest]:
    def run(data_dir: Path) -> AppTest:
        monkeypatch.setenv("HYMIREC_DATA_DIR", str(data_dir))
        monkeypatch.setenv("HYMIREC_SERVE_PORT", str(free_port()))  # nothing listens there
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return run


def texts(elements: object) -> list[str]:
    return [str(e.value) for e in elements]  # type: ignore[attr-defined]


def test_lists_experiments_and_flags_the_broken_split(
    published: Published, tmp_path: Path, run_app: Callable[[Path], AppTest]
) -> None:
    at = run_app(data_dir_with(published, tmp_path))
    radio = at.sidebar.radio[0]
    assert radio.options == [BALANCED, f"⚠ {BROKEN} (SRM)"]

    at = radio.set_value(BROKEN).run()
    assert not at.exception
    srm = [t for t in texts(at.error) if t.startswith("Sample ratio mismatch")]
    assert len(srm) == 1
    assert "do not trust this experiment's effects" in srm[0]
    snap = load_readouts(published.folder).experiments[BROKEN]
    assert snap.srm is not None
    assert f"control={snap.srm.observed[0]}, treatment={snap.srm.observed[1]}" in srm[0]
    assert any(t.startswith("Guardrail breached: latency_ms") for t in texts(at.error))
    assert len(at.get("vega_lite_chart")) >= 6  # traffic ×2, forest, Bayes, cumulative, latency
    assert at.header[0].value == BROKEN
    table = at.dataframe[0].value
    assert set(table["metric"]) >= {"conversion", "latency_ms (guardrail)"}
    assert any("Service not reachable" in t for t in texts(at.warning))

    at = at.sidebar.radio[0].set_value(BALANCED).run()
    assert not at.exception
    assert not any(t.startswith("Sample ratio mismatch") for t in texts(at.error))
    assert any(t.startswith("Sample ratio OK") for t in texts(at.success))


def test_cumulative_metric_can_be_switched(
    published: Published, tmp_path: Path, run_app: Callable[[Path], AppTest]
) -> None:
    at = run_app(data_dir_with(published, tmp_path))
    box = at.selectbox[0]
    assert box.value == "conversion · treatment"
    at = box.set_value("latency_ms · treatment").run()
    assert not at.exception
    specs = [json.dumps(c.proto.spec) for c in at.get("vega_lite_chart")]
    assert any("effect on latency_ms" in s for s in specs)


def test_empty_folder_shows_a_friendly_message(
    tmp_path: Path, run_app: Callable[[Path], AppTest]
) -> None:
    at = run_app(tmp_path / "nothing-here")
    assert any("No data yet" in t and "hymirec demo" in t for t in texts(at.info))
    assert at.sidebar.radio.len == 0
    assert not at.get("vega_lite_chart")


def test_a_corrupt_snapshot_shows_an_error_for_that_experiment_only(
    published: Published, tmp_path: Path, run_app: Callable[[Path], AppTest]
) -> None:
    data_dir = data_dir_with(published, tmp_path)
    (data_dir / "readouts" / "half-written.json").write_text('{"schema_version": 1, "exp')
    at = run_app(data_dir)
    assert "half-written.json (unreadable)" in at.sidebar.radio[0].options
    at = at.sidebar.radio[0].set_value("half-written.json").run()
    assert not at.exception
    assert any("half-written.json is not valid JSON" in t for t in texts(at.error))
    at = at.sidebar.radio[0].set_value(BROKEN).run()
    assert at.header[0].value == BROKEN and at.get("vega_lite_chart")


def write_version(registry: Path, model: str, version: str, **overrides: object) -> None:
    folder = registry / model / version
    folder.mkdir(parents=True)
    meta = {
        "model": model,
        "version": version,
        "published_at_ms": 1_700_000_100_000,
        "samples_seen": 5000,
        "newest_event_ts_ms": 1_700_000_000_000,
        "newest_ingest_ts_ms": 1_700_000_050_000,
        "freshness_ms": {"p50": 1500.0, "p99": 4200.0, "max": 6000.0},
        "metrics": {"prequential_recall@50": 0.21, "loss": 3.2},
        "device": "cpu",
        "format": REGISTRY_FORMAT,
    } | overrides
    (folder / "metadata.json").write_text(json.dumps(meta))


def test_model_versions_and_freshness(tmp_path: Path) -> None:
    registry = tmp_path / "model_registry"
    write_version(registry, "hymirec", "v000001")
    write_version(registry, "hymirec", "v000002", newest_ingest_ts_ms=1_700_000_080_000)
    (registry / "hymirec" / "LATEST").write_text("v000002\n")
    (registry / "hymirec" / "v000003").mkdir()
    (registry / "hymirec" / "v000003" / "metadata.json").write_text('{"model": "hymirec"}')
    (registry / "hymirec" / ".tmp-v000004").mkdir()  # being written: ignored
    history = load_registry(registry)
    assert [h.model for h in history] == ["hymirec"]
    assert history[0].latest == "v000002"
    assert [v.version for v in history[0].versions] == ["v000001", "v000002"]
    assert "v000003/metadata.json" in history[0].errors["v000003"]

    served = ServiceStatus(
        models={
            "hymirec": ServedModel(
                version="v000002", loaded_at_ms=1_700_000_090_000, published_at_ms=1_700_000_100_000
            )
        }
    )
    frame = model_versions_frame(history, ServiceProbe("x", served, None), 1_700_000_200_000)
    rows = frame.set_index("version")
    assert rows.loc["v000002", "in service"] and rows.loc["v000002", "latest"]
    assert not rows.loc["v000001", "in service"]
    assert rows.loc["v000002", "event→served s"] == pytest.approx(10.0)
    assert pd.isna(rows.loc["v000001", "event→served s"])
    assert rows.loc["v000001", "newest ingest age s"] == pytest.approx(150.0)
    assert rows.loc["v000002", "event→publish p99 s"] == pytest.approx(4.2)


def test_service_down_is_reported_quickly() -> None:
    probe = fetch_service_status("127.0.0.1", free_port(), timeout_s=0.5)
    assert not probe.reachable and probe.error


def test_app_shows_models_and_pipeline(
    published: Published,
    tmp_path: Path,
    run_app: Callable[[Path], AppTest],
    make_settings: Callable[..., Settings],
) -> None:
    data_dir = data_dir_with(published, tmp_path)
    write_version(data_dir / "model_registry", "sasrec", "v000007")
    (data_dir / "model_registry" / "sasrec" / "LATEST").write_text("v000007")
    settings = make_settings(data_dir=data_dir)
    ensure_topics(settings.kafka)
    with EventProducer(settings.kafka) as producer:
        producer.send_raw(b"1", b"{}")
    pipeline = publish_pipeline_health(settings)
    [point] = pipeline.freshness
    assert point.training_lag == 0  # the training topic exists and is empty
    [model] = point.models
    assert (model.model, model.version, model.freshness_p99_ms) == ("sasrec", "v000007", 4200.0)
    assert model.newest_event_age_ms == point.ts_ms - 1_700_000_050_000
    at = run_app(data_dir)
    models = next(d.value for d in at.dataframe if "samples seen" in d.value.columns)
    assert list(models["version"]) == ["v000007"]
    labels = {m.label: m.value for m in at.metric}
    assert labels[f"records in {settings.kafka.events_topic}"] == "1"
    assert labels["dead-letter records"] == "0"
    lags = next(d.value for d in at.dataframe if "lag" in d.value.columns)
    assert len(lags) == 3
    assert len(freshness_specs(at)) == 2


FRESH_T0_MS = 1_700_000_000_000


def pipeline_with(freshness: list[FreshnessPoint]) -> PipelineSnapshot:
    """A pipeline snapshot of an unreachable broker (the freshness is known without it)."""
    return PipelineSnapshot(
        schema_version=SNAPSHOT_SCHEMA_VERSION,
        generated_at_ms=FRESH_T0_MS,
        bootstrap="127.0.0.1:1",
        reachable=False,
        error="NoBrokersAvailable",
        events_topic="events",
        events_end_offset=None,
        events_per_s=None,
        rate_interval_s=None,
        dead_letter_topic="events-dlq",
        dead_letter_records=None,
        consumer_lag=[],
        freshness=freshness,
    )


def fresh(model: str, age_ms: int | None) -> ModelFreshness:
    return ModelFreshness(
        model=model,
        version="v000001",
        published_at_ms=FRESH_T0_MS,
        newest_event_age_ms=age_ms,
        freshness_p99_ms=2_500.0,
    )


FRESHNESS_SERIES = [
    FreshnessPoint(ts_ms=FRESH_T0_MS, training_lag=None, models=[fresh("sasrec", 90_000)]),
    FreshnessPoint(
        ts_ms=FRESH_T0_MS + 10_000,
        training_lag=700,
        models=[fresh("sasrec", 12_000), fresh("popular", None)],
    ),
    FreshnessPoint(ts_ms=FRESH_T0_MS + 20_000, training_lag=40, models=[fresh("sasrec", 8_000)]),
]


def freshness_specs(at: AppTest) -> list[str]:
    specs = [json.dumps(c.proto.spec) for c in at.get("vega_lite_chart")]
    return [s for s in specs if FRESHNESS_AGE_TITLE in s or TRAINING_LAG_TITLE in s]


def test_freshness_frames() -> None:
    pipeline = pipeline_with(FRESHNESS_SERIES)
    ages = freshness_age_frame(pipeline)
    assert list(ages["newest event age s"]) == [90.0, 12.0, 8.0]  # popular's age is unknown
    assert list(ages["event→publish p99 s"]) == [2.5] * 3
    assert list(ages["time"]) == [
        pd.Timestamp(FRESH_T0_MS + k * 10_000, unit="ms", tz="UTC") for k in range(3)
    ]
    lags = training_lag_frame(pipeline)
    assert list(lags["lag"]) == [700, 40]
    assert (
        freshness_age_frame(pipeline_with([])).empty and training_lag_frame(pipeline_with([])).empty
    )


@pytest.mark.parametrize(
    "series",
    [None, [], [FreshnessPoint(ts_ms=FRESH_T0_MS, training_lag=None, models=[fresh("x", None)])]],
    ids=["no-pipeline-file", "empty-series", "nothing-known"],
)
def test_no_freshness_chart_without_points(
    series: list[FreshnessPoint] | None,
    published: Published,
    tmp_path: Path,
    run_app: Callable[[Path], AppTest],
) -> None:
    data_dir = data_dir_with(published, tmp_path)
    if series is not None:
        write_json_atomic(data_dir / "readouts" / PIPELINE_FILE, pipeline_with(series))
    at = run_app(data_dir)
    assert at.get("vega_lite_chart") and not freshness_specs(at)
    assert "Freshness" not in texts(at.subheader)


def test_freshness_chart_when_the_snapshot_has_points(
    published: Published, tmp_path: Path, run_app: Callable[[Path], AppTest]
) -> None:
    data_dir = data_dir_with(published, tmp_path)
    write_json_atomic(data_dir / "readouts" / PIPELINE_FILE, pipeline_with(FRESHNESS_SERIES))
    at = run_app(data_dir)
    assert "Freshness" in texts(at.subheader)
    ages, lags = freshness_specs(at)
    assert FRESHNESS_AGE_TITLE in ages and TRAINING_LAG_TITLE in lags  # their data: frames test
    assert any("newest event" in t and "training topic" in t for t in texts(at.caption))
    assert any("Kafka not reachable" in t for t in texts(at.warning))


def test_effects_frame_verdicts(published: Published) -> None:
    folder = load_readouts(published.folder)
    frame = effects_frame(folder.experiments[BROKEN]).set_index("metric")
    assert frame.loc["latency_ms", "verdict"] == "worse"
    assert frame.loc["ctr", "verdict"] == "not significant"


@pytest.mark.parametrize(
    "plan",
    [None, ExperimentPlan(weights={"a": 0.5, "b": 0.5})],
    ids=["nothing-known", "weights-known"],
)
def test_an_experiment_without_users_renders(
    plan: ExperimentPlan | None, tmp_path: Path, run_app: Callable[[Path], AppTest]
) -> None:
    users = pd.DataFrame({c: pd.Series(dtype="int64") for c in USER_METRIC_COLUMNS})
    users["variant"] = users["variant"].astype(object)
    requests = pd.DataFrame(columns=list(REQUEST_COLUMNS))
    snap = build_snapshot(ExperimentMetrics("planned", users, 0, 14), requests, plan=plan)
    write_json_atomic(tmp_path / "data" / "readouts" / "planned.json", snap)
    at = run_app(tmp_path / "data")
    infos = texts(at.info)
    assert "No treatment with exposed users to compare yet." in infos
    assert ("No exposed users yet." in infos) == (plan is None)
    if plan is not None:
        assert any("Sample ratio OK: a=0, b=0" in t for t in texts(at.success))


MINUTE_MS = 60_000
T0_MS = 28_333_334 * MINUTE_MS


def with_ground_truth(data_dir: Path, name: str) -> GroundTruthRecorder:
    """Give ``name``'s snapshot a simulator's truth: two minutes, treatment's lists 50 % better."""
    recorder = GroundTruthRecorder()
    for minute in range(2):
        ts_ms = T0_MS + minute * MINUTE_MS + 1_000
        recorder.record(name, "control", ts_ms, 10, 0.4, 1)
        recorder.record(name, "treatment", ts_ms, 10, 0.6, 0 if minute else 2)
    path = data_dir / "readouts" / snapshot_filename(name)
    snap = load_readouts(data_dir / "readouts").experiments[name]
    write_json_atomic(path, snap.model_copy(update={"ground_truth": recorder.truths()[name]}))
    return recorder


def truth_specs(at: AppTest) -> list[str]:
    specs = [json.dumps(c.proto.spec) for c in at.get("vega_lite_chart")]
    return [s for s in specs if GROUND_TRUTH_TITLE in s]


def test_ground_truth_is_shown_only_when_the_snapshot_has_it(
    published: Published, tmp_path: Path, run_app: Callable[[Path], AppTest]
) -> None:
    data_dir = data_dir_with(published, tmp_path)
    with_ground_truth(data_dir, BALANCED)
    snap = load_readouts(data_dir / "readouts").experiments[BALANCED]
    assert snap.ground_truth is not None
    assert snap.ground_truth.true_lift("control", "treatment") == pytest.approx(0.5)

    at = run_app(data_dir)
    assert at.sidebar.radio[0].value == BALANCED
    assert "Ground truth (simulation)" in texts(at.subheader)
    assert len(truth_specs(at)) == 1
    [lift] = true_lifts(snap)
    assert lift.treatment == "treatment" and lift.measured is not None
    line = next(t for t in texts(at.markdown) if "true CTR lift" in t)
    assert "`treatment` vs `control`: true CTR lift +50.00%" in line
    assert f"the readout measured {lift.measured:+.2%}" in line
    assert ("covers the truth" if lift.covered else "misses the truth") in line
    assert any("Ground truth, not a measurement" in t for t in texts(at.caption))

    at = at.sidebar.radio[0].set_value(BROKEN).run()
    assert not at.exception
    assert at.get("vega_lite_chart") and not truth_specs(at)
    assert "Ground truth (simulation)" not in texts(at.subheader)
    assert not any("true CTR lift" in t for t in texts(at.markdown))


def test_ground_truth_frame_pairs_expected_and_observed() -> None:
    recorder = GroundTruthRecorder()
    recorder.record("x", "control", T0_MS, 10, 0.4, 1)
    recorder.record("x", "control", T0_MS + MINUTE_MS, 0, 0.0, 0)  # an empty list: no CTR
    truth = recorder.truths(T0_MS + 2 * MINUTE_MS)["x"]
    frame = ground_truth_frame(truth)
    assert list(frame["series"]) == [EXPECTED, OBSERVED]
    assert list(frame["ctr"]) == pytest.approx([0.04, 0.1])
    assert (frame["time"] == pd.Timestamp(T0_MS, unit="ms", tz="UTC")).all()
