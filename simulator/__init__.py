"""The closed-loop user simulator: multi-interest users who ask the recommendation service for
lists and click or play what suits their current interests (the online ground truth).

``population`` is the pure model (users, drift, the click model, ground-truth measures);
``client`` drives it against the service over HTTP and writes outcomes to the events topic.
"""

from simulator.clusters import ItemClusters, spherical_kmeans
from simulator.population import (
    SIM_USER_ID_BASE,
    Arrival,
    ClickModel,
    Diversity,
    ExpectedOutcomes,
    Interests,
    Outcome,
    SimulatedPopulation,
    poisson_arrivals,
)

__all__ = [
    "SIM_USER_ID_BASE",
    "Arrival",
    "ClickModel",
    "Diversity",
    "ExpectedOutcomes",
    "Interests",
    "ItemClusters",
    "Outcome",
    "SimulatedPopulation",
    "poisson_arrivals",
    "spherical_kmeans",
]
