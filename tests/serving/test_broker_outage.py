"""The service while its Kafka broker is down: requests are still answered from Feast, readiness
says what is wrong, and the impressions logged during the outage reach the topic once the broker
is back (kafka-python keeps them buffered up to the producer's delivery timeout, 30 s)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving import RecommendationService, ServerThread, create_app
from streaming.broker import LocalBroker
from tests.conftest import free_port, wait_until
from tests.serving.conftest import World, read_impressions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

K = 5


def test_requests_are_answered_while_kafka_is_down_and_their_impressions_arrive_after(
    make_world: Callable[..., World], tmp_path: Path
) -> None:
    broker = LocalBroker(tmp_path / "own-broker", port=free_port())  # not the session's
    broker.start()
    try:
        world = make_world(broker_port=broker.port)
        service = RecommendationService.build(world.settings)
        server = ServerThread(create_app(service)).start()
        client = httpx.Client(base_url=server.url, timeout=30)
        # Six users, one of them in two experiment layers (the layers' salts are random per
        # world, so the first six users alone are sometimes all in one layer).
        candidates = sorted(world.histories)
        both = next(u for u in candidates if len(service.splitter.route(u).layers) > 1)
        users = [both, *[u for u in candidates if u != both][:5]]

        def recommend(user: int) -> httpx.Response:
            response = client.get("/recommend", params={"user_id": user, "k": K})
            assert response.status_code == 200, response.text
            assert len(response.json()["items"]) == K
            return response

        try:
            before = [recommend(users[0])]
            assert client.get("/health/ready").status_code == 200  # its impressions are stored
            assert broker.stop()
            during = [recommend(user) for user in users[1:]]
            ready = client.get("/health/ready")
            checks = ready.json()["checks"]
            assert ready.status_code == 503
            assert checks["feature_store"] == "ok"
            assert checks["exposures"].startswith("error: flush to"), checks
            assert broker.port == world.settings.broker.port
            broker.start()
            wait_until(lambda: client.get("/health/ready").status_code == 200, 25, "ready again")
            requests = {r.json()["request_id"] for r in before + during}
            # one impression per item and per experiment layer the user is in
            expected = {
                (r.json()["request_id"], experiment, position)
                for r in before + during
                for experiment, _ in (
                    service.splitter.route(r.json()["user_id"]).layers.values() or [(None, None)]
                )
                for position in range(K)
            }
            assert len(expected) > K * len(requests)  # some users are in two layers

            def stored() -> dict[str, dict[str, Any]]:
                found = read_impressions(world.settings, requests, 10**9, timeout_s=2)
                return {e["event_id"]: e for e in found}

            # At least once: a batch the broker stored as it stopped, unacknowledged, is sent
            # again, with the same event ids (analytics count an event id once).
            events = wait_until(lambda: (e := stored()) and len(e) == len(expected) and e,
                                30, "every impression")  # fmt: skip
            shown = Counter(
                (e["request_id"], e["experiment"], e["position"]) for e in events.values()
            )
            assert shown == dict.fromkeys(expected, 1)
            assert service.exposures.failed == 0
        finally:
            client.close()
            server.stop()
    finally:
        broker.stop()
