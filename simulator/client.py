"""The simulator's adapter loop: simulated users ask the recommendation service for lists over
HTTP and their clicks and plays go to the events topic.

Every served list's exact expected CTR (the ground truth) is also recorded per experiment, variant
and minute and written to ``settings.ground_truth_dir`` every ``progress_every_s`` and at the end;
the readout publisher puts it into the snapshot (``abtest.ground_truth``).

Each Poisson arrival (``settings.sim.rate_per_s``) is one request ``GET /recommend?user_id=U&k=K``
by a simulated user. The service logs the impressions itself; the simulator only writes what the
user did (``click`` and ``play`` events, tagged with the response's experiment, variant, request id
and model version and the item's 0-based position). Simulated time is the arrival clock, so a
paced run and an unpaced (``paced=False``) run of the same seed see the same users at the same
simulated times; event timestamps are the wall clock.

Failures never stop the loop: a 503 (load shedding) is counted as ``shed`` and backs off; other
HTTP errors, transport errors and unreadable answers are counted by kind in ``errors`` and logged.
Only a service that does not answer at all for ``connect_timeout_s`` (at start-up or later) is a
:class:`~core.errors.SimulatorError`. SIGINT/SIGTERM stop the loop cleanly and the producer is
flushed.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from abtest.ground_truth import GroundTruthRecorder
from core.errors import SimulatorError
from core.settings import Settings
from simulator.population import SimulatedPopulation, poisson_arrivals
from streaming.kafka_io import EventProducer
from streaming.schema import Event, EventType

__all__ = [
    "RecommendResponse",
    "SimulationStats",
    "VariantStats",
    "load_population",
    "run_simulation",
]

log = logging.getLogger(__name__)

NO_VARIANT = "(none)"  # the variant key of responses outside any experiment
_MAX_BACKOFF_S = 1.0


def load_population(settings: Settings, num_clusters: int = 30) -> SimulatedPopulation:
    """The simulated users of ``settings.sim.population`` over the ML-100K catalogue.

    ``movielens`` (the default): the 943 ML-100K users, their tastes fitted on their ratings
    (``simulator.grounded``; the fit is cached in ``settings.embedding_cache_dir``).
    ``text-clusters``: ``sim_users`` new users over clusters of the items' MiniLM text
    embeddings (cached there too; the first call computes them, about a minute on CPU)."""
    if settings.sim.population == "movielens":
        from core.movielens import load_ratings
        from simulator.grounded import grounded_population

        return grounded_population(
            load_ratings(),
            seed=settings.sim.seed,
            drift_per_hour=settings.sim.drift,
            cache_dir=settings.embedding_cache_dir,
        )
    from features.item_embeddings import embed_movielens_items

    item_ids, embeddings = embed_movielens_items(
        settings.embedding_cache_dir, batch_size=settings.features.embedding_batch_size
    )
    return SimulatedPopulation(
        embeddings,
        item_ids,
        num_users=settings.sim.users,
        interests_per_user=settings.sim.interests,
        drift_per_hour=settings.sim.drift,
        seed=settings.sim.seed,
        num_clusters=num_clusters,
    )


class RecommendResponse(BaseModel):
    """The service's answer to ``GET /recommend``; fields the simulator does not use are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    user_id: int
    items: list[int] = Field(max_length=10_000)
    experiment: str | None = Field(default=None, min_length=1, max_length=128)
    variant: str | None = Field(default=None, min_length=1, max_length=128)
    model: str
    model_version: str = Field(min_length=1, max_length=128)
    request_id: str = Field(min_length=1, max_length=128)


@dataclass
class VariantStats:
    """What one variant served and what the simulated users did with it."""

    requests: int = 0
    impressions: int = 0
    clicks: int = 0
    plays: int = 0
    expected_ctr_sum: float = 0.0  # ground truth: sum over requests of the list's expected CTR
    clicked: dict[int, list[int]] = field(default_factory=dict)  # user index -> clicked item ids

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.0

    @property
    def expected_ctr(self) -> float:
        """Mean over requests of the exact expected CTR of the served list (what the arm should
        get, free of click noise)."""
        return self.expected_ctr_sum / self.requests if self.requests else 0.0

    def mean_clusters_consumed(self, population: SimulatedPopulation) -> float:
        """Mean over users who clicked of the number of distinct item clusters they clicked."""
        if not self.clicked:
            return 0.0
        counts = [
            population.consumed_diversity(items).distinct_clusters
            for items in self.clicked.values()
        ]
        return float(np.mean(counts))


@dataclass
class SimulationStats:
    """Counters of one run. ``requests == served + shed + errors``."""

    requests: int = 0
    served: int = 0
    clicks: int = 0
    plays: int = 0
    shed: int = 0
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    last_error: dict[str, str] = field(default_factory=dict)  # kind -> latest message
    variants: dict[str, VariantStats] = field(default_factory=dict)
    simulated_s: float = 0.0
    elapsed_s: float = 0.0

    def summary(self) -> str:
        head = (
            f"{self.requests} requests ({self.served} served, {self.shed} shed, {self.errors} "
            f"errors) in {self.elapsed_s:.1f} s; {self.clicks} clicks, {self.plays} plays"
        )
        arms = [
            f"{name}: ctr {v.ctr:.4f} (expected {v.expected_ctr:.4f}) over {v.requests} requests"
            for name, v in sorted(self.variants.items())
        ]
        kinds = [f"{kind}={count}" for kind, count in sorted(self.error_kinds.items())]
        return "; ".join([head, *arms] + ([f"errors: {', '.join(kinds)}"] if kinds else []))


class _Loop:
    """One run's state: the HTTP client, producer, counters and the stop flag."""

    def __init__(
        self,
        settings: Settings,
        population: SimulatedPopulation,
        http: httpx.Client,
        producer: EventProducer,
        stop: threading.Event,
        k: int,
        connect_timeout_s: float,
        backoff_s: float,
    ) -> None:
        self.url = f"http://{settings.serve.host}:{settings.serve.port}/recommend"
        self.population, self.http, self.producer, self.stop = population, http, producer, stop
        self.k, self.connect_timeout_s, self.backoff_s = k, connect_timeout_s, backoff_s
        self.stats = SimulationStats()
        self.truth = GroundTruthRecorder()
        self.last_contact = time.monotonic()  # the start counts as contact for the deadline
        self.contacted = False
        self.consecutive_shed = 0

    def error(self, kind: str, message: str) -> None:
        stats = self.stats
        stats.errors += 1
        stats.error_kinds[kind] += 1
        stats.last_error[kind] = message
        count = stats.error_kinds[kind]
        if count <= 5 or count % 100 == 0:
            log.warning("simulator: %s (%d so far): %s", kind, count, message)

    def get(self, user_id: int) -> httpx.Response | None:
        """The service's answer; ``None`` after a counted transport error or a stop."""
        params = {"user_id": user_id, "k": self.k}
        while not self.stop.is_set():
            try:
                response = self.http.get(self.url, params=params)
            except httpx.TransportError as exc:
                silent_s = time.monotonic() - self.last_contact
                if silent_s > self.connect_timeout_s:
                    state = "stopped answering" if self.contacted else "did not answer"
                    raise SimulatorError(
                        f"the recommendation service at {self.url} {state} for "
                        f"{silent_s:.1f} s ({type(exc).__name__}: {exc}); is it running on "
                        "HYMIREC_SERVE_HOST:HYMIREC_SERVE_PORT?"
                    ) from exc
                if not self.contacted and isinstance(exc, httpx.ConnectError):
                    # Still starting: the request never reached it, so retry the same one.
                    self.stop.wait(max(self.backoff_s, 0.05))
                    continue
                self.stats.requests += 1
                self.error(f"transport_{type(exc).__name__}", f"{exc} ({self.url})")
                self.stop.wait(self.backoff_s)
                return None
            self.contacted, self.last_contact = True, time.monotonic()
            self.stats.requests += 1
            return response
        return None

    def parse(self, response: httpx.Response, user_id: int) -> RecommendResponse | None:
        if response.status_code == 503:
            self.stats.shed += 1
            self.consecutive_shed += 1
            self.stop.wait(min(self.backoff_s * 2 ** (self.consecutive_shed - 1), _MAX_BACKOFF_S))
            return None
        self.consecutive_shed = 0
        if response.status_code != 200:
            self.error(f"http_{response.status_code}", response.text[:300])
            return None
        try:
            body = RecommendResponse.model_validate_json(response.content)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            self.error("bad_response", f"GET {response.url}: {problems}")
            return None
        if body.user_id != user_id or len(body.items) > self.k:
            self.error(
                "bad_response",
                f"GET {response.url}: answered user {body.user_id} with {len(body.items)} items "
                f"(asked for user {user_id}, at most {self.k} items)",
            )
            return None
        return body

    def serve(self, user: int, t_s: float, rng: np.random.Generator) -> None:
        """One request by user index ``user`` at simulated time ``t_s``."""
        user_id = self.population.user_id(user)
        response = self.get(user_id)
        if response is None:
            return
        body = self.parse(response, user_id)
        if body is None:
            return
        try:
            expected_ctr = self.population.expected_ctr(user, body.items, t_s)
        except SimulatorError as exc:
            self.error("unknown_item", str(exc))
            return
        outcomes = self.population.respond(user, body.items, t_s, rng)
        arm = self.stats.variants.setdefault(body.variant or NO_VARIANT, VariantStats())
        arm.requests += 1
        arm.impressions += len(body.items)
        arm.expected_ctr_sum += expected_ctr
        self.stats.served += 1
        now_ms = time.time_ns() // 1_000_000
        if body.experiment is not None:
            self.truth.record(
                body.experiment,
                body.variant or NO_VARIANT,
                now_ms,
                len(body.items),
                expected_ctr * len(body.items),
                sum(o.clicked for o in outcomes),
            )
        for outcome in outcomes:
            happened: tuple[tuple[EventType, bool], ...] = (
                ("click", outcome.clicked),
                ("play", outcome.played),
            )
            for kind in (kind for kind, did in happened if did):
                self.producer.send(
                    Event(
                        event_id=uuid.uuid4(),
                        user_id=user_id,
                        item_id=outcome.item_id,
                        event_type=kind,
                        ts_ms=now_ms,
                        experiment=body.experiment,
                        variant=body.variant,
                        request_id=body.request_id,
                        model_version=body.model_version,
                        position=outcome.position,
                    )
                )
            if outcome.clicked:
                arm.clicks += 1
                self.stats.clicks += 1
                arm.clicked.setdefault(user, []).append(outcome.item_id)
            if outcome.played:
                arm.plays += 1
                self.stats.plays += 1


def _install_stop_signals(stop: threading.Event) -> dict[int, Any]:
    """SIGINT/SIGTERM set ``stop`` (main thread only); returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("simulator: signal %d, stopping", signum)
        stop.set()

    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    return previous


def _check_limits(
    settings: Settings, duration_s: float | None, max_requests: int | None, k: int
) -> None:
    if duration_s is not None and not duration_s > 0:
        raise SimulatorError(f"duration_s must be > 0 or None; got {duration_s}")
    if max_requests is not None and max_requests < 1:
        raise SimulatorError(f"max_requests must be >= 1 or None; got {max_requests}")
    if not 1 <= k <= 10_000:
        raise SimulatorError(f"k must be in 1..10000; got {k}")
    if settings.sim.seed < 0:
        raise SimulatorError(f"HYMIREC_SIM_SEED must be >= 0; got {settings.sim.seed}")


def run_simulation(
    settings: Settings,
    duration_s: float | None,
    *,
    max_requests: int | None = None,
    k: int = 10,
    paced: bool = True,
    population: SimulatedPopulation | None = None,
    http_client: httpx.Client | None = None,
    producer: EventProducer | None = None,
    stop: threading.Event | None = None,
    connect_timeout_s: float = 30.0,
    backoff_s: float = 0.05,
    progress_every_s: float = 5.0,
) -> SimulationStats:
    """Run simulated users against the service until ``duration_s`` simulated seconds have
    passed, ``max_requests`` requests were made, or ``stop`` is set (SIGINT/SIGTERM set it);
    ``None`` for both limits runs until stopped. ``paced=False`` sends the arrivals back to back
    (tests, load). ``http_client`` and ``producer`` are used as given and not closed."""
    _check_limits(settings, duration_s, max_requests, k)
    population = population or load_population(settings)
    stop = stop or threading.Event()
    arrivals_rng, response_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(settings.sim.seed).spawn(2)
    )
    own_http = http_client is None
    http = http_client or httpx.Client(timeout=httpx.Timeout(10.0, connect=2.0))
    own_producer = producer is None
    sink = producer or EventProducer(settings.kafka)
    loop = _Loop(settings, population, http, sink, stop, k, connect_timeout_s, backoff_s)
    previous = _install_stop_signals(stop)
    started = time.monotonic()
    next_progress = started + progress_every_s
    log.info(
        "simulator: %d users, %.1f requests/s%s, k=%d, against %s",
        population.num_users,
        settings.sim.rate_per_s,
        "" if paced else " (unpaced)",
        k,
        loop.url,
    )
    try:
        for arrival in poisson_arrivals(
            settings.sim.rate_per_s, population.num_users, arrivals_rng
        ):
            if duration_s is not None and arrival.t_s > duration_s:
                break
            if max_requests is not None and loop.stats.requests >= max_requests:
                break
            if paced:
                stop.wait(max(0.0, started + arrival.t_s - time.monotonic()))
            if stop.is_set():
                break
            loop.serve(arrival.user, arrival.t_s, response_rng)
            loop.stats.simulated_s = arrival.t_s
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + progress_every_s
                log.info("simulator: t=%.0f s: %s", arrival.t_s, loop.stats.summary())
                loop.truth.write(settings.ground_truth_dir)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        loop.stats.elapsed_s = time.monotonic() - started
        loop.truth.write(settings.ground_truth_dir)
        try:
            sink.flush()
        finally:
            if own_producer:
                sink.close()
            if own_http:
                http.close()
    log.info("simulator: done: %s", loop.stats.summary())
    return loop.stats
