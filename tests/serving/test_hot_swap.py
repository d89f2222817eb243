"""Hot swaps under load, in-flight requests across a swap, bad versions, and load shedding, on
the real service (uvicorn on a thread), registry, Feast store and broker."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from abtest.experiments import load_experiments
from abtest.splitter import Splitter
from features.item_features import load_item_features
from model.training.online import StreamRecord
from serving import MAX_K, RecommendationService, ServerThread, create_app
from streaming.schema import TrainingSample
from tests.conftest import wait_until
from tests.serving.conftest import CHUNK, TRAIN_RATINGS, World, history_row, training_records

pytestmark = pytest.mark.integration


@dataclass
class Running:
    world: World
    service: RecommendationService
    client: httpx.Client
    splitter: Splitter

    def user(self, variant: str, index: int = 0) -> int:
        route = self.splitter.route
        users = [u for u in sorted(self.world.histories) if route(u).variant == variant]
        return users[index]

    def metric(self, family: str, sample: str, **labels: str) -> float:
        text = self.client.get("/metrics").text
        for metric in text_string_to_metric_families(text):
            if metric.name == family:
                for s in metric.samples:
                    if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                        return float(s.value)
        return 0.0


@pytest.fixture
def run_service(make_world: Callable[..., World]) -> Iterator[Callable[..., Running]]:
    started: list[tuple[ServerThread, httpx.Client]] = []

    def start(hold: Callable[[int], None] | None = None, **overrides: Any) -> Running:
        world = make_world(**overrides)
        service = RecommendationService.build(world.settings, hold=hold)
        server = ServerThread(create_app(service)).start()
        client = httpx.Client(base_url=server.url, timeout=60)
        started.append((server, client))
        splitter = Splitter(load_experiments(world.settings.experiments_file))
        return Running(world, service, client, splitter)

    yield start
    for server, client in started:
        client.close()
        server.stop()


@dataclass
class Hold:
    """Keeps one user's requests inside the handler until released."""

    user: int
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def __call__(self, user_id: int) -> None:
        if user_id == self.user:
            self.entered.set()
            assert self.release.wait(60), "the test never released the held request"


def background_get(running: Running, user: int) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def call() -> None:
        with httpx.Client(base_url=str(running.client.base_url), timeout=60) as client:
            out["response"] = client.get("/recommend", params={"user_id": user})

    thread = threading.Thread(target=call)
    thread.start()
    return thread, out


def number(version: str) -> int:
    return int(version.removeprefix("v"))


def test_versions_published_under_load_swap_in_without_a_failed_request(
    run_service: Callable[..., Running],
) -> None:
    running = run_service(serve_registry_poll_s=0.05)
    users = [running.user("control", i) for i in range(3)] + [
        running.user("treatment", i) for i in range(3)
    ]
    stop = threading.Event()
    seen: dict[int, list[tuple[int, str, str]]] = {w: [] for w in range(4)}  # thread -> results
    errors: list[str] = []

    def hammer(worker: int) -> None:
        with httpx.Client(base_url=str(running.client.base_url), timeout=60) as client:
            i = worker
            while not stop.is_set():
                user = users[i % len(users)]
                i += 1
                try:
                    response = client.get("/recommend", params={"user_id": user, "k": 5})
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                body = response.json()
                seen[worker].append(
                    (response.status_code, body.get("model", ""), body.get("model_version", ""))
                )

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    catalog = running.world.catalog()
    trainers = {name: running.world.trainer(name, catalog) for name in ("sasrec", "hymirec")}
    published: dict[str, list[str]] = {name: [] for name in trainers}
    try:
        for round_ in range(4):
            records = training_records(TRAIN_RATINGS + round_ * CHUNK, CHUNK)
            for name, trainer in trainers.items():
                assert trainer.learn(records) > 0
                version = trainer.publish(running.world.registry, "training", keep=2).version
                published[name].append(version)

            def served_everywhere(round_: int = round_) -> bool:
                wanted = {name: versions[round_] for name, versions in published.items()}
                answered = {(m, v) for rows in list(seen.values()) for _, m, v in list(rows)}
                return all((m, v) in answered for m, v in wanted.items())

            wait_until(served_everywhere, 120, f"round {round_}'s versions served", every_s=0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not errors
    results = [row for rows in seen.values() for row in rows]
    assert results and {status for status, _, _ in results} == {200}
    for rows in seen.values():
        for name in trainers:
            numbers = [number(v) for _, m, v in rows if m == name]
            assert numbers == sorted(numbers), f"{name} went backwards: {numbers}"
    for name, versions in published.items():
        assert versions == [f"v{n:06d}" for n in range(2, 6)]
        assert running.metric("hymirec_model_swaps", "hymirec_model_swaps_total", model=name) == 5
    assert running.service.pool.load_failures == 0


def test_a_request_in_flight_keeps_the_version_it_started_with(
    run_service: Callable[..., Running],
) -> None:
    hold = Hold(user=-1)
    # two ranking threads: one is held, the other answers (whatever the machine's CPU count)
    running = run_service(hold=hold, serve_registry_poll_s=3600, serve_threads=2)
    hold.user = running.user("control", 0)
    old = running.world.registry.latest_version("sasrec")
    thread, out = background_get(running, hold.user)
    assert hold.entered.wait(60)
    catalog = running.world.catalog()
    trainer = running.world.trainer("sasrec", catalog)
    trainer.learn(training_records(TRAIN_RATINGS, CHUNK))
    new = trainer.publish(running.world.registry, "training", keep=1)
    assert not (running.world.registry.model_dir("sasrec") / str(old)).exists()  # pruned
    assert [loaded.version for loaded in running.service.pool.refresh()] == [new.version]
    other = running.client.get("/recommend", params={"user_id": running.user("control", 1)})
    assert other.json()["model_version"] == new.version
    hold.release.set()
    thread.join(60)
    held = out["response"]
    assert held.status_code == 200
    assert (held.json()["model"], held.json()["model_version"]) == ("sasrec", old)


def test_a_version_that_fails_to_load_is_counted_and_the_old_one_keeps_serving(
    run_service: Callable[..., Running],
) -> None:
    running = run_service(serve_registry_poll_s=3600)
    registry = running.world.registry
    old = registry.latest_version("sasrec")

    def write_garbage(folder: Any) -> dict[str, Any]:
        (folder / "model.pt").write_bytes(b"not a checkpoint")
        return {}

    trainer = running.world.trainer("sasrec", running.world.catalog())
    broken = registry.publish("sasrec", write_garbage, keep=100)
    assert running.service.pool.refresh() == []
    assert running.service.pool.load_failures == 1
    user = running.user("control", 0)
    body = running.client.get("/recommend", params={"user_id": user}).json()
    assert body["model_version"] == old != broken.version
    assert running.metric("hymirec_model_load_failures", "hymirec_model_load_failures") == 1
    good = trainer.publish(registry, "training", keep=100)
    assert [loaded.version for loaded in running.service.pool.refresh()] == [good.version]
    body = running.client.get("/recommend", params={"user_id": user}).json()
    assert body["model_version"] == good.version


def test_requests_beyond_the_in_flight_limit_are_shed_with_503(
    run_service: Callable[..., Running],
) -> None:
    hold = Hold(user=-1)
    running = run_service(hold=hold, serve_max_inflight=1)
    hold.user = running.user("treatment", 0)
    thread, out = background_get(running, hold.user)
    assert hold.entered.wait(60)
    shed = running.client.get("/recommend", params={"user_id": running.user("control", 0)})
    assert shed.status_code == 503
    assert shed.headers["Retry-After"] == "1"
    assert shed.json()["detail"] == "overloaded: 1 requests in progress (limit 1); retry shortly"
    assert running.client.get("/health/live").status_code == 200
    assert running.metric("hymirec_recommend_shed", "hymirec_recommend_shed_total") == 1
    assert running.metric("hymirec_recommend_inflight", "hymirec_recommend_inflight") == 1
    hold.release.set()
    thread.join(60)
    assert out["response"].status_code == 200
    after = running.client.get("/recommend", params={"user_id": running.user("control", 0)})
    assert after.status_code == 200
    assert running.metric("hymirec_recommend_inflight", "hymirec_recommend_inflight") == 0


def test_versions_with_a_grown_catalogue_rank_the_new_items(
    run_service: Callable[..., Running],
) -> None:
    running = run_service(serve_registry_poll_s=3600)
    new_item, users = 1700, range(200_000, 200_060)  # ML-100K has items 1..1682
    records = [
        StreamRecord(
            0,
            TRAIN_RATINGS + i,
            TrainingSample(
                event_id=uuid.uuid4(),
                user_id=user,
                item_id=new_item,
                event_type="play",
                ts_ms=1_000 + i,
                seq=0,
                recent_item_ids=[],
            ),
            0,
        )
        for i, user in enumerate(users)
    ]
    catalog = running.world.catalog()
    for name in ("popular", "sasrec"):
        trainer = running.world.trainer(name, catalog)
        assert trainer.learn(records) == len(records)
        trainer.publish(running.world.registry, "training", keep=100)
    swapped = {loaded.name: loaded for loaded in running.service.pool.refresh()}
    assert {name: loaded.num_items for name, loaded in swapped.items()} == {
        "popular": new_item,
        "sasrec": new_item,
    }
    cold = running.client.get("/recommend", params={"user_id": 100_009, "k": 3}).json()
    assert cold["cold_start"] and cold["items"][0] == new_item  # 60 plays: the most popular
    built = load_item_features(running.world.settings)
    settings = running.world.settings
    history = np.array([50, new_item])
    store = running.service.features.store
    store.push_user_histories(
        [history_row(300_001, history, settings, built.codebook, built.table)]
    )
    body = running.client.get("/recommend", params={"user_id": 300_001, "k": MAX_K}).json()
    assert body["cold_start"] is False and len(body["items"]) == MAX_K
    assert not {50, new_item} & set(body["items"])
