"""The sequential test across the publisher's looks, on real chdb: the state survives restarts.

Each ``publish_readouts`` call is one look (a fresh client each time, as a restarted publisher
opens one); between looks more users arrive. τ must stay the one fixed at the first look, the
p-value must be the running minimum of 1/Λ over the looks (Λ written out from the snapshot's own
effect and variance), the dashboard's confidence sequence must use the same τ, a plan that
changes τ must fail that experiment's publish, and ``hymirec readout NAME`` must read the state
without advancing it. An unknown experiment name is an error naming the ones that exist.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from abtest.clickhouse import analytics_client, insert_event_frame
from abtest.plans import ExperimentPlan
from abtest.publish import publish_readouts
from abtest.readout import experiment_readout
from abtest.sequential_looks import SequentialPlan
from abtest.snapshot import ExperimentSnapshot, read_experiment_snapshot, snapshot_filename
from core.settings import Settings
from hymirec.cli import main
from tests.dashboard.conftest import experiment_frame

NAME = "seq-looks"
ALPHA = 0.05


def p_of_one_look(effect: float, variance: float, tau: float) -> float:
    """min(1, 1/Λ), Λ = sqrt(V/(V+τ²))·exp(Δ²τ²/(2V(V+τ²))) (Johari et al. 2017)."""
    t2 = tau * tau
    log_lr = 0.5 * math.log(variance / (variance + t2)) + effect**2 * t2 / (
        2 * variance * (variance + t2)
    )
    return min(1.0, math.exp(-log_lr))


def publish(
    settings: Settings, plans: dict[str, ExperimentPlan] | None = None
) -> ExperimentSnapshot:
    with analytics_client(settings.clickhouse) as client:  # a fresh client: a restarted publisher
        report = publish_readouts(client, settings, plans=plans, with_pipeline=False)
    assert report.failed == {}, report.failed
    return read_experiment_snapshot(settings.readouts_dir / snapshot_filename(NAME))


@pytest.fixture(scope="module")
def looks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, list[ExperimentSnapshot]]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("sequential"))
    rng = np.random.default_rng(31)
    frame = experiment_frame(rng, NAME, rng.random(3000) < 0.5, 1, 1.0)
    batches = np.array_split(np.sort(frame["user_id"].unique()), 3)
    snaps = []
    for users in batches:
        with analytics_client(settings.clickhouse) as client:
            insert_event_frame(client, frame[frame["user_id"].isin(users)])
        snaps.append(publish(settings))
    return settings, snaps


@pytest.mark.integration
def test_tau_stays_fixed_and_the_p_value_is_the_running_minimum(
    looks: tuple[Settings, list[ExperimentSnapshot]],
) -> None:
    _, snaps = looks
    first = {(s.metric, s.treatment): s for s in snaps[0].sequential}
    assert {m for m, _ in first} >= {"conversion", "ctr", "clicks_per_user", "latency_ms"}
    running: dict[tuple[str, str], float] = {}
    for look, snap in enumerate(snaps, start=1):
        effects = {(e.metric, e.treatment): e for e in snap.effects}
        for state in snap.sequential:
            key = (state.metric, state.treatment)
            assert state.looks == look and state.tau == first[key].tau, key
            row = effects[key]
            assert row.effect_abs is not None and row.variance_abs is not None
            p_now = p_of_one_look(row.effect_abs, row.variance_abs, state.tau)
            running[key] = min(running.get(key, 1.0), p_now)
            assert state.p_value == pytest.approx(running[key], rel=1e-9), key
            assert row.p_sequential == state.p_value
        for series in snap.cumulative:  # the dashboard's band uses the same τ
            assert series.tau == first[(series.metric, series.treatment)].tau
    users = [s.total_users for s in snaps]
    assert users == sorted(users) and users[0] < users[-1]


@pytest.mark.integration
def test_a_changed_plan_fails_the_experiment_instead_of_changing_tau(
    looks: tuple[Settings, list[ExperimentSnapshot]],
) -> None:
    settings, snaps = looks
    changed = {NAME: ExperimentPlan(sequential=SequentialPlan(horizon_users_per_arm=123))}
    with analytics_client(settings.clickhouse) as client:
        report = publish_readouts(client, settings, plans=changed, with_pipeline=False)
    assert "horizon_users_per_arm changed from 10000 to 123" in report.failed[NAME]
    path = settings.readouts_dir / snapshot_filename(NAME)
    assert read_experiment_snapshot(path).sequential == snaps[-1].sequential  # left as it was


@pytest.mark.integration
def test_one_shot_readout_reads_the_state_without_advancing_it(
    looks: tuple[Settings, list[ExperimentSnapshot]],
) -> None:
    settings, snaps = looks
    readout = experiment_readout(settings, NAME)
    published = {(s.metric, s.treatment): s for s in snaps[-1].sequential}
    for state in readout.sequential:
        before = published[(state.metric, state.treatment)]
        assert (state.tau, state.looks) == (before.tau, before.looks + 1)
        assert state.p_value <= before.p_value
    path = settings.readouts_dir / snapshot_filename(NAME)
    assert read_experiment_snapshot(path).sequential == snaps[-1].sequential


@pytest.mark.integration
def test_readout_of_an_unknown_experiment_names_the_ones_that_exist(
    looks: tuple[Settings, list[ExperimentSnapshot]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    settings, _ = looks
    config = tmp_path / "experiments.yaml"
    config.write_text(
        "default_model: sasrec\nlayers: [{name: l, salt: l-salt}]\nexperiments:\n"
        "  - {name: planned-one, layer: l, salt: p-salt, range: [0, 1], variants: "
        "[{name: control, weight: 1}, {name: treatment, weight: 1}]}\n"
    )
    monkeypatch.setenv("HYMIREC_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("HYMIREC_EXPERIMENTS_FILE", str(config))
    assert main(["readout", "no-such-experiment"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'no-such-experiment'" in err
    assert "Configured: planned-one; with exposures: seq-looks" in err
    # A configured experiment without traffic yet is known: the error says what is missing.
    assert main(["readout", "planned-one"]) == 2
    err = capsys.readouterr().err
    assert "control variant 'control' has no exposed users in 'planned-one'" in err
    assert "unknown" not in err
