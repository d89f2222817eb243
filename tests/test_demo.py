"""`hymirec demo`, briefly, on the real components: exposures and outcomes for both arms land in
ClickHouse, and the readout has every section."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from abtest.clickhouse import open_client, query_df
from abtest.readout import format_readout
from hymirec.demo import EXPERIMENT, run_demo
from hymirec.settings import Settings
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_the_loop_and_reads_out_both_arms(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        serve_port=free_port(),
        dashboard_port=free_port(),
        sim_rate_per_s=15.0,
        sim_users=150,
        trainer_publish_every_s=5.0,
        readout_publish_s=5.0,
    )
    result = run_demo(settings, duration_s=45.0, warm_events=3000, keep_dashboard=False)
    readout = result.readout
    # Both arms were served and both clicked on.
    stats = result.stats
    assert set(stats.variants) == {"control", "treatment"}  # type: ignore[attr-defined]
    client = open_client(settings)
    try:
        rows = query_df(
            client,
            "SELECT variant, event_type, count() AS n FROM events FINAL "
            "WHERE experiment = {experiment:String} GROUP BY variant, event_type",
            {"experiment": EXPERIMENT},
        )
    finally:
        client.close()
    counts = {(r.variant, r.event_type): int(r.n) for r in rows.itertuples()}
    for variant in ("control", "treatment"):
        assert counts.get((variant, "impression"), 0) > 100, counts
        assert counts.get((variant, "click"), 0) > 0, counts
    # Every section of the readout: users per arm, the SRM check, every metric with its
    # interval, p-values (raw, Holm, BH), the Bayesian view and the sequential p-value.
    assert set(readout.users) == {"control", "treatment"}  # type: ignore[attr-defined]
    assert readout.srm is not None  # type: ignore[attr-defined]
    metrics = set(readout.table["metric"])  # type: ignore[attr-defined]
    assert {"ctr", "clicks_per_user", "conversion", "genres_consumed"} <= metrics
    text = format_readout(readout)  # type: ignore[arg-type]
    for column in ("lift CI", "p_holm", "p_bh", "P(win)", "p_seq", "sample ratio"):
        assert column in text
    # The dashboard's snapshot was published by the sink while the demo ran.
    assert any(settings.readouts_dir.glob("*.json"))
