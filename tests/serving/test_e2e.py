"""End to end: ``hymirec serve`` as a child process on the real broker, a Feast online store with
pushed ML-100K histories and trained sasrec/hymirec/popular versions. Requests return the right
variant's unseen items and their impressions arrive on the events topic, one per item and layer
with positions 0..k-1."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from abtest.experiments import HOLDOUT, load_experiments
from abtest.splitter import Splitter
from hymirec.processes import ServiceProcess
from tests.conftest import free_port, wait_until
from tests.serving.conftest import World, read_impressions, reference_seen

pytestmark = pytest.mark.integration

K = 8


def test_served_lists_come_from_the_routed_variant_and_their_exposures_reach_the_topic(
    make_world: Callable[..., World],
) -> None:
    world = make_world(holdout=10, serve_port=free_port())
    settings = world.settings
    splitter = Splitter(load_experiments(settings.experiments_file))
    routes = {u: splitter.route(u) for u in sorted(world.histories)}

    def first(condition: Callable[[Any], bool]) -> int:
        return next(u for u, route in routes.items() if condition(route))

    users = {
        "control, both layers": first(lambda r: r.variant == "control" and len(r.layers) == 2),
        "treatment, one layer": first(lambda r: r.variant == "treatment" and len(r.layers) == 1),
        "held out": first(lambda r: r.held_out),
    }
    service = ServiceProcess("serve", ["serve"], settings).start()
    try:
        wait_until(
            lambda: "recommendation service ready on" in service.tail() or not service.alive(),
            180,
            "the readiness line",
        )
        assert service.alive(), service.tail()
        client = httpx.Client(base_url=f"http://127.0.0.1:{settings.serve.port}", timeout=30)
        assert client.get("/health/ready").status_code == 200
        catalog = world.catalog()
        responses: dict[str, dict[str, Any]] = {}
        for what, user in users.items():
            response = client.get("/recommend", params={"user_id": user, "k": K})
            assert response.status_code == 200, response.text
            body = responses[what] = response.json()
            route = routes[user]
            assert (body["experiment"], body["variant"]) == (route.experiment, route.variant)
            assert body["model"] == route.model and body["cold_start"] is False
            assert body["model_version"] == world.registry.latest_version(route.model)
            assert len(body["items"]) == K == len(set(body["items"]))
            assert not set(body["items"]) & reference_seen(settings, catalog, world.histories[user])
        assert responses["held out"]["experiment"] == HOLDOUT
        assert {r["model"] for r in responses.values()} == {"sasrec", "hymirec"}

        cold = client.get("/recommend", params={"user_id": 100_007, "k": K}).json()
        assert cold["cold_start"] is True and cold["model"] == "popular"
        assert cold["model_version"] == world.registry.latest_version("popular")
        assert client.get("/recommend", params={"user_id": "-3"}).status_code == 422
        assert client.get("/recommend", params={"user_id": 1, "k": 0}).status_code == 422
        assert client.get("/recommend", params={"user_id": 1, "experiment": "x"}).status_code == 404

        served = {**responses, "cold": cold}
        expected = 0
        for body in served.values():
            route = splitter.route(body["user_id"])
            expected += K * max(1, len(route.layers))
        events = read_impressions(settings, {b["request_id"] for b in served.values()}, expected)
        assert len(events) == expected
        by_request: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for event in events:
            by_request[event["request_id"]].append(event)
        for body in served.values():
            route = splitter.route(body["user_id"])
            held = {(HOLDOUT, HOLDOUT)}
            assignments = held if route.held_out else set(route.layers.values())
            shown: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
            for event in by_request[body["request_id"]]:
                assert event["event_type"] == "impression"
                assert event["user_id"] == body["user_id"]
                assert event["model_version"] == body["model_version"]
                assert event["latency_ms"] > 0
                shown[(event["experiment"], event["variant"])].append(
                    (event["position"], event["item_id"])
                )
            assert set(shown) == assignments
            for rows in shown.values():
                assert sorted(rows) == list(enumerate(body["items"]))
        status = client.get("/status").json()
        assert {m: s["version"] for m, s in status["models"].items()} == {
            m: world.registry.latest_version(m) for m in ("sasrec", "hymirec", "popular")
        }
        client.close()
    finally:
        code = service.stop()
    assert code == 0, service.tail()
