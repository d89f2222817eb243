"""The simulator's adapter loop against a real HTTP server and the real broker.

A small Starlette app, served by uvicorn on a free port, answers ``/recommend`` the way the
recommendation service does (a seeded random list, experiment ``sim-test`` with variants by user id
parity, a fresh request id) and records every answer; ``mode`` switches it to load shedding, 4xx,
garbage and other faults. The outcome events are read back from the broker and checked against
those recorded answers and the simulator's counters.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
import uvicorn
from kafka import KafkaConsumer, TopicPartition
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from core.errors import SimulatorError
from core.settings import Settings
from hymirec.cli import main
from simulator.client import run_simulation
from simulator.population import SIM_USER_ID_BASE
from streaming.kafka_io import ensure_topics
from streaming.schema import Event, parse_event
from tests.conftest import EMBEDDING_CACHE, free_port, wait_until

pytestmark = pytest.mark.integration


class FakeService:
    """What the simulator sees of the recommendation service, plus a record of its answers."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.mode = "ok"
        self.rng = np.random.default_rng(0)
        self.served: dict[str, dict] = {}
        self.calls = 0
        self.on_call: Callable[[int], None] | None = None

    async def recommend(self, request: Request) -> Response:
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        user_id, k = int(request.query_params["user_id"]), int(request.query_params["k"])
        mode = self.mode
        if mode == "alternate":
            mode = "shed" if self.calls % 2 else "ok"
        if mode == "shed":
            return PlainTextResponse("overloaded: too many requests in flight", 503)
        if mode == "not_found":
            return PlainTextResponse("no model serves experiment 'sim-test'", 404)
        if mode == "garbage":
            return Response(b"<html>oops</html>", 200, media_type="text/html")
        items = [int(i) for i in self.rng.choice(np.arange(1, 1683), k, replace=False)]
        body = {
            "user_id": 1 if mode == "wrong_user" else user_id,
            "items": [999_999, *items[1:]] if mode == "unknown_item" else items,
            "experiment": "sim-test",
            "variant": "treatment" if user_id % 2 else "control",
            "model": "random",
            "model_version": "v1",
            "request_id": uuid.uuid4().hex,
        }
        if mode == "missing_field":
            del body["request_id"]
        else:
            self.served[body["request_id"]] = body
        return JSONResponse(body)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[FakeService, int]]:
    fake, port = FakeService(), free_port()
    app = Starlette(routes=[Route("/recommend", fake.recommend)])
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 20, "the fake service to listen")
    yield fake, port
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def service(fake_server: tuple[FakeService, int]) -> FakeService:
    fake_server[0].reset()
    return fake_server[0]


@pytest.fixture
def settings(make_settings: Callable[..., Settings], fake_server) -> Settings:
    built = make_settings(serve_port=fake_server[1], sim_rate_per_s=50.0, sim_seed=5, sim_drift=0.0)
    ensure_topics(built.kafka)
    return built


def read_events(settings: Settings, timeout_s: float = 30) -> list[Event]:
    """Every record of the events topic (all acknowledged before this is called)."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    partitions = [
        TopicPartition(settings.kafka.events_topic, p)
        for p in range(settings.kafka.events_topic_partitions)
    ]
    consumer.assign(partitions)
    total = sum(consumer.end_offsets(partitions).values())
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < total and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    consumer.close()
    assert len(records) == total
    return [parse_event(r.value, settings.kafka.max_event_bytes) for r in records]


def check_events_match(events: list[Event], service: FakeService, stats) -> None:
    """Each outcome event carries its response's ids and item; counts equal the counters."""
    assert len({e.event_id for e in events}) == len(events)
    kinds = Counter(e.event_type for e in events)
    assert set(kinds) <= {"click", "play"}  # never impressions: the service logs those
    assert kinds["click"] == stats.clicks and kinds["play"] == stats.plays
    clicks = {(e.request_id, e.position) for e in events if e.event_type == "click"}
    for event in events:
        body = service.served[event.request_id]
        assert event.user_id == body["user_id"]
        assert event.item_id == body["items"][event.position]
        assert (event.experiment, event.variant, event.model_version) == (
            body["experiment"],
            body["variant"],
            body["model_version"],
        )
        if event.event_type == "play":
            assert (event.request_id, event.position) in clicks
    per_variant = Counter((e.variant, e.event_type) for e in events)
    for name, arm in stats.variants.items():
        assert (per_variant[(name, "click")], per_variant[(name, "play")]) == (
            arm.clicks,
            arm.plays,
        )


def test_outcomes_reach_the_events_topic(settings, service, population):
    stats = run_simulation(settings, None, max_requests=150, paced=False, population=population)
    assert (stats.requests, stats.served, stats.shed, stats.errors) == (150, 150, 0, 0)
    assert service.calls == 150 and len(service.served) == 150
    events = read_events(settings)
    check_events_match(events, service, stats)
    assert stats.clicks > 0 and stats.plays > 0
    # Ground truth per variant, recomputed from the recorded answers (no drift: time is moot).
    for name in ("control", "treatment"):
        bodies = [b for b in service.served.values() if b["variant"] == name]
        arm = stats.variants[name]
        assert arm.requests == len(bodies) and arm.impressions == 10 * len(bodies)
        truth = [
            population.expected_ctr(b["user_id"] - SIM_USER_ID_BASE, b["items"], 0.0)
            for b in bodies
        ]
        assert arm.expected_ctr == pytest.approx(np.mean(truth), rel=1e-12)
        # Consumed diversity: distinct clusters among each user's clicked items, by hand.
        clusters_by_user: dict[int, set[int]] = {}
        for e in events:
            if e.variant == name and e.event_type == "click":
                label = int(population.clusters.labels[e.item_id - 1])
                clusters_by_user.setdefault(e.user_id, set()).add(label)
        assert len(arm.clicked) == len(clusters_by_user)
        assert arm.mean_clusters_consumed(population) == pytest.approx(
            np.mean([len(s) for s in clusters_by_user.values()])
        )
    expected_clicks = sum(10 * v.expected_ctr * v.requests for v in stats.variants.values())
    assert abs(stats.clicks - expected_clicks) < 5 * np.sqrt(expected_clicks)
    assert all(
        SIM_USER_ID_BASE <= b["user_id"] < SIM_USER_ID_BASE + 200 for b in service.served.values()
    )


def test_load_shedding_is_counted_not_fatal(settings, service, population):
    service.mode = "shed"
    stats = run_simulation(
        settings, None, max_requests=25, paced=False, population=population, backoff_s=0
    )
    assert (stats.requests, stats.shed, stats.served, stats.errors, stats.clicks) == (
        25,
        25,
        0,
        0,
        0,
    )
    assert read_events(settings) == []
    service.reset()
    service.mode = "alternate"  # every other request is shed; the others are served
    stats = run_simulation(
        settings, None, max_requests=40, paced=False, population=population, backoff_s=0
    )
    assert (stats.requests, stats.shed, stats.served, stats.errors) == (40, 20, 20, 0)
    check_events_match(read_events(settings), service, stats)


@pytest.mark.parametrize(
    ("mode", "kind", "message"),
    [
        ("not_found", "http_404", "no model serves experiment 'sim-test'"),
        ("garbage", "bad_response", "<body>: Invalid JSON"),
        ("missing_field", "bad_response", "request_id: Field required"),
        (
            "wrong_user",
            "bad_response",
            r"answered user 1 with 10 items \(asked for user 1\d{5}, at most 10 items\)",
        ),
        ("unknown_item", "unknown_item", r"unknown item ids \[999999\]"),
    ],
)
def test_bad_answers_are_counted_with_a_clear_message(
    settings, service, population, caplog, mode, kind, message
):
    service.mode = mode
    stats = run_simulation(settings, None, max_requests=12, paced=False, population=population)
    assert (stats.requests, stats.errors, stats.served, stats.shed) == (12, 12, 0, 0)
    assert stats.error_kinds == Counter({kind: 12})
    assert re.search(message, stats.last_error[kind]), stats.last_error[kind]
    logged = [r for r in caplog.records if r.name == "simulator.client" and kind in r.message]
    assert len(logged) == 5  # the first five of a kind are logged, then every hundredth
    assert read_events(settings) == []


def test_unreachable_service_is_a_clear_error(make_settings, population):
    settings = make_settings(serve_port=free_port())  # nothing listens there
    ensure_topics(settings.kafka)
    with pytest.raises(SimulatorError, match=r"did not answer for .* is it running on"):
        run_simulation(
            settings,
            None,
            max_requests=5,
            paced=False,
            population=population,
            connect_timeout_s=0.3,
        )
    assert read_events(settings) == []


def test_transport_faults_after_contact(settings, population):
    """Through an injected transport: read errors are counted and the loop goes on; a service
    that stops answering altogether past the deadline is an error."""
    calls = Counter()

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] > 1 and calls["n"] % 3 == 0:
            raise httpx.ReadError("connection reset", request=request)
        if calls["n"] > 30:
            raise httpx.ConnectError("connection refused", request=request)
        user_id = int(request.url.params["user_id"])
        return httpx.Response(
            200,
            json={
                "user_id": user_id,
                "items": [1, 2, 3],
                "experiment": None,
                "variant": None,
                "model": "m",
                "model_version": "v",
                "request_id": f"r{calls['n']}",
            },
        )

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        stats = run_simulation(
            settings, None, max_requests=24, paced=False, population=population, http_client=client
        )
        assert (stats.requests, stats.served, stats.errors) == (24, 16, 8)
        assert stats.error_kinds == Counter({"transport_ReadError": 8})
        assert set(stats.variants) == {"(none)"}
        with pytest.raises(SimulatorError, match="stopped answering"):
            run_simulation(
                settings,
                None,
                paced=False,
                population=population,
                http_client=client,
                connect_timeout_s=0.2,
                backoff_s=0.01,
            )


def test_sigterm_stops_cleanly_and_flushes(settings, service, population):
    previous = signal.getsignal(signal.SIGTERM)
    service.on_call = lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == 12 else None
    stats = run_simulation(settings, None, paced=False, population=population)  # no limit
    assert 12 <= stats.requests <= 13 and stats.requests == service.calls
    assert signal.getsignal(signal.SIGTERM) is previous
    check_events_match(read_events(settings), service, stats)


def test_paced_run_keeps_to_the_arrival_clock(settings, service, population):
    stats = run_simulation(settings, 0.3, population=population)  # 50 requests/s, paced
    assert stats.requests == service.calls > 0
    assert stats.simulated_s <= 0.3
    assert stats.elapsed_s >= stats.simulated_s  # never ahead of the arrivals' schedule


def test_cli_simulate(settings, service, monkeypatch, capsys):
    for name, value in {
        "DATA_DIR": settings.data_dir,
        "CACHE_DIR": EMBEDDING_CACHE,
        "KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "KAFKA_EVENTS_TOPIC": settings.kafka.events_topic,
        "SERVE_PORT": settings.serve.port,
        "SIM_DRIFT": 0.0,
    }.items():
        monkeypatch.setenv(f"HYMIREC_{name}", str(value))
    argv = ["simulate", "--duration", "2", "--rate", "40", "--users", "30", "--seed", "2"]
    assert main([*argv, "--population", "text-clusters", "--unpaced"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"simulator stopped: {service.calls} requests \({service.calls} served", out)
    users = {b["user_id"] for b in service.served.values()}
    assert users and all(SIM_USER_ID_BASE <= u < SIM_USER_ID_BASE + 30 for u in users)
    events = read_events(settings)
    assert len(events) == sum(int(n) for n in re.findall(r"(\d+) (?:clicks|plays)", out)[:2])
    # The default population: the ML-100K users themselves (ids 1..943).
    service.served.clear()
    assert main(["simulate", "--duration", "2", "--rate", "40", "--unpaced"]) == 0
    users = {b["user_id"] for b in service.served.values()}
    assert users and all(1 <= u <= 943 for u in users)
