"""What the dashboard says about its statistics: the prior, the p-value's scale, the fixed τ.

Streamlit's AppTest on the snapshots the real publisher wrote (``tests/dashboard/conftest.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from abtest.snapshot import read_experiment_snapshot, snapshot_filename
from tests.conftest import free_port
from tests.dashboard.conftest import BROKEN, Published

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def run_app(published: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    data_dir = tmp_path / "data"
    shutil.copytree(published.folder, data_dir / "readouts")
    monkeypatch.setenv("HYMIREC_DATA_DIR", str(data_dir))
    monkeypatch.setenv("HYMIREC_SERVE_PORT", str(free_port()))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    at = at.sidebar.radio[0].set_value(BROKEN).run()
    assert not at.exception
    return at


def test_dashboard_names_the_prior_the_scale_of_p_and_the_fixed_tau(
    published: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = run_app(published, tmp_path, monkeypatch)
    captions = [str(c.value) for c in at.caption]
    snap = read_experiment_snapshot(published.folder / snapshot_filename(BROKEN))
    assert snap.bayes_prior is not None and snap.bayes_prior.startswith("flat (improper) prior")
    assert any(snap.bayes_prior in c and "Chance to beat control" in c for c in captions)
    assert any("p tests the lift with the same standard error" in c for c in captions)
    assert any(
        "τ fixed once per metric, tuned to the planned horizon of 10,000 users per arm" in c
        for c in captions
    )
    conversion = next(s for s in snap.cumulative if s.metric == "conversion")
    assert any(f"τ = {conversion.tau:.3g}, the same fixed τ" in c for c in captions)

    # The table's interval is the lift's, beside the lift's p-value: they agree on significance.
    table = at.dataframe[0].value.set_index("metric")
    row = next(e for e in snap.effects if e.metric == "conversion")
    assert row.p_scale == "relative" and row.ci_rel_low is not None
    assert table.loc["conversion", "95% CI"] == (f"[{row.ci_rel_low:+.1%}, {row.ci_rel_high:+.1%}]")
    assert (row.p_value is not None and row.p_value < 0.05) == (row.ci_rel_low > 0)
