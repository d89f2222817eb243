"""`hymirec features serve` as its own process, read over HTTP by the decoding client.

Every ML-100K user's history is written to the online store as the stream worker writes it (the
worker itself replaying all ratings into Feast is tests/integration/test_pipeline.py); then each
user's row and decoded long history over HTTP must equal the in-process read, bad requests must
get a 4xx, and the server must keep answering while `hymirec features build` republishes a new
codebook, after which rows coded with the old one still decode as before.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from core.movielens import load_ratings, replay_histories
from core.settings import Settings
from features.codebook import ResidualCodebook
from features.decode import FeatureServerClient
from features.item_features import ItemFeatures, build_item_features
from features.store import FeatureStoreClient, UserHistoryFeatures
from hymirec.processes import ServiceProcess
from tests.conftest import EMBEDDING_CACHE, free_port, wait_until

pytestmark = pytest.mark.integration

RECENT, LONG = 20, 300  # P=300 < the heaviest users' 737 ratings: truncation is exercised


def worker_rows(built: ItemFeatures, histories: dict[int, np.ndarray]) -> list[UserHistoryFeatures]:
    """The rows the stream worker pushes after the replay (its ``_feature_row``)."""
    return [
        UserHistoryFeatures(
            user_id=user,
            recent_item_ids=items[-RECENT:].tolist(),
            long_codes=built.codebook.pack(built.table.lookup(items[-LONG:])),
            history_len=len(items),
            last_ts_ms=1_000 + len(items),
            last_offset=user,
            codebook_version=built.codebook.version,
        )
        for user, items in histories.items()
    ]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, ItemFeatures, str, ServiceProcess]]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("served"),
        cache_dir=EMBEDDING_CACHE,
        features_recent_len=RECENT,
        features_long_len=LONG,
    )
    built = build_item_features(settings)
    store = FeatureStoreClient(settings)
    histories = replay_histories(load_ratings())
    rows = worker_rows(built, histories)
    for start in range(0, len(rows), 100):
        store.push_user_histories(rows[start : start + 100])
    port = free_port()
    server = ServiceProcess("feature-server", ["features", "serve", "--port", str(port)], settings)
    server.start()
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert server.alive(), f"the feature server died:\n{server.tail()}"
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 120, "the feature server's /health")
        yield settings, built, url, server
        assert server.alive(), f"the feature server died:\n{server.tail()}"
    finally:
        server.stop()


def test_every_users_row_and_long_history_over_http_equal_the_in_process_read(
    served: tuple[Settings, ItemFeatures, str, ServiceProcess],
) -> None:
    settings, built, url, _ = served
    histories = replay_histories(load_ratings())
    users = sorted(histories)
    in_process = FeatureStoreClient(settings).user_histories([*users, 99_999])
    codebook = ResidualCodebook.load(settings.codebook_dir)  # the saved one, not the HTTP copy
    with FeatureServerClient(url) as client:
        over_http = client.user_histories([*users, 99_999])
        assert over_http[99_999] is None and in_process[99_999] is None
        for user in users:
            row, local = over_http[user], in_process[user]
            assert row is not None and local is not None
            assert dataclasses.asdict(row) == dataclasses.asdict(local), f"user {user}"
            decoded = client.long_history(row)
            reference = codebook.decode(codebook.unpack(local.long_codes))
            np.testing.assert_array_equal(decoded, reference, err_msg=f"user {user}")
            assert decoded.shape == (min(len(histories[user]), LONG), codebook.dim)
        # One user per request, as a service asks: the same row.
        assert client.user_histories([users[0]])[users[0]] == over_http[users[0]]
    assert built.codebook.version == codebook.version


ONE = ["user_history:history_len"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"features": ["no_such_view:x"], "entities": {"user_id": [1]}}, 404),
        ({"features": ["user_history:no_such_feature"], "entities": {"user_id": [1]}}, 404),
        ({"features": ONE, "entities": {"item_id": [1]}}, 422),
        ({"features": ONE, "entities": {"user_id": ["one"]}}, 422),
        ({"features": ["codebook_meta:levels"], "entities": {"codebook_version": [1]}}, 422),
        ({"features": ONE, "entities": {"user_id": list(range(1001))}}, 413),
        ({"features": ONE, "entities": {"user_id": [1] * 300_000}}, 413),  # 1.2 MB body
    ],
    ids=["unknown view", "unknown feature", "wrong key", "string id", "int version",
         "1001 rows", "oversize body"],
)  # fmt: skip
def test_bad_requests_get_a_4xx_and_the_server_goes_on(
    served: tuple[Settings, ItemFeatures, str, ServiceProcess], body: dict[str, Any], status: int
) -> None:
    _, _, url, _ = served
    answer = httpx.post(f"{url}/get-online-features", json=body, timeout=30)
    assert answer.status_code == status, answer.text
    ok = httpx.post(
        f"{url}/get-online-features", json={"features": ONE, "entities": {"user_id": [1]}}
    )
    assert ok.status_code == 200


def test_a_long_kept_alive_client_is_never_reset(
    served: tuple[Settings, ItemFeatures, str, ServiceProcess],
) -> None:
    """More reads on one connection than `feast serve` allows a worker before recycling it
    (1,000 + up to 50), which reset every open connection: each is answered."""
    _, _, url, _ = served
    body = {"features": ONE, "entities": {"user_id": [1]}}
    with httpx.Client(base_url=url, timeout=30) as http:
        statuses = [http.post("/get-online-features", json=body).status_code for _ in range(1_200)]
    assert statuses == [200] * 1_200


def test_the_server_survives_a_republish_and_old_rows_still_decode(
    served: tuple[Settings, ItemFeatures, str, ServiceProcess],
) -> None:
    settings, built, url, _ = served
    old = built.codebook
    with FeatureServerClient(url) as before:
        row = before.user_histories([1])[1]
        assert row is not None and row.codebook_version == old.version
        decoded_before = before.long_history(row)

    statuses: list[int] = []
    stop = threading.Event()

    def poll() -> None:  # a client reading throughout the republish
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                body = {"features": ONE, "entities": {"user_id": [1, 2]}}
                statuses.append(http.post("/get-online-features", json=body).status_code)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        reseeded = settings.updated(codebook_seed=settings.codebook.seed + 1)
        build = ServiceProcess("republish", ["features", "build"], reseeded).start()
        assert build.process is not None
        assert build.process.wait(timeout=600) == 0, build.tail()
    finally:
        stop.set()
        poller.join(timeout=60)
    assert statuses and set(statuses) == {200}, f"{len(statuses)} reads: {set(statuses)}"

    new = ResidualCodebook.load(settings.codebook_dir)
    assert new.version != old.version
    with FeatureServerClient(url) as after:  # a fresh client: nothing cached
        row_after = after.user_histories([1])[1]
        assert row_after == row  # the worker has not rewritten it: still coded with the old one
        np.testing.assert_array_equal(after.long_history(row_after), decoded_before)
        assert after.online(["item_codebook:codebook_version"], {"item_id": [1]})[
            "codebook_version"
        ] == [new.version]
        # A row the restarted worker writes with the new codebook decodes with it.
        codes = new.encode(built.embeddings[:5])
        packed = new.pack(codes)
        np.testing.assert_array_equal(after.codebook(new.version).decode(packed), new.decode(codes))
