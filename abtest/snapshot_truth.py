"""The closed-loop simulator's ground truth as it appears in a readout snapshot.

Part of the snapshot schema (``abtest.snapshot`` re-exports these models): only a simulation knows
the truth (``abtest.ground_truth`` records and reads it); a real deployment has none.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["GroundTruth", "TruthPoint", "VariantTruth"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class VariantTruth(_Frozen):
    """A variant's served lists: the simulator's exact expected clicks beside the clicks made.

    ``expected_clicks`` sums, over the lists, the expected clicks of the list for its user under
    the simulated response model; like gbstats' sufficient statistics, two of these add up.
    """

    variant: str
    requests: int = Field(ge=0)
    impressions: int = Field(ge=0)
    expected_clicks: float = Field(ge=0)
    clicks: int = Field(ge=0)

    @property
    def expected_ctr(self) -> float | None:
        """Exact expected clicks per impression (None without impressions)."""
        return self.expected_clicks / self.impressions if self.impressions else None

    @property
    def ctr(self) -> float | None:
        """Observed clicks per impression of the same lists (None without impressions)."""
        return self.clicks / self.impressions if self.impressions else None

    def plus(self, other: VariantTruth) -> VariantTruth:
        """The sums of both (the variant name is this one's)."""
        return VariantTruth(
            variant=self.variant,
            requests=self.requests + other.requests,
            impressions=self.impressions + other.impressions,
            expected_clicks=self.expected_clicks + other.expected_clicks,
            clicks=self.clicks + other.clicks,
        )


class TruthPoint(VariantTruth):
    """One variant's lists served in the wall-clock minute that starts at ``minute_start_ms``."""

    minute_start_ms: int


class GroundTruth(_Frozen):
    """The closed-loop simulator's truth about one experiment, per variant and minute.

    ``source`` says what the truth is. A real deployment has none; the readout is judged
    against it in a simulation (DESIGN.md: its interval should cover ``true_lift``).
    """

    experiment: str
    generated_at_ms: int
    source: str
    points: list[TruthPoint]

    @property
    def totals(self) -> dict[str, VariantTruth]:
        """Per variant, the sums over all its minutes."""
        totals: dict[str, VariantTruth] = {}
        for point in self.points:
            before = totals.get(point.variant)
            totals[point.variant] = (
                VariantTruth(**point.model_dump(exclude={"minute_start_ms"}))
                if before is None
                else before.plus(point)
            )
        return totals

    def true_lift(self, control: str, treatment: str) -> float | None:
        """Treatment's expected CTR over control's, minus one: the lift the readout should find.

        None when either arm has no impressions or control's expected CTR is zero.
        """
        totals = self.totals
        if control not in totals or treatment not in totals:
            return None
        base, other = totals[control].expected_ctr, totals[treatment].expected_ctr
        if base is None or other is None or base == 0:
            return None
        return other / base - 1.0
