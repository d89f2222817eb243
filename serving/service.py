"""The recommendation service's core: route the user, read the features, rank, log the exposure.

:meth:`RecommendationService.recommend` is synchronous and runs on a worker thread (the app keeps
the event loop free); every component it uses is safe to share between threads: the splitter and
loaded models are immutable (torch releases the GIL inside its kernels, and runs one intra-op
thread per call, ``torch.set_num_threads(1)``, so that concurrent requests use the cores instead
of oversubscribing them), the Feast client opens its SQLite connection for cross-thread use, and
the Kafka producer is thread-safe.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from abtest.experiments import HOLDOUT, load_experiments
from abtest.splitter import Splitter
from core.errors import BrokerError, ExperimentConfigError
from core.settings import Settings
from features.store import FeatureStoreClient
from model.checkpoint_registry import CheckpointRegistry
from model.data import build_catalog
from serving.exposure import Exposure, ExposureLog
from serving.features import UserFeatureReader
from serving.metrics import ServingMetrics
from serving.models import ModelPool, movielens_popularity

__all__ = ["MAX_K", "Recommendation", "RecommendationService", "UnknownExperiment"]

log = logging.getLogger(__name__)

MAX_K = 200  # the longest list one request may ask for


class UnknownExperiment(ExperimentConfigError):
    """``experiment=`` names no experiment of the config (answered 404)."""


@dataclass(frozen=True)
class Recommendation:
    """What ``GET /recommend`` answers (``serving.app.RecommendResponse`` is its schema)."""

    user_id: int
    items: list[int]
    experiment: str | None
    variant: str | None
    model: str
    model_version: str
    request_id: str
    cold_start: bool
    fallback: str | None
    params: dict[str, Any] = field(default_factory=dict)
    latency_ms: float = 0.0


class RecommendationService:
    """Everything a request needs, built once at start-up (:meth:`build`)."""

    def __init__(
        self,
        settings: Settings,
        splitter: Splitter,
        pool: ModelPool,
        features: UserFeatureReader,
        exposures: ExposureLog,
        metrics: ServingMetrics,
        hold: Callable[[int], None] | None = None,
    ) -> None:
        """``hold(user_id)``, when given, is called on the request's thread after its model
        version was chosen and before ranking: tests use it to keep a request in flight."""
        self.settings = settings
        self.splitter = splitter
        self.pool = pool
        self.features = features
        self.exposures = exposures
        self.metrics = metrics
        self.hold = hold
        metrics.track_load_failures(lambda: float(pool.load_failures))
        metrics.track_cache_lookups(pool.cache_lookups)

    @classmethod
    def build(
        cls, settings: Settings, hold: Callable[[int], None] | None = None
    ) -> RecommendationService:
        """Load the experiments, catalogue, Feast client, every served model's latest version
        and the exposure producer (errors name what is missing)."""
        torch.set_num_threads(1)
        config = load_experiments(settings.experiments_file)
        catalog = build_catalog(settings)
        metrics = ServingMetrics()
        pool = ModelPool(
            CheckpointRegistry(settings.registry_dir),
            catalog,
            config.models(),
            movielens_popularity(catalog),
            on_swap=metrics.model_swapped,
        )
        pool.refresh()
        features = UserFeatureReader(FeatureStoreClient(settings), catalog)
        features.rows.read([0])  # opens the online store now, not on a request
        exposures = ExposureLog(settings.kafka, on_failure=metrics.exposure_failed)
        return cls(settings, Splitter(config), pool, features, exposures, metrics, hold)

    def start(self) -> None:
        self.pool.start_polling(self.settings.serve.registry_poll_s)

    def close(self) -> None:
        self.pool.stop()
        self.exposures.close()

    def check_experiment(self, name: str) -> None:
        """UnknownExperiment naming the known experiments, unless ``name`` is one."""
        try:
            self.splitter.config.experiment(name)
        except ExperimentConfigError as exc:
            raise UnknownExperiment(str(exc)) from None

    def recommend(
        self,
        user_id: int,
        k: int,
        experiment: str | None = None,
        started: float | None = None,
    ) -> Recommendation:
        """The top ``k`` unseen items for the user from the model of their variant.

        ``experiment`` chooses which experiment's assignment the answer reports (the user's
        variant in it, or None when not in it); what is served does not change, since a user's
        variant in an experiment is the same whichever way it is asked. ``started`` is the
        ``time.perf_counter()`` at which the request arrived (for the logged latency).
        """
        start = time.perf_counter() if started is None else started
        route = self.splitter.route(user_id)
        reported = (route.experiment, route.variant)
        if experiment is not None:
            self.check_experiment(experiment)
            if not route.held_out:
                reported = (experiment, self.splitter.assign(experiment, user_id))
        history = self.features.read(user_id)
        wanted = self.pool.get(route.model)
        fallback = None
        if history is None:
            loaded, fallback = self.pool.popular(), "cold_start"
        elif wanted is None:
            loaded, fallback = self.pool.popular(), "model_unavailable"
        else:
            loaded = wanted
        if fallback is not None:
            self.metrics.fallback(fallback)
        if self.hold is not None:
            self.hold(user_id)
        items = loaded.rank(history, k)
        request_id = uuid.uuid4().hex
        latency_ms = (time.perf_counter() - start) * 1000
        if route.held_out:
            assignments: list[tuple[str | None, str | None]] = [(HOLDOUT, HOLDOUT)]
        else:
            assignments = list(route.layers.values()) or [(None, None)]
        try:
            self.exposures.log(
                Exposure(
                    user_id=user_id,
                    request_id=request_id,
                    items=items,
                    assignments=assignments,
                    model_version=loaded.version,
                    latency_ms=latency_ms,
                    ts_ms=time.time_ns() // 1_000_000,
                )
            )
        except BrokerError as exc:
            # The user still gets the list; the lost exposure is counted (here when it could
            # not be queued, by the exposure thread when the producer refused it) and the
            # readiness probe reports the broker until it acknowledges again.
            self.metrics.exposure_failed()
            log.error("request %s: exposure not logged: %s", request_id, exc)
        return Recommendation(
            user_id=user_id,
            items=items,
            experiment=reported[0],
            variant=reported[1],
            model=loaded.name,
            model_version=loaded.version,
            request_id=request_id,
            cold_start=history is None,
            fallback=fallback,
            params=dict(route.params),
            latency_ms=latency_ms,
        )

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, checks): Feast answers a read, exposures are acknowledged, and each served
        model has a version in service or is covered by the popularity fallback."""
        checks: dict[str, Any] = {}
        try:
            self.features.rows.read([0])
            checks["feature_store"] = "ok"
        except Exception as exc:  # any failure of the probe read means not ready
            checks["feature_store"] = f"error: {exc}"
        checks["exposures"] = (
            "ok" if self.exposures.check(timeout_s=2.0) else (f"error: {self.exposures.last_error}")
        )
        popular = self.pool.popular()
        models: dict[str, str] = {}
        for name in sorted(self.splitter.config.models()):
            loaded = self.pool.get(name)
            models[name] = (
                loaded.version
                if loaded is not None
                else f"no version yet: serving {popular.name} {popular.version}"
            )
        checks["models"] = models
        ready = checks["feature_store"] == "ok" and checks["exposures"] == "ok"
        return ready, checks

    def status(self) -> dict[str, Any]:
        """``GET /status``: each model version in service (the dashboard reads it)."""
        models = {name: loaded.describe() for name, loaded in self.pool.current().items()}
        prior = self.pool.prior
        return {
            "models": models,
            "fallback": prior.describe() | {"model": prior.name},
            "experiments": [e.name for e in self.splitter.config.experiments],
            "last_registry_poll_ms": self.pool.last_poll_ms,
        }
