"""The configured weights reach the SRM check (publisher, one-shot readout, dashboard), and the
publisher starts on an empty database. Real chdb, the real experiments file loader, the CLI.

Issue 8's requirement: a deliberately broken splitter (52/48 instead of the configured 50/50) is
flagged by the SRM check in the readout and on the dashboard, while a split that matches its
configured 70/30 weights is not (and would be, were the check to assume an equal split).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from streamlit.testing.v1 import AppTest

from abtest.clickhouse import analytics_client, insert_event_frame
from abtest.experiments import load_experiments
from abtest.publish import experiment_plans, publish_readouts, run_publish_loop
from abtest.readout import experiment_readout, format_readout
from abtest.snapshot import (
    PIPELINE_FILE,
    ExperimentSnapshot,
    read_experiment_snapshot,
    read_pipeline_snapshot,
    snapshot_filename,
)
from abtest.stats.srm import SRM_THRESHOLD
from core.settings import Settings
from hymirec.cli import main
from streaming.broker import LocalBroker
from tests.conftest import free_port, wait_until
from tests.dashboard.conftest import broken_split, experiment_frame

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
MATCHING, BROKEN, NO_CONTROL, IDLE = "split-70-30", "split-52-48", "no-control-yet", "not-started"
# name -> (configured control/treatment weights, users, share actually treated)
DESIGN = {
    MATCHING: ((70, 30), 10_000, 0.30),
    BROKEN: ((50, 50), 20_000, 0.52),
    NO_CONTROL: ((50, 50), 200, 1.0),  # the splitter sends nobody to the control
}
CONFIG = """
default_model: sasrec
layers:
  - {name: ranking, salt: plans-layer}
experiments:
""" + "".join(
    f"""  - name: {name}
    layer: ranking
    salt: plans-{name}
    range: [{i / 4}, {(i + 1) / 4}]
    variants:
      - {{name: control, weight: {weights[0]}}}
      - {{name: treatment, weight: {weights[1]}}}
"""
    for i, (name, weights) in enumerate([*((n, d[0]) for n, d in DESIGN.items()), (IDLE, (1, 1))])
)


def write_config(folder: Path) -> Path:
    path = folder / "experiments.yaml"
    path.write_text(CONFIG)
    return path


@dataclass(frozen=True)
class Configured:
    data_dir: Path
    experiments_file: Path
    frames: dict[str, pd.DataFrame]

    def exposed(self, name: str) -> dict[str, int]:
        """Users with at least one impression per variant, from the raw events."""
        frame = self.frames[name]
        imp = frame[frame["event_type"] == "impression"]
        return {str(k): int(v) for k, v in imp.groupby("variant")["user_id"].nunique().items()}


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Configured:
    """The three experiments' events in a chdb directory (closed again) and their config file."""
    folder = tmp_path_factory.mktemp("configured")
    rng = np.random.default_rng(8)
    frames, first_user = {}, 1
    for name, (_, users, share) in DESIGN.items():
        frames[name] = experiment_frame(rng, name, broken_split(rng, users, share), first_user, 1.0)
        first_user += users
    with analytics_client(Settings(data_dir=folder / "data").clickhouse) as client:
        for frame in frames.values():
            insert_event_frame(client, frame)
    return Configured(folder / "data", write_config(folder), frames)


@pytest.fixture
def cli_env(
    configured: Configured, broker: LocalBroker, monkeypatch: pytest.MonkeyPatch
) -> Configured:
    monkeypatch.setenv("HYMIREC_DATA_DIR", str(configured.data_dir))
    monkeypatch.setenv("HYMIREC_BROKER_PORT", str(broker.port))
    monkeypatch.setenv("HYMIREC_EXPERIMENTS_FILE", str(configured.experiments_file))
    return configured


@pytest.fixture(scope="module")
def published(configured: Configured, broker: LocalBroker) -> dict[str, ExperimentSnapshot]:
    """What `hymirec readout --publish --once` wrote for the configured data."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HYMIREC_DATA_DIR", str(configured.data_dir))
        env.setenv("HYMIREC_BROKER_PORT", str(broker.port))
        env.setenv("HYMIREC_EXPERIMENTS_FILE", str(configured.experiments_file))
        assert main(["readout", "--publish", "--once"]) == 0
    folder = configured.data_dir / "readouts"
    names = [MATCHING, BROKEN, NO_CONTROL, IDLE]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [PIPELINE_FILE, *map(snapshot_filename, names)]
    )
    return {n: read_experiment_snapshot(folder / snapshot_filename(n)) for n in names}


def reference_srm(observed: list[int], weights: tuple[float, ...]) -> tuple[float, float]:
    """Pearson's chi-square of the counts against the weights, by scipy."""
    expected = np.asarray(weights, dtype=float) / sum(weights) * sum(observed)
    result = sps.chisquare(observed, f_exp=expected)
    return float(result.statistic), float(result.pvalue)


def test_plans_come_from_the_experiments_file(configured: Configured) -> None:
    plans = experiment_plans(load_experiments(configured.experiments_file))
    assert sorted(plans) == sorted([*DESIGN, IDLE])
    assert dict(plans[MATCHING].weights or {}) == {"control": 70, "treatment": 30}
    assert {p.control for p in plans.values()} == {"control"}


@pytest.mark.integration
@pytest.mark.parametrize(("name", "flagged"), [(MATCHING, False), (BROKEN, True)])
def test_published_srm_uses_the_configured_weights(
    published: dict[str, ExperimentSnapshot], configured: Configured, name: str, flagged: bool
) -> None:
    snap, weights = published[name], DESIGN[name][0]
    assert snap.srm is not None and snap.srm.weights_configured
    assert snap.srm.arms == ["control", "treatment"]
    observed = configured.exposed(name)
    assert snap.srm.observed == [observed["control"], observed["treatment"]]
    chi2, p = reference_srm(snap.srm.observed, weights)
    assert snap.srm.chi2 == pytest.approx(chi2, rel=1e-12)
    assert snap.srm.p_value == pytest.approx(p, rel=1e-9)
    assert snap.srm.flagged is flagged and (p < SRM_THRESHOLD) is flagged
    shares = {v.variant: (v.expected_share, v.weight) for v in snap.variants}
    total = sum(weights)
    assert shares == {
        "control": (pytest.approx(weights[0] / total), weights[0]),
        "treatment": (pytest.approx(weights[1] / total), weights[1]),
    }


@pytest.mark.integration
def test_the_matching_split_would_be_flagged_against_an_equal_split(
    published: dict[str, ExperimentSnapshot],
) -> None:
    """So the 70/30 snapshot passing proves the weights were used."""
    srm = published[MATCHING].srm
    assert srm is not None
    assert reference_srm(srm.observed, (1, 1))[1] < 1e-100


@pytest.mark.integration
def test_a_control_without_users_is_published_and_flagged(
    published: dict[str, ExperimentSnapshot], configured: Configured
) -> None:
    snap = published[NO_CONTROL]
    treated = configured.exposed(NO_CONTROL)["treatment"]
    assert snap.control == "control" and snap.effects == [] and snap.cumulative == []
    assert {v.variant: v.users for v in snap.variants} == {"control": 0, "treatment": treated}
    assert snap.srm is not None and snap.srm.flagged and snap.srm.observed == [0, treated]
    assert snap.srm.chi2 == pytest.approx(reference_srm([0, treated], (1, 1))[0], rel=1e-12)


@pytest.mark.integration
def test_a_configured_experiment_without_traffic_has_an_empty_snapshot(
    published: dict[str, ExperimentSnapshot],
) -> None:
    snap = published[IDLE]
    assert snap.total_users == 0 and snap.effects == [] and snap.cumulative == []
    assert snap.srm is not None and not snap.srm.flagged and snap.srm.message == "no_units"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "verdict"), [(MATCHING, "-> ok"), (BROKEN, "-> MISMATCH: do not trust the effects")]
)
def test_one_shot_readout_uses_the_configured_weights(
    cli_env: Configured, capsys: pytest.CaptureFixture[str], name: str, verdict: str
) -> None:
    assert main(["readout", name]) == 0
    out = capsys.readouterr().out
    weights = DESIGN[name][0]
    shares = "/".join(f"{w / sum(weights):.1%}" for w in weights)
    line = next(x for x in out.splitlines() if x.startswith("sample ratio"))
    assert f"against configured weights ({shares})" in line and line.endswith(verdict)
    chi2, p = reference_srm(list(cli_env.exposed(name).values()), weights)
    assert f"chi2={chi2:.3f} p={p:.4g}" in line


@pytest.mark.integration
def test_experiment_readout_with_weights_flags_only_the_broken_split(
    configured: Configured,
) -> None:
    plans = experiment_plans(load_experiments(configured.experiments_file))
    with analytics_client(Settings(data_dir=configured.data_dir).clickhouse) as client:
        readouts = {
            n: experiment_readout(client, n, plans[n].control, plans[n].weights)
            for n in (MATCHING, BROKEN)
        }
        unweighted = experiment_readout(client, MATCHING)
    assert readouts[BROKEN].srm is not None and readouts[BROKEN].srm.mismatch
    assert readouts[MATCHING].srm is not None and not readouts[MATCHING].srm.mismatch
    assert unweighted.srm is not None and unweighted.srm.mismatch
    assert "against an equal split (50.0%/50.0%)" in format_readout(unweighted)
    assert "MISMATCH" in format_readout(readouts[BROKEN])


@pytest.mark.integration
def test_the_dashboard_flags_the_broken_split_against_its_weights(
    published: dict[str, ExperimentSnapshot],
    configured: Configured,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HYMIREC_DATA_DIR", str(configured.data_dir))
    monkeypatch.setenv("HYMIREC_SERVE_PORT", str(free_port()))  # nothing listens there
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    radio = at.sidebar.radio[0]
    assert f"⚠ {BROKEN} (SRM)" in radio.options and MATCHING in radio.options
    at = radio.set_value(BROKEN).run()
    mismatch = [str(e.value) for e in at.error if "Sample ratio mismatch" in str(e.value)]
    assert len(mismatch) == 1 and "do not match the configured weights" in mismatch[0]
    at = at.sidebar.radio[0].set_value(MATCHING).run()
    ok = [str(e.value) for e in at.success if str(e.value).startswith("Sample ratio OK")]
    assert len(ok) == 1 and "match the configured weights" in ok[0]


# --- a fresh stack: an empty database -------------------------------------------------------------


@pytest.mark.integration
def test_publish_on_an_empty_database_writes_the_pipeline_file_only(
    tmp_path: Path, broker: LocalBroker
) -> None:
    settings = Settings(data_dir=tmp_path, broker_port=broker.port)
    with analytics_client(settings.clickhouse) as client:
        report = publish_readouts(client, settings)
    assert report.written == [] and report.failed == {}
    assert [p.name for p in settings.readouts_dir.iterdir()] == [PIPELINE_FILE]
    assert read_pipeline_snapshot(settings.readouts_dir / PIPELINE_FILE).reachable


@pytest.mark.integration
def test_cli_publishes_on_an_empty_database_and_keeps_looping(
    tmp_path: Path, broker: LocalBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYMIREC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HYMIREC_BROKER_PORT", str(broker.port))
    monkeypatch.setenv("HYMIREC_EXPERIMENTS_FILE", str(write_config(tmp_path)))
    assert main(["readout", "--publish", "--once"]) == 0
    folder = tmp_path / "data" / "readouts"
    configured = [snapshot_filename(n) for n in [*DESIGN, IDLE]]
    assert sorted(p.name for p in folder.iterdir()) == sorted([PIPELINE_FILE, *configured])
    assert all(read_experiment_snapshot(folder / n).total_users == 0 for n in configured)

    settings = Settings(data_dir=tmp_path / "loop", broker_port=broker.port)
    stop, result, seen = threading.Event(), [], set()

    def publishes() -> int:
        path = settings.readouts_dir / PIPELINE_FILE
        if path.is_file():
            seen.add(read_pipeline_snapshot(path).generated_at_ms)
        return len(seen)

    thread = threading.Thread(
        target=lambda: result.append(run_publish_loop(settings, every_s=0.05, stop=stop)),
        daemon=True,
    )
    thread.start()
    try:
        wait_until(lambda: publishes() >= 3, 120, "three publishes on an empty database")
    finally:
        stop.set()
        thread.join(60)
    assert result == [0]
    assert [p.name for p in settings.readouts_dir.iterdir()] == [PIPELINE_FILE]


@pytest.mark.parametrize(
    ("argv", "content", "error"),
    [
        (["readout", "--publish", "--once"], None, "no such experiments file"),
        (["readout", "--publish"], "default_model: [", "not valid YAML"),
        (["sink", "--publish-readouts"], None, "no such experiments file"),
        (["readout", "split-70-30"], "default_model: nope\n", "unknown model 'nope'"),
    ],
)
def test_a_bad_experiments_file_fails_at_start(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    content: str | None,
    error: str,
) -> None:
    path = tmp_path / "experiments.yaml"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("HYMIREC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HYMIREC_BROKER_PORT", str(free_port()))  # no broker: never reached
    monkeypatch.setenv("HYMIREC_EXPERIMENTS_FILE", str(path))
    assert main(argv) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # failed before opening ClickHouse or Kafka
