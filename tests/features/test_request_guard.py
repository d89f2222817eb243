"""The validating layer in front of Feast's feature server, on Feast's real app and a real store.

Valid reads get exactly Feast's own answer; each bad read gets a 4xx in Feast's error shape where
Feast alone answers it with the status recorded here (often a 500: why the layer exists; a change
in Feast's behaviour fails this test, so the layer is re-checked on each Feast upgrade).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import feast
import httpx
import pytest
import uvicorn
from feast.feature_server import get_app

from core.settings import Settings
from features.server import FEAST_SERVER_VERSION, ServerLimits, guarded_app
from features.store import FeatureStoreClient, UserHistoryFeatures
from tests.conftest import free_port, wait_until

HISTORY = ["user_history:recent_item_ids", "user_history:long_codes", "user_history:history_len"]
ROWS = [
    UserHistoryFeatures(7, [1, 2, 3], b"\x01\x02\xff", 3, 30, 11, "v1"),
    UserHistoryFeatures(8, [9], b"\x09", 1, 5, 2, "v1"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> FeatureStoreClient:
    client = FeatureStoreClient(Settings(data_dir=tmp_path_factory.mktemp("guard")))
    client.apply_definitions()
    client.push_user_histories(ROWS)
    return client


@contextmanager
def running(app: Any, keep_alive: bool = True) -> Iterator[httpx.Client]:
    """``app`` served by uvicorn on a free local port (in a thread, lifespan on), and a client."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 60, "the feature server to start", every_s=0.05)
        headers = {} if keep_alive else {"connection": "close"}
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def guarded(store: FeatureStoreClient) -> Iterator[httpx.Client]:
    with running(guarded_app(store.store, ServerLimits(max_body_bytes=4096, max_rows=10))) as c:
        yield c


@pytest.fixture(scope="module")
def feast_alone(store: FeatureStoreClient) -> Iterator[httpx.Client]:
    # Feast logs each error's traceback, and Starlette re-raises it after the answer, so uvicorn
    # drops that connection: a fresh connection per request.
    logging.getLogger("fastapi").disabled = True
    try:
        with running(get_app(store.store, 60), keep_alive=False) as client:
            yield client
    finally:
        logging.getLogger("fastapi").disabled = False


def test_the_layer_was_checked_on_this_feast_version() -> None:
    assert feast.__version__.startswith(FEAST_SERVER_VERSION), (
        f"Feast {feast.__version__}: re-check features/server.py against its feature server "
        "(which bad reads it answers with a 5xx), then update FEAST_SERVER_VERSION"
    )


@pytest.mark.parametrize(
    "body",
    [
        {"features": HISTORY, "entities": {"user_id": [7, 8, 99]}},
        {"features": ["user_history:history_len"], "entities": {"user_id": [8]}},
        {"features": HISTORY, "entities": {"user_id": [7]}, "full_feature_names": True},
        {"features": ["item_metadata:title", "user_history:history_len"],
         "entities": {"user_id": [7, 8], "item_id": [1, 2]}},
    ],
)  # fmt: skip
def test_valid_reads_get_feasts_own_answer(
    guarded: httpx.Client, feast_alone: httpx.Client, body: dict[str, Any]
) -> None:
    ours = guarded.post("/get-online-features", json=body)
    theirs = feast_alone.post("/get-online-features", json=body)
    assert ours.status_code == theirs.status_code == 200
    assert ours.json() == theirs.json()


ONE = ["user_history:history_len"]
BAD_READS = [
    # (case, body, our status, error class, Feast's own status)
    ("unknown view", {"features": ["nope:x"], "entities": {"user_id": [7]}},
     404, "FeatureViewNotFoundException", 404),
    ("unknown feature", {"features": ["user_history:nope"], "entities": {"user_id": [7]}},
     404, "FeatureNotInView", 500),
    ("not view:feature", {"features": ["user_history"], "entities": {"user_id": [7]}},
     422, "InvalidFeatureRequest", 500),
    ("no features", {"features": [], "entities": {"user_id": [7]}},
     422, "InvalidFeatureRequest", 500),
    ("unknown service", {"feature_service": "nope", "entities": {"user_id": [7]}},
     404, "FeatureServiceNotFoundException", 404),
    ("wrong entity key", {"features": ONE, "entities": {"item_id": [7]}},
     422, "InvalidFeatureRequest", 500),
    ("no entities", {"features": ONE, "entities": {}}, 422, "InvalidFeatureRequest", 500),
    ("no rows", {"features": ONE, "entities": {"user_id": []}}, 422, "InvalidFeatureRequest", 500),
    ("string for int key", {"features": ONE, "entities": {"user_id": ["abc"]}},
     422, "InvalidFeatureRequest", 500),
    ("null key", {"features": ONE, "entities": {"user_id": [None]}},
     422, "InvalidFeatureRequest", 500),
    ("key past int64", {"features": ONE, "entities": {"user_id": [2**63]}},
     422, "InvalidFeatureRequest", 500),
    ("float key", {"features": ONE, "entities": {"user_id": [7.5]}},
     422, "InvalidFeatureRequest", 200),  # Feast reads user 7
    ("int for string key",
     {"features": ["codebook_meta:levels"], "entities": {"codebook_version": [3]}},
     422, "InvalidFeatureRequest", 200),  # Feast looks up version "3"
    ("ragged rows", {"features": [*ONE, "item_metadata:title"],
                     "entities": {"user_id": [7], "item_id": [1, 2]}},
     422, "InvalidFeatureRequest", 500),
    ("unknown field", {"features": ONE, "entities": {"user_id": [7]}, "feature": ["x"]},
     422, "InvalidFeatureRequest", 200),
    ("too many rows", {"features": ONE, "entities": {"user_id": list(range(11))}},
     413, "FeatureRequestTooLarge", 200),
    ("oversize body", {"features": ONE, "entities": {"user_id": [7] * 2000}},
     413, "FeatureRequestTooLarge", 200),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "error", "feast_status"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_READS],
)
def test_bad_reads_get_a_4xx_in_feasts_error_shape(
    guarded: httpx.Client,
    feast_alone: httpx.Client,
    body: dict[str, Any],
    status: int,
    error: str,
    feast_status: int,
) -> None:
    answer = guarded.post("/get-online-features", json=body)
    assert answer.status_code == status, answer.text
    detail = json.loads(answer.json())  # Feast's handler sends to_error_detail(), a JSON string
    assert detail["class"] == error and detail["message"]
    assert feast_alone.post("/get-online-features", json=body).status_code == feast_status


@pytest.mark.parametrize(
    ("content", "status"),
    [(b"{nope", 422), (b"[1, 2]", 422), (b"\xff\xfe", 422), (b"x" * 5000, 413)],
)
def test_bodies_that_are_not_a_json_object_or_too_large_get_a_4xx(
    guarded: httpx.Client, content: bytes, status: int
) -> None:
    answer = guarded.post(
        "/get-online-features", content=content, headers={"content-type": "application/json"}
    )
    assert answer.status_code == status


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/push"), ("POST", "/write-to-online-store"), ("POST", "/materialize"),
     ("GET", "/chat"), ("GET", "/v1/vector_stores"), ("DELETE", "/get-online-features")],
)  # fmt: skip
def test_the_server_is_read_only(guarded: httpx.Client, method: str, path: str) -> None:
    answer = guarded.request(method, path, json={})
    assert answer.status_code == 403
    assert json.loads(answer.json())["class"] == "ReadOnlyFeatureServer"


def test_health_and_feasts_openapi_stay_open(guarded: httpx.Client) -> None:
    assert guarded.get("/health").status_code == 200
    paths = guarded.get("/openapi.json").json()["paths"]
    assert "/get-online-features" in paths
    assert guarded.get("/docs").status_code == 200


def test_a_view_applied_after_start_is_served(tmp_path: Path) -> None:
    client = FeatureStoreClient(Settings(data_dir=tmp_path))
    client.apply_definitions()
    app = guarded_app(client.store, registry_ttl_s=3600)
    body = {"features": ONE, "entities": {"user_id": [7]}}
    with running(app) as http:
        assert http.post("/get-online-features", json=body).status_code == 200
        unknown = {"features": ["nope:x"], "entities": {"user_id": [7]}}
        assert http.post("/get-online-features", json=unknown).status_code == 404
