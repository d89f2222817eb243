"""The experiment dashboard (Streamlit, read-only): ``hymirec dashboard``.

It reads the readout snapshots that the publisher writes (``abtest.publish``), the model
registry's metadata and the service's ``/status``; it never queries ClickHouse. Settings come from
the ``HYMIREC_*`` environment, built once here at the edge.
"""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from abtest.snapshot import ExperimentSnapshot, PipelineSnapshot
from core.errors import HymirecError
from core.settings import Settings, load_settings
from dashboard import charts
from dashboard.data import (
    ReadoutFolder,
    cumulative_frame,
    effects_frame,
    fetch_service_status,
    freshness_age_frame,
    ground_truth_frame,
    lag_frame,
    load_readouts,
    load_registry,
    model_versions_frame,
    traffic_frame,
    training_lag_frame,
    true_lifts,
)

NO_DATA = (
    "No data yet: there are no readout snapshots in `{folder}`. Run `hymirec demo` (or run "
    "`hymirec sink --publish-readouts`, or `hymirec readout --publish` against a ClickHouse "
    "server) and reload."
)


def _pct(value: float | None, spec: str = "+.2%") -> str:
    return "-" if value is None or pd.isna(value) else format(value, spec)


def _num(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None or pd.isna(value) else format(value, spec)


def _age(now_ms: int, ts_ms: int) -> str:
    seconds = max(0.0, (now_ms - ts_ms) / 1000)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def show_srm(snap: ExperimentSnapshot) -> None:
    srm = snap.srm
    if srm is None:
        st.info("Sample ratio check needs at least two variants.")
        return
    counts = ", ".join(f"{a}={o}" for a, o in zip(srm.arms, srm.observed, strict=True))
    basis = "the configured weights" if srm.weights_configured else "an equal split"
    if srm.flagged:
        st.error(
            f"Sample ratio mismatch (SRM): users per variant ({counts}) do not match {basis} "
            f"(chi-square p = {srm.p_value:.2g} < {srm.threshold}). The assignment or the logging "
            "is broken: do not trust this experiment's effects until it is fixed."
        )
    else:
        st.success(f"Sample ratio OK: {counts} match {basis} (p = {srm.p_value:.3g}).")


def show_traffic(snap: ExperimentSnapshot) -> None:
    st.subheader("Traffic")
    if not snap.variants:
        st.info("No exposed users yet.")
        return
    show_srm(snap)
    columns = st.columns(max(1, len(snap.variants)))
    for column, v in zip(columns, snap.variants, strict=False):
        expected = "" if v.expected_share is None else f" (expected {v.expected_share:.1%})"
        column.metric(v.variant, f"{v.users:,} users", f"{v.share:.1%} of users{expected}", "off")
    left, right = st.columns(2)
    left.altair_chart(charts.traffic_chart(snap), width="stretch")
    traffic = traffic_frame(snap)
    if not traffic.empty:
        right.altair_chart(charts.traffic_over_time_chart(traffic), width="stretch")


def _shown_interval(row: pd.Series) -> str:
    """The interval on the scale of the row's p-value (the lift's, or the difference's)."""
    if row["p_scale"] == "absolute":
        return f"abs [{_num(row['ci_abs_low'])}, {_num(row['ci_abs_high'])}]"
    return f"[{_pct(row['ci_rel_low'], '+.1%')}, {_pct(row['ci_rel_high'], '+.1%')}]"


def show_effects(snap: ExperimentSnapshot, effects: pd.DataFrame) -> None:
    st.subheader("Effects")
    if "p_scale" not in effects:  # a snapshot written before the column existed
        effects = effects.assign(p_scale="relative")
    table = pd.DataFrame(
        {
            "metric": effects["metric"]
            + effects["guardrail"].map({True: " (guardrail)", False: ""}),
            "treatment": effects["treatment"],
            "method": effects["method"],
            "control": effects["control_mean"].map(_num),
            "treatment mean": effects["treatment_mean"].map(_num),
            "lift": effects["effect_rel"].map(_pct),
            f"{1 - snap.alpha:.0%} CI": [_shown_interval(r) for _, r in effects.iterrows()],
            "p": effects["p_value"].map(lambda p: _num(p, ".4f")),
            "p Holm": effects["p_holm"].map(lambda p: _num(p, ".4f")),
            "p BH": effects["p_bh"].map(lambda p: _num(p, ".4f")),
            "p sequential": effects["p_sequential"].map(lambda p: _num(p, ".4f")),
            "note": effects["message"].where(effects["message"] != "ok", ""),
        }
    )
    st.dataframe(table, hide_index=True, width="stretch")
    st.caption(
        "Lift = effect / control mean with a delta-method interval; p tests the lift with the "
        "same standard error (GrowthBook's convention), so p < α exactly when the interval "
        "excludes 0. Rows marked 'abs' (a zero control mean) test and show the absolute "
        "difference. Holm controls the family-wise error, Benjamini-Hochberg the false discovery "
        "rate, over all rows. " + sequential_note(snap)
    )
    if effects["effect_rel"].notna().any():
        st.altair_chart(charts.forest_chart(effects), width="stretch")


def sequential_note(snap: ExperimentSnapshot) -> str:
    """What the sequential p-value is and how its τ was fixed (from the snapshot's states)."""
    note = (
        "The sequential p-value (mSPRT, running minimum over the publisher's looks) stays valid "
        "however often you look"
    )
    states = snap.sequential
    if not states:
        return note + "; its τ is fixed once enough users have arrived."
    looks = max(s.looks for s in states)
    horizon = next((s.horizon_users_per_arm for s in states if s.horizon_users_per_arm), None)
    basis = (
        f"tuned to the planned horizon of {horizon:,} users per arm"
        if horizon
        else "stated in the experiments file"
    )
    return f"{note}: τ fixed once per metric, {basis}; {looks} look(s) so far."


def show_bayes(snap: ExperimentSnapshot, effects: pd.DataFrame) -> None:
    st.subheader("Bayesian view")
    if effects["chance_to_win"].notna().any():
        st.altair_chart(charts.bayes_chart(effects), width="stretch")
    prior = snap.bayes_prior or "a prior not recorded in this snapshot"
    st.caption(
        "Chance to beat control: the posterior probability that the treatment is better (lower, "
        f"for latency and errors), normal approximation on the lift, with a {prior}."
    )


def show_ground_truth(snap: ExperimentSnapshot) -> None:
    """The simulation's exact expected CTR per arm and minute; only a simulation has one."""
    truth = snap.ground_truth
    if truth is None:
        return
    st.subheader("Ground truth (simulation)")
    frame = ground_truth_frame(truth)
    if frame.empty:
        st.info("The simulation has not served a list in this experiment yet.")
        return
    st.altair_chart(charts.ground_truth_chart(frame), width="stretch")
    lines = []
    for lift in true_lifts(snap):
        line = f"`{lift.treatment}` vs `{snap.control}`: true CTR lift {_pct(lift.true_lift)}"
        if lift.measured is not None:
            line += (
                f"; the readout measured {_pct(lift.measured)} "
                f"[{_pct(lift.ci_low, '+.1%')}, {_pct(lift.ci_high, '+.1%')}]"
            )
        if lift.covered is not None:
            line += ", its CI covers the truth" if lift.covered else ", its CI misses the truth"
        lines.append(line)
    if lines:
        st.markdown("  \n".join(lines))
    st.caption(
        f"Ground truth, not a measurement: {truth.source}. Solid lines: the exact expected CTR of "
        "the lists each arm served per minute; dashed: the clicks the simulated users made on the "
        "same lists. True lift = treatment's expected CTR / control's − 1 over the whole run."
    )


def show_cumulative(snap: ExperimentSnapshot) -> None:
    st.subheader("Cumulative effect over time")
    if not snap.cumulative:
        st.info("Not enough users per arm yet for a cumulative chart.")
        return
    labels = [f"{s.metric} · {s.treatment}" for s in snap.cumulative]
    default = next((i for i, s in enumerate(snap.cumulative) if s.metric == "conversion"), 0)
    choice = st.selectbox("metric", labels, index=default, key=f"cumulative-{snap.experiment}")
    series = snap.cumulative[labels.index(choice)]
    st.altair_chart(
        charts.cumulative_chart(cumulative_frame(series), series.metric), width="stretch"
    )
    st.caption(
        f"Orange: fixed-horizon {1 - series.alpha:.0%} CI, valid for one look decided in advance. "
        "Blue: the always-valid confidence sequence (mSPRT normal mixture, "
        f"τ = {series.tau:.3g}, the same fixed τ as the table's sequential p-value), valid at "
        "every look at once. Users are added by first exposure."
    )


def show_guardrails(snap: ExperimentSnapshot) -> None:
    st.subheader("Guardrails")
    breached = [c for c in snap.guardrails.checks if c.breached]
    for check in breached:
        st.error(f"Guardrail breached: {check.detail}")
    if not breached:
        st.success("No guardrail breached.")
    if any(g.latency_p99_ms is not None for g in snap.guardrails.per_variant):
        st.altair_chart(charts.latency_chart(snap), width="stretch")
    rows = [g.model_dump() for g in snap.guardrails.per_variant]
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def show_experiment(snap: ExperimentSnapshot, settings: Settings) -> None:
    now_ms = int(time.time() * 1000)
    st.header(snap.experiment)
    st.caption(
        f"control `{snap.control}` · {snap.total_users:,} users "
        f"({snap.excluded_users} excluded: exposed to several variants) · snapshot "
        f"{_age(now_ms, snap.generated_at_ms)} old · training policy: {snap.training_policy}"
    )
    if now_ms - snap.generated_at_ms > 3_000 * max(settings.readout.publish_s, 10.0):
        st.warning("This snapshot is stale: is the sink (or `hymirec readout --publish`) running?")
    if snap.notes:
        st.caption(f"notes: {snap.notes}")
    show_traffic(snap)
    effects = effects_frame(snap)
    if effects.empty:
        st.info("No treatment with exposed users to compare yet.")
    else:
        show_effects(snap, effects)
        show_bayes(snap, effects)
    show_ground_truth(snap)
    show_cumulative(snap)
    show_guardrails(snap)


def show_models(settings: Settings) -> None:
    st.subheader("Models in service and their freshness")
    service = fetch_service_status(settings.serve.host, settings.serve.port)
    if not service.reachable:
        st.warning(f"Service not reachable at {service.url} ({service.error}).")
    registry = load_registry(settings.registry_dir)
    for history in registry:
        for version, problem in history.errors.items():
            st.error(f"{history.model}/{version}: unreadable metadata: {problem}")
    frame = model_versions_frame(registry, service, int(time.time() * 1000))
    if frame.empty:
        st.info(f"No model versions in `{settings.registry_dir}` yet.")
        return
    st.dataframe(frame, hide_index=True, width="stretch")
    st.caption(
        "newest ingest age: since the newest learned event entered Kafka. event→publish: "
        "trainer percentiles from Kafka ingest to the version's publish. event→served: "
        "for the version in service, its load time minus its newest event's ingest time."
    )


def show_pipeline(folder: ReadoutFolder) -> None:
    st.subheader("Pipeline health")
    if folder.pipeline_error:
        st.error(folder.pipeline_error)
    pipeline: PipelineSnapshot | None = folder.pipeline
    if pipeline is None:
        st.info("No pipeline snapshot yet.")
        return
    if not pipeline.reachable:
        st.warning(f"Kafka not reachable at {pipeline.bootstrap}: {pipeline.error}")
        return
    a, b, c = st.columns(3)
    a.metric("events/s", _num(pipeline.events_per_s, ".1f"))
    b.metric(f"records in {pipeline.events_topic}", _num(pipeline.events_end_offset, ",d"))
    c.metric("dead-letter records", _num(pipeline.dead_letter_records, ",d"))
    lags = lag_frame(pipeline)
    if not lags.empty and lags["lag"].notna().any():
        st.altair_chart(charts.lag_chart(lags), width="stretch")
    st.dataframe(lags, hide_index=True, width="stretch")


def show_freshness(folder: ReadoutFolder) -> None:
    """The freshness series of ``_pipeline.json``: does the trainer keep up with its stream?"""
    pipeline = folder.pipeline
    if pipeline is None or not pipeline.freshness:
        return
    ages, lags = freshness_age_frame(pipeline), training_lag_frame(pipeline)
    if ages.empty and lags.empty:
        return
    st.subheader("Freshness")
    left, right = st.columns(2)
    if not ages.empty:
        left.altair_chart(charts.freshness_age_chart(ages), width="stretch")
    if not lags.empty:
        right.altair_chart(charts.training_lag_chart(lags), width="stretch")
    st.caption(
        "Left: at each publish, how long ago the newest event that each model's latest version "
        "learned entered Kafka (serving loads the latest version). Right: the trainer's lag on "
        "the training topic, in samples it has not learned yet. A trainer that keeps up holds "
        "both low and flat."
    )


def render(settings: Settings, choice: str | None) -> None:
    folder = load_readouts(settings.readouts_dir)
    if folder.empty:
        st.info(NO_DATA.format(folder=settings.readouts_dir))
    elif choice in folder.experiments:
        show_experiment(folder.experiments[choice], settings)
    elif choice in folder.errors:
        st.error(f"Cannot show this experiment: {folder.errors[choice]}")
    show_models(settings)
    show_pipeline(folder)
    show_freshness(folder)


def main() -> None:
    st.set_page_config(page_title="hymirec experiments", layout="wide")
    st.title("hymirec experiments")
    try:
        settings = load_settings()
    except HymirecError as exc:
        st.error(str(exc))
        return
    folder = load_readouts(settings.readouts_dir)
    st.sidebar.header("Experiments")
    names = [*sorted(folder.experiments), *sorted(folder.errors)]
    flagged = {n for n, s in folder.experiments.items() if s.srm is not None and s.srm.flagged}

    def label(name: str) -> str:
        if name in folder.errors:
            return f"{name} (unreadable)"
        return f"⚠ {name} (SRM)" if name in flagged else name

    choice = st.sidebar.radio("experiment", names, format_func=label) if names else None
    auto = st.sidebar.toggle(f"auto-refresh every {settings.readout.publish_s:g} s", value=False)
    st.sidebar.button("Reload")
    st.fragment(render, run_every=settings.readout.publish_s if auto else None)(settings, choice)


main()
