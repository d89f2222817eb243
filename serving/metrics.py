"""The service's Prometheus metrics, exposed as text by a collector of our own.

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
- ``hymirec_model_load_failures``: registry versions that failed to load (the old one stayed);
- ``hymirec_interest_cache_lookups_total{model, result}``: rankings whose user interests came
  from the cache (``hit``: the user's history had not changed since they were computed) or were
  computed (``miss``), over every version of the model served so far.

Why not prometheus_client's ``Counter``/``Histogram`` objects: importing ``feast.metrics`` sets
``PROMETHEUS_MULTIPROCESS_DIR`` in the process environment, which switches those classes to
values in shared per-process files keyed by metric name, so two services in one process (tests)
would add into each other's series. Plain counters behind a lock, turned into metric families at
scrape time, do not depend on that.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from serving.models import LoadedModel

__all__ = ["CONTENT_TYPE_LATEST", "LATENCY_BUCKETS_S", "NONE_LABEL", "ServingMetrics"]

NONE_LABEL = "none"
LATENCY_BUCKETS_S = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip

Labels = tuple[str, ...]


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total_s: float = 0.0

    def observe(self, value_s: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, value_s)] += 1
        self.total_s += value_s

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class ServingMetrics:
    """Counters updated by the request path and the registry poller; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[Labels] = Counter()
        self._latency: dict[Labels, _Histogram] = {}
        self._fallbacks: Counter[str] = Counter()
        self._swaps: Counter[str] = Counter()
        self._versions: dict[str, str] = {}
        self._shed = 0
        self._inflight = 0
        self._exposure_failures = 0
        self._load_failures: Callable[[], float] = lambda: 0.0
        self._cache_lookups: Callable[[], dict[str, tuple[int, int]]] = dict
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def track_load_failures(self, read: Callable[[], float]) -> None:
        self._load_failures = read

    def track_cache_lookups(self, read: Callable[[], dict[str, tuple[int, int]]]) -> None:
        """``read()`` gives (hits, misses) of the interest cache per model."""
        self._cache_lookups = read

    def model_swapped(self, old: LoadedModel | None, new: LoadedModel) -> None:
        with self._lock:
            self._versions[new.name] = new.version
            self._swaps[new.name] += 1

    def observe(
        self, experiment: str | None, variant: str | None, status: int, latency_s: float | None
    ) -> None:
        labels = (experiment or NONE_LABEL, variant or NONE_LABEL)
        with self._lock:
            self._requests[(*labels, str(status))] += 1
            if latency_s is not None:
                self._latency.setdefault(labels, _Histogram()).observe(latency_s)

    def shed(self) -> None:
        with self._lock:
            self._shed += 1

    def inflight(self, delta: int) -> None:
        with self._lock:
            self._inflight += delta

    def fallback(self, reason: str) -> None:
        with self._lock:
            self._fallbacks[reason] += 1

    def exposure_failed(self) -> None:
        with self._lock:
            self._exposure_failures += 1

    def collect(self) -> Iterator[Metric]:
        """The metric families as of now (called by the registry at each scrape)."""
        with self._lock:
            requests = CounterMetricFamily(
                "hymirec_recommend_requests",
                "Recommendation requests answered, by assignment and HTTP status",
                labels=["experiment", "variant", "status"],
            )
            for labels, count in sorted(self._requests.items()):
                requests.add_metric(labels, count)
            latency = HistogramMetricFamily(
                "hymirec_recommend_latency_seconds",
                "Latency of served recommendation requests (arrival to response)",
                labels=["experiment", "variant"],
            )
            for labels, histogram in sorted(self._latency.items()):
                latency.add_metric(list(labels), histogram.cumulative(), histogram.total_s)
            fallbacks = CounterMetricFamily(
                "hymirec_recommend_fallback",
                "Popularity served instead of the variant's model, by reason",
                labels=["reason"],
            )
            for reason, count in sorted(self._fallbacks.items()):
                fallbacks.add_metric([reason], count)
            versions = GaugeMetricFamily(
                "hymirec_model_version_info",
                "1 for each model version in service",
                labels=["model", "version"],
            )
            swaps = CounterMetricFamily(
                "hymirec_model_swaps",
                "Model versions swapped in (first load included)",
                labels=["model"],
            )
            for model, version in sorted(self._versions.items()):
                versions.add_metric([model, version], 1)
                swaps.add_metric([model], self._swaps[model])
            scalars: list[Metric] = [
                CounterMetricFamily(
                    "hymirec_recommend_shed",
                    "Requests refused with 503: too many in flight",
                    value=self._shed,
                ),
                GaugeMetricFamily(
                    "hymirec_recommend_inflight",
                    "Recommendation requests in progress",
                    value=self._inflight,
                ),
                CounterMetricFamily(
                    "hymirec_exposure_failures",
                    "Responses whose impressions could not be queued",
                    value=self._exposure_failures,
                ),
            ]
        yield from (requests, latency, fallbacks, versions, swaps, *scalars)
        yield GaugeMetricFamily(
            "hymirec_model_load_failures",
            "Registry versions that failed to load",
            value=self._load_failures(),
        )
        lookups = CounterMetricFamily(
            "hymirec_interest_cache_lookups",
            "Rankings whose user interests came from the cache (hit) or were computed (miss)",
            labels=["model", "result"],
        )
        for model, (hits, misses) in sorted(self._cache_lookups().items()):
            lookups.add_metric([model, "hit"], hits)
            lookups.add_metric([model, "miss"], misses)
        yield lookups

    def render(self) -> bytes:
        return generate_latest(self.registry)
