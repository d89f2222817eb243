"""The experiments ``hymirec demo --scenario`` runs, and the closed-loop benchmark replays.

Each scenario maps variant names to the model each variant serves; the experiment is named after
the scenario. ``aa`` serves one model in both arms, so its true effect is exactly zero.
"""

from __future__ import annotations

__all__ = ["SCENARIOS"]

SCENARIOS: dict[str, dict[str, str]] = {
    "aa": {"control": "sasrec", "treatment": "sasrec"},
    "popular-vs-sasrec": {"control": "popular", "treatment": "sasrec"},
    "hymirec-vs-sasrec": {"control": "sasrec", "treatment": "hymirec"},
    "all-models": {
        "control": "sasrec",
        "treatment": "hymirec",
        "hstu": "hstu",
        "persrec": "persrec",
        "fuxi-mme": "fuxi_mme",
    },
}
