"""The recommendation service (``hymirec serve``): route, read features, rank, log exposures."""

from serving.app import RecommendResponse, create_app
from serving.server import ServerThread, run_service
from serving.service import MAX_K, Recommendation, RecommendationService, UnknownExperiment

__all__ = [
    "MAX_K",
    "RecommendResponse",
    "Recommendation",
    "RecommendationService",
    "ServerThread",
    "UnknownExperiment",
    "create_app",
    "run_service",
]
