"""The readout publisher against independent computations, on real chdb and the real broker.

The snapshot must carry the readout's numbers unchanged, flag the 52/48 splitter bug and not the
fair coin, and carry a confidence sequence that equals the mSPRT boundary found by inverting the
mixture likelihood ratio numerically from counts taken straight from the raw events.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from scipy import optimize
from scipy import stats as sps

from abtest.clickhouse import analytics_client, insert_event_frame, query_df
from abtest.experiments import load_experiments
from abtest.pipeline_health import pipeline_health
from abtest.publish import ExperimentPlan, ReadoutPublisher, run_publish_loop
from abtest.sink import EventSink, run_sink
from abtest.snapshot import (
    PIPELINE_FILE,
    ExperimentSnapshot,
    read_experiment_snapshot,
    read_pipeline_snapshot,
    snapshot_filename,
    write_json_atomic,
)
from core.errors import DataError
from core.settings import EXPERIMENTS_FILE, Settings
from hymirec.cli import main
from streaming.broker import LocalBroker
from streaming.kafka_io import EventProducer, ensure_topics, event_key
from streaming.schema import Event
from tests.conftest import free_port, wait_until
from tests.dashboard.conftest import (
    BALANCED,
    BROKEN,
    TRUE_CONVERSION_LIFT,
    Published,
)

ALPHA = 0.05


def snapshot(published: Published, name: str) -> ExperimentSnapshot:
    return read_experiment_snapshot(published.folder / snapshot_filename(name))


def test_every_experiment_is_published(published: Published) -> None:
    assert published.report.failed == {}
    names = sorted(p.name for p in published.report.written)
    assert names == sorted(snapshot_filename(n) for n in (BROKEN, BALANCED))


def test_broken_split_is_flagged_and_fair_split_is_not(published: Published) -> None:
    broken, fair = snapshot(published, BROKEN), snapshot(published, BALANCED)
    for snap in (broken, fair):
        assert snap.srm is not None
        users = {v.variant: v.users for v in snap.variants}
        observed = [users[a] for a in snap.srm.arms]
        assert snap.srm.observed == observed
        reference = sps.chisquare(observed)  # equal weights: nothing configured
        assert snap.srm.chi2 == pytest.approx(reference.statistic, rel=1e-12)
        assert snap.srm.p_value == pytest.approx(reference.pvalue, rel=1e-9)
        assert sum(v.share for v in snap.variants) == pytest.approx(1.0)
    assert broken.srm is not None and fair.srm is not None
    assert broken.srm.flagged and broken.srm.p_value < 0.001
    treated = {v.variant: v.share for v in broken.variants}["treatment"]
    assert treated == pytest.approx(0.52, abs=0.005)
    assert not fair.srm.flagged and fair.srm.p_value > 0.01


@pytest.mark.parametrize("name", [BROKEN, BALANCED])
def test_effects_match_experiment_readout(published: Published, name: str) -> None:
    snap, readout = snapshot(published, name), published.readouts[name]
    assert snap.control == readout.control == "control"
    assert len(snap.effects) == len(readout.table) > 0
    for row, (_, ref) in zip(snap.effects, readout.table.iterrows(), strict=True):
        for column, expected in ref.items():
            got = getattr(row, str(column))
            if expected is None or (isinstance(expected, float) and math.isnan(expected)):
                assert got is None, column
            elif isinstance(expected, float):
                assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), column
            else:
                assert got == expected, column
        assert row.significant == (row.p_value is not None and row.p_value < ALPHA)


def test_true_lift_is_detected(published: Published) -> None:
    for name in (BROKEN, BALANCED):
        snap = snapshot(published, name)
        conversion = next(e for e in snap.effects if e.metric == "conversion")
        assert conversion.p_value is not None and conversion.p_value < 0.01
        assert conversion.chance_to_win is not None and conversion.chance_to_win > 0.99
        series = next(s for s in snap.cumulative if s.metric == "conversion")
        final = series.points[-1]
        assert final.cs_low < TRUE_CONVERSION_LIFT < final.cs_high


def test_guardrails(published: Published) -> None:
    broken, fair = snapshot(published, BROKEN), snapshot(published, BALANCED)
    assert broken.guardrails.breached
    kinds = {(c.metric, c.kind) for c in broken.guardrails.checks if c.breached}
    assert kinds == {("latency_ms", "significant_regression"), ("latency_p99_ms", "p99_regression")}
    assert not fair.guardrails.breached
    # p99 of the distinct requests' latency, recomputed from the raw events.
    frame = published.frames[BROKEN]
    requests = frame[frame["event_type"] == "impression"].drop_duplicates("request_id")
    errors = frame[frame["event_type"] == "error"]
    for g in broken.guardrails.per_variant:
        latency = requests.loc[requests["variant"] == g.variant, "latency_ms"].to_numpy()
        assert g.requests == latency.size
        assert g.latency_p99_ms == pytest.approx(np.quantile(latency, 0.99), rel=0.01)
        assert g.errors == int((errors["variant"] == g.variant).sum())


def reference_conversion(frame: pd.DataFrame) -> pd.DataFrame:
    """Per user, from the raw events: variant, first exposure, converted (a play after it)."""
    imp = frame[frame["event_type"] == "impression"]
    users = imp.groupby("user_id").agg(variant=("variant", "first"), first=("ts_ms", "min"))
    plays = frame[frame["event_type"] == "play"].merge(users, left_on="user_id", right_index=True)
    converted = plays.loc[plays["ts_ms"] >= plays["first"], "user_id"].unique()
    users["converted"] = users.index.isin(converted).astype(float)
    return users


def msprt_boundary(effect: float, variance: float, tau: float) -> tuple[float, float]:
    """Solve ln Λ(effect − Δ) = ln(1/α) for Δ on each side (Johari et al. 2017, eq. for Λ)."""
    t2 = tau * tau

    def excess(delta: float) -> float:
        d = effect - delta
        log_lr = 0.5 * math.log(variance / (variance + t2)) + d * d * t2 / (
            2 * variance * (variance + t2)
        )
        return log_lr - math.log(1 / ALPHA)

    span = 100 * math.sqrt(variance)
    low = optimize.brentq(excess, effect - span, effect, xtol=1e-14, rtol=1e-13)
    high = optimize.brentq(excess, effect, effect + span, xtol=1e-14, rtol=1e-13)
    return low, high


def mixture_tau(sd: float, n_per_arm: float) -> float:
    """τ² = u·2sd²/n with u = 2 ln(1/α) + ln(1 + u), solved by a root finder."""
    u = optimize.brentq(lambda u: u - 2 * math.log(1 / ALPHA) - math.log1p(u), 1.0, 100.0)
    return math.sqrt(u * 2 * sd * sd / n_per_arm)


def test_confidence_sequence_inverts_the_msprt(published: Published) -> None:
    users = reference_conversion(published.frames[BROKEN])
    snap = snapshot(published, BROKEN)
    series = next(s for s in snap.cumulative if s.metric == "conversion")
    full = {v: g["converted"] for v, g in users.groupby("variant")}
    p = {v: x.mean() for v, x in full.items()}
    n = {v: x.size for v, x in full.items()}
    # τ was fixed at this first publish (look) for the planned horizon of 10,000 users per arm:
    # the Wald variance V now, scaled to the horizon (V ∝ 1/n), is 2sd²/N with sd² = V·n̄/2.
    v_now = sum(p[a] * (1 - p[a]) / n[a] for a in ("control", "treatment"))
    sd = math.sqrt(v_now * (n["control"] + n["treatment"]) / 2 / 2)
    tau = mixture_tau(sd, 10_000)
    assert series.tau == pytest.approx(tau, rel=1e-9)
    state = next(s for s in snap.sequential if s.metric == "conversion")
    assert (state.tau, state.tau_source, state.looks) == (series.tau, "horizon", 1)
    assert len(series.points) >= 15
    for point in series.points:
        seen = users[users["first"] <= point.ts_ms]
        arms = {v: g["converted"] for v, g in seen.groupby("variant")}
        c, t = arms["control"], arms["treatment"]
        assert (point.n_control, point.n_treatment) == (c.size, t.size)
        assert point.effect == pytest.approx(t.mean() - c.mean(), rel=1e-12)
        variance = c.mean() * (1 - c.mean()) / c.size + t.mean() * (1 - t.mean()) / t.size
        assert point.variance == pytest.approx(variance, rel=1e-12)
        low, high = msprt_boundary(point.effect, variance, tau)
        assert (point.cs_low, point.cs_high) == pytest.approx((low, high), rel=1e-8, abs=1e-12)
        z = sps.norm.ppf(1 - ALPHA / 2)
        assert point.ci_low == pytest.approx(point.effect - z * math.sqrt(variance), rel=1e-9)


@pytest.mark.parametrize("name", [BROKEN, BALANCED])
def test_cumulative_series_ends_at_the_readout_and_the_sequence_is_wider(
    published: Published, name: str
) -> None:
    snap = snapshot(published, name)
    effects = {(e.metric, e.treatment): e for e in snap.effects}
    assert {s.metric for s in snap.cumulative} >= {"clicks_per_user", "conversion", "latency_ms"}
    for series in snap.cumulative:
        final, row = series.points[-1], effects[(series.metric, series.treatment)]
        assert series.method == row.method
        assert final.ts_ms == snap.last_exposure_ms
        assert (final.n_control, final.n_treatment) == (row.n_control, row.n_treatment)
        assert final.effect == row.effect_abs
        assert (final.ci_low, final.ci_high) == (row.ci_abs_low, row.ci_abs_high)
        times = [p.ts_ms for p in series.points]
        assert times == sorted(times) and len(set(times)) == len(times)
        for point in series.points:
            assert point.ci_low is not None and point.ci_high is not None
            assert point.cs_low < point.ci_low <= point.effect <= point.ci_high < point.cs_high
    last = {t.variant: t.users for t in snap.traffic if t.ts_ms == snap.last_exposure_ms}
    assert last == {v.variant: v.users for v in snap.variants}


def test_snapshot_writes_are_atomic(published: Published, tmp_path: Path) -> None:
    """A reader polling the file while it is rewritten always parses one whole snapshot."""
    versions = [snapshot(published, BROKEN), snapshot(published, BALANCED)]
    path = tmp_path / "snap.json"
    write_json_atomic(path, versions[0])
    done, seen, problems = threading.Event(), set(), []

    def read() -> None:
        while not done.is_set():
            try:
                seen.add(json.loads(path.read_text())["experiment"])
            except Exception as exc:  # a partial file would land here
                problems.append(repr(exc))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            write_json_atomic(path, versions[i % 2])
    finally:
        done.set()
        reader.join()
    assert problems == []
    assert seen == {BROKEN, BALANCED}
    assert [p.name for p in path.parent.iterdir()] == ["snap.json"]  # no temp file left


def test_a_corrupt_snapshot_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"schema_version": 1, "experiment": ')
    with pytest.raises(DataError, match=r"x.json is not valid JSON"):
        read_experiment_snapshot(path)
    path.write_text('{"schema_version": 1, "experiment": "x"}')
    with pytest.raises(DataError, match=r"x.json is malformed: generated_at_ms: Field required"):
        read_experiment_snapshot(path)


def test_snapshot_file_names_are_safe() -> None:
    assert snapshot_filename("ranker-v2") == "ranker-v2.json"
    odd = snapshot_filename("../a b/c")
    assert "/" not in odd and not odd.startswith(".") and odd.endswith(".json")
    assert snapshot_filename("a b") != snapshot_filename("a_b")


@pytest.mark.integration
def test_pipeline_health_on_the_broker(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    ensure_topics(settings.kafka)
    events = [
        Event(event_id=uuid.uuid4(), user_id=u, item_id=1, event_type="click", ts_ms=1_000 + u)
        for u in range(40)
    ]
    with EventProducer(settings.kafka) as producer:
        producer.send_many(events[:30])
        for k in range(5):
            producer.send_raw(event_key(k), b"{bad")
    dead_letters = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap)
    try:
        dead_letters.send(settings.kafka.dead_letter_topic, value=b"{}").get(timeout=30)
    finally:
        dead_letters.close()
    parts = [
        TopicPartition(settings.kafka.events_topic, p)
        for p in range(settings.kafka.events_topic_partitions)
    ]
    committer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=settings.sink.group_id,
        enable_auto_commit=False,
    )
    try:
        end = committer.end_offsets(parts)
        committed = {tp: end[tp] // 2 for tp in parts}
        committer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in committed.items()})
    finally:
        committer.close()
    total = sum(end.values())
    assert total == 35

    first = pipeline_health(settings, now_ms=1_000_000)
    assert first.reachable and first.error is None
    assert first.events_end_offset == 35 and first.events_per_s is None
    assert first.dead_letter_records == 1
    lags = {lag.role: lag for lag in first.consumer_lag}
    assert lags["ClickHouse sink"].lag == total - sum(committed.values())
    assert lags["ClickHouse sink"].committed_partitions == settings.kafka.events_topic_partitions
    assert lags["stream worker"].lag == 35 and lags["stream worker"].committed_partitions == 0
    assert lags["trainer"].lag == 0 and lags["trainer"].topic == settings.kafka.training_topic

    with EventProducer(settings.kafka) as producer:
        producer.send_many(events[30:])
    second = pipeline_health(settings, first, now_ms=1_004_000)
    assert second.events_end_offset == 45
    assert second.events_per_s == pytest.approx(10 / 4.0)
    assert second.rate_interval_s == pytest.approx(4.0)


def test_pipeline_health_without_a_broker() -> None:
    settings = Settings(broker_port=free_port())
    health = pipeline_health(settings, timeout_ms=1_000)
    assert not health.reachable and health.error
    assert health.consumer_lag == [] and health.events_per_s is None


@pytest.mark.integration
def test_sink_publishes_and_survives_a_failing_publisher(
    make_settings: Callable[..., Settings],
) -> None:
    """The sink publishes snapshots from its loop; while writing them fails it counts the
    failures and still inserts and commits every event."""
    settings = make_settings()
    ensure_topics(settings.kafka)
    events = [
        Event(
            event_id=uuid.uuid4(),
            user_id=user,
            item_id=1,
            event_type="impression",
            ts_ms=1_000_000 + user,
            experiment="sink-pub",
            variant="b" if user % 2 else "a",
            request_id=f"r{user}",
            position=0,
            latency_ms=10.0 + user % 7,
        )
        for user in range(60)
    ]
    with EventProducer(settings.kafka) as producer:
        producer.send_many(events)
    settings.readouts_dir.parent.mkdir(parents=True, exist_ok=True)
    settings.readouts_dir.write_text("a file where the folder should be")  # every write fails
    path = settings.readouts_dir / snapshot_filename("sink-pub")
    with analytics_client(settings.clickhouse) as client:
        publisher = ReadoutPublisher(settings, client, every_s=0.2)
        sink = EventSink(settings.kafka, settings.sink, client, publisher=publisher)
        stop, errors = threading.Event(), []

        def target() -> None:
            try:
                sink.run(stop)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        try:
            wait_until(
                lambda: errors or sink.stats.readout_publish_failures >= 2, 60, "failed publishes"
            )
            settings.readouts_dir.unlink()  # the fault clears: a later cycle writes
            wait_until(lambda: errors or sink.stats.committed == len(events), 60, "the commit")
            wait_until(lambda: errors or _users(path) == {"a": 30, "b": 30}, 60, "the snapshot")
        finally:
            stop.set()
            thread.join(60)
        assert errors == []
        assert sink.stats.readout_publishes >= 1
        rows = query_df(client, "SELECT count() AS n FROM events FINAL")["n"].iloc[0]
    assert rows == len(events)
    assert read_pipeline_snapshot(settings.readouts_dir / PIPELINE_FILE).reachable


def _users(path: Path) -> dict[str, int] | None:
    try:
        return {v.variant: v.users for v in read_experiment_snapshot(path).variants}
    except DataError:
        return None


@pytest.fixture
def copied_data(published: Published, tmp_path: Path) -> Path:
    """A fresh data dir whose chdb holds the same events (no readouts yet)."""
    data_dir = tmp_path / "data"
    with analytics_client(Settings(data_dir=data_dir).clickhouse) as client:
        for frame in published.frames.values():
            insert_event_frame(client, frame)
    return data_dir


@pytest.mark.integration
def test_cli_publishes_once(
    copied_data: Path,
    broker: LocalBroker,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HYMIREC_DATA_DIR", str(copied_data))
    monkeypatch.setenv("HYMIREC_BROKER_PORT", str(broker.port))
    assert main(["readout", "--publish", "--once"]) == 0
    assert "0 failed publish cycles" in capsys.readouterr().out
    folder = copied_data / "readouts"
    # The default experiments file's experiments are planned: each gets a (here empty) snapshot.
    planned = [snapshot_filename(e.name) for e in load_experiments(EXPERIMENTS_FILE).experiments]
    assert planned
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [PIPELINE_FILE, snapshot_filename(BROKEN), snapshot_filename(BALANCED), *planned]
    )
    broken = read_experiment_snapshot(folder / snapshot_filename(BROKEN))
    assert broken.srm is not None and broken.srm.flagged
    assert read_pipeline_snapshot(folder / PIPELINE_FILE).reachable
    assert main(["readout"]) == 2
    assert "name an experiment, or pass --publish" in capsys.readouterr().err


@pytest.mark.integration
def test_publish_loop_repeats_until_stopped(copied_data: Path, broker: LocalBroker) -> None:
    settings = Settings(data_dir=copied_data, broker_port=broker.port, kafka_events_topic="nowhere")
    path = settings.readouts_dir / snapshot_filename(BALANCED)
    stop, seen, result = threading.Event(), set(), []

    def target() -> None:
        result.append(
            run_publish_loop(settings, every_s=0.05, stop=stop, plans={"planned": ExperimentPlan()})
        )

    def generated() -> int:
        with contextlib.suppress(DataError):
            seen.add(read_experiment_snapshot(path).generated_at_ms)
        return len(seen)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        wait_until(lambda: generated() >= 2, 120, "two publishes")
    finally:
        stop.set()
        thread.join(60)
    assert result == [0]
    planned = read_experiment_snapshot(settings.readouts_dir / snapshot_filename("planned"))
    assert planned.total_users == 0 and planned.effects == [] and planned.cumulative == []
    pipeline = read_pipeline_snapshot(settings.readouts_dir / PIPELINE_FILE)
    assert pipeline.reachable and pipeline.events_end_offset is None  # no such topic
    # Each publish adds a freshness point to the series carried over from the previous file.
    times = [p.ts_ms for p in pipeline.freshness]
    assert len(times) >= 2 and times == sorted(set(times))
    assert times[-1] == pipeline.generated_at_ms
    assert all(p.models == [] for p in pipeline.freshness)  # no registry in this data dir


@pytest.mark.integration
def test_run_sink_publishes_readouts(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(readout_publish_s=0.2)
    ensure_topics(settings.kafka)
    with EventProducer(settings.kafka) as producer:
        for user in range(10):
            producer.send(
                Event(
                    event_id=uuid.uuid4(),
                    user_id=user,
                    item_id=1,
                    event_type="impression",
                    ts_ms=5_000 + user,
                    experiment="via-run-sink",
                    variant="x" if user < 5 else "y",
                    request_id=f"q{user}",
                )
            )
    stop, result, errors = threading.Event(), [], []

    def target() -> None:
        try:
            result.append(run_sink(settings, stop, publish_readouts=True))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    path = settings.readouts_dir / snapshot_filename("via-run-sink")
    try:
        wait_until(lambda: errors or _users(path) == {"x": 5, "y": 5}, 60, "the snapshot")
    finally:
        stop.set()
        thread.join(60)
    assert errors == [] and result[0].readout_publishes >= 1
    assert "readouts published" in result[0].summary()
