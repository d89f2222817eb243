"""Altair (vega-lite) charts of the dashboard; each takes a frame from ``dashboard.data``."""

from __future__ import annotations

import altair as alt
import pandas as pd

from abtest.snapshot import ExperimentSnapshot
from dashboard.data import EXPECTED, OBSERVED

__all__ = [
    "FRESHNESS_AGE_TITLE",
    "GROUND_TRUTH_TITLE",
    "TRAINING_LAG_TITLE",
    "bayes_chart",
    "cumulative_chart",
    "forest_chart",
    "freshness_age_chart",
    "ground_truth_chart",
    "lag_chart",
    "latency_chart",
    "traffic_chart",
    "traffic_over_time_chart",
    "training_lag_chart",
]

VERDICT_COLORS = alt.Scale(
    domain=["better", "worse", "not significant"], range=["#2e7d32", "#c62828", "#757575"]
)


def traffic_chart(snap: ExperimentSnapshot) -> alt.LayerChart:
    """Users per variant (bars) against what the weights expect (black ticks)."""
    total = snap.total_users
    frame = pd.DataFrame(
        [
            {
                "variant": v.variant,
                "users": v.users,
                "expected": None if v.expected_share is None else v.expected_share * total,
            }
            for v in snap.variants
        ]
    )
    bars = (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("users:Q", title="included users"),
            y=alt.Y("variant:N", title=None),
            color=alt.Color("variant:N", legend=None),
            tooltip=["variant", "users", alt.Tooltip("expected:Q", format=".0f")],
        )
    )
    ticks = (
        alt.Chart(frame)
        .mark_tick(color="black", thickness=3, size=30)
        .encode(x="expected:Q", y="variant:N")
    )
    chart: alt.LayerChart = (bars + ticks).properties(height=40 + 40 * len(frame))
    return chart


def traffic_over_time_chart(traffic: pd.DataFrame) -> alt.Chart:
    chart: alt.Chart = (
        alt.Chart(traffic)
        .mark_line(point=False)
        .encode(
            x=alt.X("time:T", title="first exposure"),
            y=alt.Y("users:Q", title="cumulative users"),
            color="variant:N",
            tooltip=["variant", "users", "time:T"],
        )
        .properties(height=220)
    )
    return chart


def forest_chart(effects: pd.DataFrame) -> alt.LayerChart:
    """Relative lift of every metric × treatment with its confidence interval."""
    data = effects.dropna(subset=["effect_rel", "ci_rel_low", "ci_rel_high"])
    base = alt.Chart(data).encode(
        y=alt.Y("label:N", title=None, sort=None, axis=alt.Axis(labelLimit=300))
    )
    intervals = base.mark_rule(strokeWidth=2).encode(
        x=alt.X(
            "ci_rel_low:Q",
            title="relative lift (treatment / control − 1)",
            axis=alt.Axis(format="%"),
        ),
        x2="ci_rel_high:Q",
        color=alt.Color("verdict:N", scale=VERDICT_COLORS, title="Holm-adjusted"),
    )
    points = base.mark_point(filled=True, size=80).encode(
        x="effect_rel:Q",
        color=alt.Color("verdict:N", scale=VERDICT_COLORS),
        tooltip=[
            "metric",
            "treatment",
            "method",
            alt.Tooltip("effect_rel:Q", format="+.2%"),
            alt.Tooltip("ci_rel_low:Q", format="+.2%"),
            alt.Tooltip("ci_rel_high:Q", format="+.2%"),
            alt.Tooltip("p_value:Q", format=".4f"),
            alt.Tooltip("p_holm:Q", format=".4f"),
        ],
    )
    zero = alt.Chart(pd.DataFrame({"x": [0.0]})).mark_rule(strokeDash=[4, 4]).encode(x="x:Q")
    chart: alt.LayerChart = (zero + intervals + points).properties(height=40 + 28 * len(data))
    return chart


def bayes_chart(effects: pd.DataFrame) -> alt.LayerChart:
    """Chance that the treatment is better, per metric (95 % and 5 % marked)."""
    data = effects.dropna(subset=["chance_to_win"])
    bars = (
        alt.Chart(data)
        .mark_bar()
        .encode(
            x=alt.X(
                "chance_to_win:Q",
                title="chance to beat control",
                scale=alt.Scale(domain=[0, 1]),
                axis=alt.Axis(format="%"),
            ),
            y=alt.Y("label:N", title=None, sort=None, axis=alt.Axis(labelLimit=300)),
            color=alt.Color(
                "chance_to_win:Q",
                scale=alt.Scale(scheme="redyellowgreen", domain=[0, 1]),
                legend=None,
            ),
            tooltip=[
                "metric",
                "treatment",
                alt.Tooltip("chance_to_win:Q", format=".1%"),
                alt.Tooltip("expected_loss:Q", format=".4f", title="risk (expected loss)"),
            ],
        )
    )
    marks = (
        alt.Chart(pd.DataFrame({"x": [0.05, 0.95]}))
        .mark_rule(strokeDash=[4, 4], color="black")
        .encode(x="x:Q")
    )
    chart: alt.LayerChart = (bars + marks).properties(height=40 + 28 * len(data))
    return chart


def cumulative_chart(points: pd.DataFrame, metric: str) -> alt.LayerChart:
    """The cumulative effect with the fixed-horizon CI (dark) inside the confidence sequence."""
    base = alt.Chart(points).encode(x=alt.X("time:T", title="users first exposed up to"))
    sequence = base.mark_area(opacity=0.25, color="#1565c0").encode(
        y=alt.Y("cs_low:Q", title=f"effect on {metric} (treatment − control)"),
        y2="cs_high:Q",
    )
    fixed = base.mark_area(opacity=0.35, color="#ef6c00").encode(y="ci_low:Q", y2="ci_high:Q")
    line = base.mark_line(color="black", point=True).encode(
        y="effect:Q",
        tooltip=[
            "time:T",
            alt.Tooltip("effect:Q", format=".4g"),
            alt.Tooltip("ci_low:Q", format=".4g", title="CI low"),
            alt.Tooltip("ci_high:Q", format=".4g", title="CI high"),
            alt.Tooltip("cs_low:Q", format=".4g", title="sequence low"),
            alt.Tooltip("cs_high:Q", format=".4g", title="sequence high"),
            "n_control",
            "n_treatment",
        ],
    )
    zero = alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(strokeDash=[4, 4]).encode(y="y:Q")
    chart: alt.LayerChart = (sequence + fixed + zero + line).properties(height=300)
    return chart


GROUND_TRUTH_TITLE = "Expected CTR per minute (simulation's ground truth)"


def ground_truth_chart(frame: pd.DataFrame) -> alt.Chart:
    """Per variant, the exact expected CTR of the lists served each minute (solid) beside the
    observed CTR of the same lists (dashed); ``frame`` from ``dashboard.data.ground_truth_frame``.
    """
    chart: alt.Chart = (
        alt.Chart(frame, title=GROUND_TRUTH_TITLE)
        .mark_line(point=True)
        .encode(
            x=alt.X("time:T", title="minute served"),
            y=alt.Y("ctr:Q", title="CTR (clicks per shown item)", axis=alt.Axis(format=".1%")),
            color=alt.Color("variant:N"),
            strokeDash=alt.StrokeDash(
                "series:N",
                title=None,
                scale=alt.Scale(domain=[EXPECTED, OBSERVED], range=[[1, 0], [4, 4]]),
            ),
            opacity=alt.Opacity(
                "series:N",
                legend=None,
                scale=alt.Scale(domain=[EXPECTED, OBSERVED], range=[1.0, 0.5]),
            ),
            tooltip=[
                "variant",
                "series",
                "time:T",
                alt.Tooltip("ctr:Q", format=".4f"),
                "requests",
                "impressions",
            ],
        )
        .properties(height=280)
    )
    return chart


def latency_chart(snap: ExperimentSnapshot) -> alt.Chart:
    """p50 and p99 request latency per variant."""
    rows = [
        {"variant": g.variant, "percentile": name, "latency_ms": value}
        for g in snap.guardrails.per_variant
        for name, value in (("p50", g.latency_p50_ms), ("p99", g.latency_p99_ms))
        if value is not None
    ]
    chart: alt.Chart = (
        alt.Chart(pd.DataFrame(rows))
        .mark_bar()
        .encode(
            x=alt.X("latency_ms:Q", title="request latency (ms)"),
            y=alt.Y("variant:N", title=None),
            yOffset="percentile:N",
            color=alt.Color("percentile:N", scale=alt.Scale(range=["#90caf9", "#1565c0"])),
            tooltip=["variant", "percentile", alt.Tooltip("latency_ms:Q", format=".1f")],
        )
        .properties(height=60 + 50 * len(snap.guardrails.per_variant))
    )
    return chart


def lag_chart(lags: pd.DataFrame) -> alt.Chart:
    """Consumer lag (records) per group."""
    chart: alt.Chart = (
        alt.Chart(lags.dropna(subset=["lag"]))
        .mark_bar()
        .encode(
            x=alt.X("lag:Q", title="records behind the end of the topic"),
            y=alt.Y("group:N", title=None),
            tooltip=["group", "topic", "lag", "committed partitions"],
        )
        .properties(height=140)
    )
    return chart


FRESHNESS_AGE_TITLE = "Newest learned event's age, latest version per model"
TRAINING_LAG_TITLE = "Trainer lag on the training topic"


def freshness_age_chart(ages: pd.DataFrame) -> alt.Chart:
    """Per model, how old the newest event its latest version learned was at each publish;
    ``ages`` from ``dashboard.data.freshness_age_frame``."""
    chart: alt.Chart = (
        alt.Chart(ages, title=FRESHNESS_AGE_TITLE)
        .mark_line(point=True)
        .encode(
            x=alt.X("time:T", title="publish"),
            y=alt.Y("newest event age s:Q", title="age (s)"),
            color=alt.Color("model:N"),
            tooltip=[
                "model",
                "version",
                "time:T",
                alt.Tooltip("newest event age s:Q", format=".1f"),
                alt.Tooltip("event→publish p99 s:Q", format=".1f"),
            ],
        )
        .properties(height=220)
    )
    return chart


def training_lag_chart(lags: pd.DataFrame) -> alt.Chart:
    """The trainer group's lag (samples) on the training topic at each publish."""
    chart: alt.Chart = (
        alt.Chart(lags, title=TRAINING_LAG_TITLE)
        .mark_line(point=True)
        .encode(
            x=alt.X("time:T", title="publish"),
            y=alt.Y("lag:Q", title="samples not yet learned"),
            tooltip=["time:T", "lag"],
        )
        .properties(height=220)
    )
    return chart
