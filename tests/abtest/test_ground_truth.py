"""The simulator's ground truth: the recorder against a hand computation, its files, the snapshot.

Five served lists over two wall-clock minutes and two variants (minute M0 and M0 + 1 min):

    variant    minute  impressions  expected clicks  clicks
    control    M0      10           0.50             1
    control    M0      10           0.30             0
    treatment  M0      10           0.80             0
    control    M1       5           0.25             1
    treatment  M1      10           0.70             2

control: 25 impressions, 1.05 expected clicks (expected CTR 0.042); treatment: 20 and 1.5 (0.075);
true lift = 0.075 / 0.042 - 1 = 11/14.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import pytest

from abtest.clickhouse import analytics_client
from abtest.ground_truth import (
    SIMULATOR_SOURCE,
    GroundTruth,
    GroundTruthRecorder,
    TruthPoint,
    read_ground_truth,
)
from abtest.metrics import USER_METRIC_COLUMNS, ExperimentMetrics
from abtest.publish import ExperimentPlan, build_snapshot, publish_readouts
from abtest.snapshot import read_experiment_snapshot, snapshot_filename, write_json_atomic
from core.errors import DataError
from core.settings import Settings

M0 = 28_333_334 * 60_000  # a minute boundary
M1 = M0 + 60_000
NOW_MS = M1 + 90_000
EXPERIMENT = "ranker"
SERVED = [  # variant, ts_ms, impressions, expected clicks, clicks
    ("control", M0 + 5_000, 10, 0.50, 1),
    ("treatment", M0 + 59_999, 10, 0.80, 0),
    ("control", M0 + 30_000, 10, 0.30, 0),
    ("control", M1, 5, 0.25, 1),
    ("treatment", M1 + 1_000, 10, 0.70, 2),
]


def recorded() -> GroundTruthRecorder:
    recorder = GroundTruthRecorder()
    for variant, ts_ms, impressions, expected, clicks in SERVED:
        recorder.record(EXPERIMENT, variant, ts_ms, impressions, expected, clicks)
    recorder.record("other one/b", "a", M0, 4, 1.0, 1)  # another experiment, kept apart
    return recorder


def truth() -> GroundTruth:
    return recorded().truths(NOW_MS)[EXPERIMENT]


def test_recorder_buckets_by_minute_and_variant() -> None:
    truths = recorded().truths(NOW_MS)
    assert sorted(truths) == sorted([EXPERIMENT, "other one/b"])
    got = truths[EXPERIMENT]
    assert got.experiment == EXPERIMENT and got.generated_at_ms == NOW_MS
    assert got.source == SIMULATOR_SOURCE
    assert [
        (p.minute_start_ms, p.variant, p.requests, p.impressions, p.clicks) for p in got.points
    ] == [
        (M0, "control", 2, 20, 1),
        (M0, "treatment", 1, 10, 0),
        (M1, "control", 1, 5, 1),
        (M1, "treatment", 1, 10, 2),
    ]
    assert [p.expected_clicks for p in got.points] == pytest.approx([0.8, 0.8, 0.25, 0.7])
    assert [p.expected_ctr for p in got.points] == pytest.approx([0.04, 0.08, 0.05, 0.07])
    assert [p.ctr for p in got.points] == pytest.approx([0.05, 0.0, 0.2, 0.2])
    assert [(p.variant, p.requests) for p in truths["other one/b"].points] == [("a", 1)]


def test_totals_and_true_lift_by_hand() -> None:
    totals = truth().totals
    assert sorted(totals) == ["control", "treatment"]
    control, treatment = totals["control"], totals["treatment"]
    assert (control.requests, control.impressions, control.clicks) == (3, 25, 2)
    assert (treatment.requests, treatment.impressions, treatment.clicks) == (2, 20, 2)
    assert control.expected_clicks == pytest.approx(1.05)
    assert treatment.expected_clicks == pytest.approx(1.5)
    assert control.expected_ctr == pytest.approx(0.042)
    assert treatment.expected_ctr == pytest.approx(0.075)
    assert truth().true_lift("control", "treatment") == pytest.approx(11 / 14)
    assert truth().true_lift("treatment", "control") == pytest.approx(14 / 25 - 1)


@pytest.mark.parametrize(
    ("points", "lift"),
    [
        ([], None),
        ([("control", 10, 0.5)], None),  # no treatment
        ([("control", 0, 0.0), ("treatment", 10, 0.5)], None),  # control without impressions
        ([("control", 10, 0.0), ("treatment", 10, 0.5)], None),  # control's expected CTR is 0
        ([("control", 10, 0.5), ("treatment", 10, 0.5)], 0.0),  # A/A: exactly no lift
    ],
    ids=["empty", "one-arm", "no-impressions", "zero-control", "a-a"],
)
def test_true_lift_of_degenerate_arms(
    points: list[tuple[str, int, float]], lift: float | None
) -> None:
    got = GroundTruth(
        experiment="x",
        generated_at_ms=0,
        source="test",
        points=[
            TruthPoint(
                minute_start_ms=M0,
                variant=v,
                requests=1,
                impressions=n,
                expected_clicks=e,
                clicks=0,
            )
            for v, n, e in points
        ],
    )
    assert got.true_lift("control", "treatment") == lift


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", "a", M0, 10, 0.5, 1), "experiment: the ground truth needs"),
        (("x", "a", M0, -1, 0.0, 0), "cannot be < 0"),
        (("x", "a", M0, 3, 0.5, 4), "clicks=4 > impressions=3"),
        (("x", "a", M0, 3, 3.5, 0), "expected_clicks=3.5 must be finite and in"),
        (("x", "a", M0, 3, math.nan, 0), "expected_clicks=nan must be finite"),
        (("x", "a", M0, 3, -0.1, 0), "expected_clicks=-0.1"),
    ],
    ids=["no-experiment", "negative", "too-many-clicks", "too-many-expected", "nan", "negative-e"],
)
def test_record_rejects_impossible_lists(
    args: tuple[str, str, int, int, float, int], message: str
) -> None:
    recorder = GroundTruthRecorder()
    with pytest.raises(DataError, match=message):
        recorder.record(*args)
    assert recorder.truths(NOW_MS) == {}


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    recorder = recorded()
    folder = tmp_path / "ground-truth"
    paths = recorder.write(folder, now_ms=NOW_MS)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        snapshot_filename(e) for e in (EXPERIMENT, "other one/b")
    )  # no temporary files left
    assert sorted(paths) == sorted(folder.iterdir())
    for name, expected in recorder.truths(NOW_MS).items():
        assert read_ground_truth(folder, name) == expected
    assert read_ground_truth(folder, "never-ran") is None
    assert read_ground_truth(tmp_path / "missing", EXPERIMENT) is None


def test_settings_name_the_folder(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).ground_truth_dir == tmp_path.resolve() / "ground-truth"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"experiment": "ranker", "gener', "is not valid JSON"),
        ("[1, 2]", "is malformed: \\(root\\)"),
        (
            '{"experiment": "ranker", "generated_at_ms": 1, "source": "s"}',
            "is malformed: points: Field required",
        ),
        (
            '{"experiment": "another", "generated_at_ms": 1, "source": "s", "points": []}',
            "is about 'another', not 'ranker'",
        ),
    ],
    ids=["half-written", "not-an-object", "missing-field", "other-experiment"],
)
def test_a_broken_truth_file_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / snapshot_filename(EXPERIMENT)).write_text(text)
    with pytest.raises(DataError, match=f"ground truth {EXPERIMENT}.json {message}"):
        read_ground_truth(tmp_path, EXPERIMENT)


def empty_metrics(name: str) -> ExperimentMetrics:
    users = pd.DataFrame({c: pd.Series(dtype="int64") for c in USER_METRIC_COLUMNS})
    users["variant"] = users["variant"].astype(object)
    return ExperimentMetrics(name, users, 0, 14)


def no_requests() -> pd.DataFrame:
    columns = ["variant", "requests", "latency_requests", "latency_p50_ms", "latency_p99_ms"]
    return pd.DataFrame(columns=[*columns, "errors"])


def test_snapshot_carries_the_truth_and_old_files_still_validate(tmp_path: Path) -> None:
    plan = ExperimentPlan(weights={"control": 0.5, "treatment": 0.5}, control="control")
    snap = build_snapshot(empty_metrics(EXPERIMENT), no_requests(), plan=plan, ground_truth=truth())
    path = tmp_path / "ranker.json"
    write_json_atomic(path, snap)
    back = read_experiment_snapshot(path)
    assert back.ground_truth == truth()
    assert back.ground_truth.true_lift("control", "treatment") == pytest.approx(11 / 14)

    old = json.loads(path.read_text())
    del old["ground_truth"]  # a file written before the field existed
    path.write_text(json.dumps(old))
    assert read_experiment_snapshot(path).ground_truth is None
    assert build_snapshot(empty_metrics(EXPERIMENT), no_requests()).ground_truth is None


def test_publish_embeds_the_truth_and_survives_a_broken_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    recorded().write(settings.ground_truth_dir, now_ms=NOW_MS)
    broken = "broken-truth"
    (settings.ground_truth_dir / snapshot_filename(broken)).write_text('{"experiment": "bro')
    plans = {name: ExperimentPlan() for name in (EXPERIMENT, broken, "no-truth")}
    with analytics_client(settings.clickhouse) as client, caplog.at_level(logging.WARNING):
        report = publish_readouts(client, settings, plans=plans, with_pipeline=False)
    assert report.failed == {}
    assert sorted(p.name for p in report.written) == sorted(snapshot_filename(n) for n in plans)
    folder = settings.readouts_dir
    assert read_experiment_snapshot(folder / snapshot_filename(EXPERIMENT)).ground_truth == truth()
    for name in (broken, "no-truth"):
        assert read_experiment_snapshot(folder / snapshot_filename(name)).ground_truth is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"ground truth of '{broken}' left out of its snapshot" in warnings[0]
    assert "is not valid JSON" in warnings[0]
