"""The demo's last lines: the readout's CTR lift judged against the simulator's true lift, in
every case the verdict distinguishes (found, missed, false positive, wrong direction, CI covers
or misses), with the true lift computed by hand from the recorded expected clicks."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from abtest.ground_truth import GroundTruth, TruthPoint
from hymirec.demo import truth_verdict


def truth(control_ctr: float, treatment_ctr: float) -> GroundTruth:
    """1,000 impressions per arm over two minutes with the given expected CTRs."""
    points = [
        TruthPoint(
            variant=variant,
            minute_start_ms=minute,
            requests=50,
            impressions=500,
            expected_clicks=500 * ctr,
            clicks=0,
        )
        for variant, ctr in (("control", control_ctr), ("treatment", treatment_ctr))
        for minute in (0, 60_000)
    ]
    return GroundTruth(experiment="x", generated_at_ms=0, source="test", points=points)


def readout(lift: float, low: float, high: float, p_holm: float) -> SimpleNamespace:
    table = pd.DataFrame(
        [
            {"metric": "ctr", "control": "control", "treatment": "treatment",
             "effect_rel": lift, "ci_rel_low": low, "ci_rel_high": high, "p_holm": p_holm},
            {"metric": "clicks_per_user", "control": "control", "treatment": "treatment",
             "effect_rel": 0.9, "ci_rel_low": 0.8, "ci_rel_high": 1.0, "p_holm": 0.001},
        ]
    )  # fmt: skip
    return SimpleNamespace(table=table)


@pytest.mark.parametrize(
    ("scenario", "ctrs", "measured", "favours", "test", "covers"),
    [
        # +20% true (0.06 / 0.05), found, covered.
        ("hymirec-vs-sasrec", (0.05, 0.06), (0.21, 0.06, 0.36, 0.01), "treatment",
         "the test found it", "covers"),
        # Control better (-20%), not significant, the interval misses the truth.
        ("hymirec-vs-sasrec", (0.05, 0.04), (0.05, -0.10, 0.20, 0.60), "control",
         "the test did not find it (not enough power)", "does not cover"),
        # Significant, but in the wrong direction.
        ("popular-vs-sasrec", (0.05, 0.06), (-0.15, -0.25, -0.05, 0.01), "treatment",
         "the test found the opposite direction", "does not cover"),
        # A/A: one model in both arms; a significant result is a false positive.
        ("aa", (0.05, 0.0502), (0.12, 0.02, 0.22, 0.03), "neither (one model in both arms",
         "the test found a difference (a false positive)", "does not cover"),
        ("aa", (0.05, 0.0502), (0.01, -0.09, 0.11, 0.90), "neither (one model in both arms",
         "the test found no difference (correct)", "covers"),
    ],
)  # fmt: skip
def test_verdict(scenario, ctrs, measured, favours, test, covers) -> None:
    lines = truth_verdict(readout(*measured), truth(*ctrs), scenario)  # type: ignore[arg-type]
    assert len(lines) == 2  # the CTR row only
    true_lift = ctrs[1] / ctrs[0] - 1
    assert f"true lift {100 * true_lift:+.1f}%" in lines[0]
    assert f"measured CTR lift {100 * measured[0]:+.1f}%" in lines[0]
    assert f"the truth favours {favours}" in lines[1]
    assert f"; {test};" in lines[1]
    assert f"the CI {covers} the true lift" in lines[1]


def test_no_truth_and_an_arm_without_lists() -> None:
    assert "no ground truth" in truth_verdict(readout(0.1, 0, 0.2, 0.5), None, "aa")[0]  # type: ignore[arg-type]
    one_arm = GroundTruth(
        experiment="x",
        generated_at_ms=0,
        source="test",
        points=[t for t in truth(0.05, 0.06).points if t.variant == "control"],
    )
    lines = truth_verdict(readout(0.1, 0, 0.2, 0.5), one_arm, "aa")  # type: ignore[arg-type]
    assert lines == [lines[0]] and "no true lift (an arm had no lists)" in lines[0]
