"""The service's Prometheus metrics, in a registry of its own (several apps can share a process).

- ``hymirec_recommend_requests_total{experiment, variant, status}``: answered requests (``none``
  where a request has no assignment, e.g. a 422 before the user was routed);
- ``hymirec_recommend_latency_seconds{experiment, variant}``: histogram of served requests;
- ``hymirec_recommend_shed_total``: requests answered 503 because too many were in flight;
- ``hymirec_recommend_inflight``: requests in progress now;
- ``hymirec_recommend_fallback_total{reason}``: popularity served instead of the variant's model
  (``cold_start``: no history online; ``model_unavailable``: no version published yet);
- ``hymirec_exposure_failures_total``: responses whose impressions could not be queued;
- ``hymirec_model_version_info{model, version}``: 1 for each registry version in service;
- ``hymirec_model_swaps_total{model}``: versions swapped in (the first load included);
- ``hymirec_model_load_failures``: registry versions that failed to load (the old one stayed).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from serving.models import LoadedModel

__all__ = ["CONTENT_TYPE_LATEST", "NONE_LABEL", "ServingMetrics"]

NONE_LABEL = "none"
_LATENCY_BUCKETS_S = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "hymirec_recommend_requests",
            "Recommendation requests answered, by assignment and HTTP status",
            ["experiment", "variant", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "hymirec_recommend_latency_seconds",
            "Latency of served recommendation requests (handler start to response)",
            ["experiment", "variant"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.shed = Counter(
            "hymirec_recommend_shed", "Requests refused with 503: too many in flight", registry=r
        )
        self.inflight = Gauge(
            "hymirec_recommend_inflight", "Recommendation requests in progress", registry=r
        )
        self.fallbacks = Counter(
            "hymirec_recommend_fallback",
            "Popularity served instead of the variant's model, by reason",
            ["reason"],
            registry=r,
        )
        self.exposure_failures = Counter(
            "hymirec_exposure_failures", "Responses whose impressions could not be queued", registry=r
        )
        self.model_info = Gauge(
            "hymirec_model_version_info",
            "1 for each model version in service",
            ["model", "version"],
            registry=r,
        )
        self.swaps = Counter(
            "hymirec_model_swaps", "Model versions swapped in (first load included)", ["model"],
            registry=r,
        )  # fmt: skip
        self.load_failures = Gauge(
            "hymirec_model_load_failures", "Registry versions that failed to load", registry=r
        )

    def track_load_failures(self, read: Callable[[], float]) -> None:
        self.load_failures.set_function(read)

    def model_swapped(self, old: LoadedModel | None, new: LoadedModel) -> None:
        if old is not None:
            self.model_info.remove(old.name, old.version)
        self.model_info.labels(new.name, new.version).set(1)
        self.swaps.labels(new.name).inc()

    def observe(
        self, experiment: str | None, variant: str | None, status: int, latency_s: float | None
    ) -> None:
        labels = (experiment or NONE_LABEL, variant or NONE_LABEL)
        self.requests.labels(*labels, str(status)).inc()
        if latency_s is not None:
            self.latency.labels(*labels).observe(latency_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
