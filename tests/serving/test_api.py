"""The recommendation API on real components (broker, Feast SQLite online store, registry
versions): rankings against the models' own full-history scoring, seen-item filtering against an
independent computation, cold start, fallbacks, validation and fuzzing, metrics and readiness."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from abtest.experiments import load_experiments
from abtest.splitter import Splitter
from core.movielens import load_ratings
from model.base import Batch, CatalogInfo
from model.training.online import load_version_model
from serving import MAX_K, RecommendationService, ServerThread, create_app
from tests.serving.conftest import World, reference_seen

pytestmark = pytest.mark.integration


@dataclass
class Api:
    world: World
    service: RecommendationService
    client: httpx.Client
    splitter: Splitter
    catalog: CatalogInfo


@pytest.fixture
def start_api(make_world: Callable[..., World]) -> Iterator[Callable[..., Api]]:
    servers: list[tuple[ServerThread, httpx.Client]] = []

    def start(**world_options: object) -> Api:
        world = make_world(**world_options)
        service = RecommendationService.build(world.settings)
        server = ServerThread(create_app(service)).start()
        client = httpx.Client(base_url=server.url, timeout=30)
        servers.append((server, client))
        splitter = Splitter(load_experiments(world.settings.experiments_file))
        return Api(world, service, client, splitter, world.catalog())

    yield start
    for server, client in servers:
        client.close()
        server.stop()


@pytest.fixture
def api(start_api: Callable[..., Api]) -> Api:
    return start_api()


def users_in(api: Api, variant: str, count: int) -> list[int]:
    """ML-100K users (all have online histories) that the splitter puts in ``variant``."""
    users = [u for u in sorted(api.world.histories) if api.splitter.route(u).variant == variant]
    return users[:count]


def reference_scores(api: Api, model: str, items: np.ndarray) -> torch.Tensor:
    """The published model's own ``score_all``: HyMiRec on the full id history (its long part
    through the catalogue's codes), single-embedding models on the R recent ids."""
    published = api.world.registry.latest(model)
    assert published is not None
    reference = load_version_model(published, api.catalog)
    kept = items[-api.world.settings.features.long_len :]
    if model == "sasrec":
        kept = kept[-api.world.settings.features.recent_len :]
    history = torch.as_tensor(kept, dtype=torch.long)[None]
    batch = Batch(
        torch.zeros(1, dtype=torch.long),
        history,
        torch.zeros_like(history),
        torch.zeros(1, 1, dtype=torch.long),
        torch.zeros(1, 1, dtype=torch.long),
    )
    with torch.no_grad():
        return reference.score_all(batch)[0]


def assert_top_k(served: list[int], scores: torch.Tensor, seen: set[int], k: int) -> None:
    """``served`` is a best-first top-k of ``scores`` over the unseen items (float tolerance)."""
    assert len(served) == k and len(set(served)) == k
    assert not set(served) & seen
    assert 0 not in served
    values = scores[served]
    assert torch.all(values[:-1] >= values[1:] - 1e-5), values
    rest = torch.ones_like(scores, dtype=torch.bool)
    rest[0] = False
    rest[list(seen | set(served))] = False
    assert values.min() >= scores[rest].max() - 1e-5


def test_hymirec_served_from_feast_codes_equals_its_full_history_scoring(api: Api) -> None:
    by_length = sorted(api.world.histories, key=lambda u: len(api.world.histories[u]))
    users = [*by_length[-2:], by_length[0]]  # the two longest (737 items) and the shortest
    loaded = api.service.pool.get("hymirec")
    assert loaded is not None
    for user in users:
        history = api.service.features.read(user)
        assert history is not None
        served = loaded.scores(history)
        reference = reference_scores(api, "hymirec", api.world.histories[user])
        torch.testing.assert_close(served, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant, model", [("control", "sasrec"), ("treatment", "hymirec")])
def test_recommend_serves_the_routed_models_top_k_of_unseen_items(
    api: Api, variant: str, model: str
) -> None:
    for user, k in zip(users_in(api, variant, 3), (10, 1, MAX_K), strict=True):
        response = api.client.get("/recommend", params={"user_id": user, "k": k})
        assert response.status_code == 200, response.text
        body = response.json()
        route = api.splitter.route(user)
        assert (body["experiment"], body["variant"]) == ("models-ab", variant)
        assert (body["model"], body["model_version"]) == (
            model,
            api.world.registry.latest_version(model),
        )
        assert body["params"] == route.params and body["user_id"] == user
        assert body["cold_start"] is False and body["fallback"] is None
        items = api.world.histories[user]
        seen = reference_seen(api.world.settings, api.catalog, items)
        assert_top_k(body["items"], reference_scores(api, model, items), seen, k)


def test_cold_start_users_get_the_popular_versions_ranking(api: Api) -> None:
    published = api.world.registry.latest("popular")
    assert published is not None
    counts = torch.load(published.path / "model.pt", weights_only=True)["state_dict"]["counts"]
    order = [int(i) for i in np.argsort(-counts.numpy(), kind="stable") if i != 0]
    for user in (100_001, 100_002, 2**63 - 1):
        body = api.client.get("/recommend", params={"user_id": user, "k": 7}).json()
        route = api.splitter.route(user)
        assert body["items"] == order[:7]
        assert body["cold_start"] is True and body["fallback"] == "cold_start"
        assert (body["model"], body["model_version"]) == ("popular", published.version)
        assert (body["experiment"], body["variant"]) == (route.experiment, route.variant)


def test_without_a_popular_version_cold_start_uses_the_movielens_prior(
    start_api: Callable[..., Api],
) -> None:
    api = start_api(models=("sasrec", "hymirec"))
    counts = load_ratings()["item_id"].value_counts()
    frame = counts.rename("n").reset_index().sort_values(["n", "item_id"], ascending=[False, True])
    body = api.client.get("/recommend", params={"user_id": 100_005, "k": 12}).json()
    assert body["items"] == frame["item_id"].head(12).tolist()
    assert (body["model"], body["model_version"]) == ("popular", "ml100k-prior")


def test_a_variant_without_a_version_is_served_popularity_minus_seen_items(
    start_api: Callable[..., Api],
) -> None:
    api = start_api(models=("hymirec", "popular"))
    ready = api.client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"]["models"]["sasrec"].startswith("no version yet")
    user = users_in(api, "control", 1)[0]
    body = api.client.get("/recommend", params={"user_id": user, "k": 10}).json()
    assert (body["model"], body["fallback"], body["cold_start"]) == (
        "popular",
        "model_unavailable",
        False,
    )
    published = api.world.registry.latest("popular")
    assert published is not None
    counts = torch.load(published.path / "model.pt", weights_only=True)["state_dict"]["counts"]
    seen = reference_seen(api.world.settings, api.catalog, api.world.histories[user])
    order = [int(i) for i in np.argsort(-counts.numpy(), kind="stable") if i and i not in seen]
    assert body["items"] == order[:10]


@pytest.mark.parametrize(
    "query, status, message",
    [
        ("", 422, "user_id: required"),
        ("user_id=abc", 422, "user_id: must be a decimal integer"),
        ("user_id=1.0", 422, "user_id: must be a decimal integer"),
        ("user_id=1e3", 422, "user_id: must be a decimal integer"),
        ("user_id=-1", 422, "user_id: must be in [0, 9223372036854775807]"),
        ("user_id=9223372036854775808", 422, "user_id: must be in [0, 9223372036854775807]"),
        ("user_id=5&k=0", 422, f"k: must be in [1, {MAX_K}]"),
        (f"user_id=5&k={MAX_K + 1}", 422, f"k: must be in [1, {MAX_K}]"),
        ("user_id=5&k=ten", 422, "k: must be a decimal integer"),
        ("user_id=5&kk=3", 422, "unknown query parameter(s) 'kk'"),
        ("user_id=5&user_id=6", 422, "user_id: given more than once"),
        ("user_id=5&experiment=nope", 404, "unknown experiment 'nope'; the config defines"),
        ("user_id=5&experiment=", 404, "unknown experiment ''"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(
    api: Api, query: str, status: int, message: str
) -> None:
    response = api.client.get(f"/recommend?{query}")
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_the_experiment_parameter_reports_that_experiments_assignment(api: Api) -> None:
    for user in range(1, 40):
        body = api.client.get(
            "/recommend", params={"user_id": user, "k": 3, "experiment": "page-size"}
        ).json()
        assert body["experiment"] == "page-size"
        assert body["variant"] == api.splitter.assign("page-size", user)
        assert body["model"] == api.splitter.route(user).model


_KEYS = st.sampled_from(["user_id", "k", "experiment"]) | st.text(max_size=8)
_VALUES = (
    st.text(max_size=30)
    | st.integers(min_value=-(2**70), max_value=2**70).map(str)
    | st.floats(allow_nan=True, allow_infinity=True).map(str)
    | st.sampled_from(["models-ab", "page-size", "holdout", "0", "1", "200", "201"])
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(params=st.lists(st.tuples(_KEYS, _VALUES), max_size=4))
def test_fuzzed_query_parameters_never_crash_the_service(
    api: Api, params: list[tuple[str, str]]
) -> None:
    response = api.client.get("/recommend", params=params)
    assert response.status_code in (200, 404, 422), (params, response.text)
    body = response.json()
    if response.status_code == 200:
        k = int(dict(params).get("k", "10"))
        assert len(body["items"]) == k
    else:
        assert isinstance(body["detail"], str) and body["detail"]


def test_metrics_status_and_schema(api: Api) -> None:
    user = users_in(api, "treatment", 1)[0]
    for _ in range(3):
        assert api.client.get("/recommend", params={"user_id": user}).status_code == 200
    assert api.client.get("/recommend", params={"user_id": "x"}).status_code == 422
    families = {f.name: f for f in text_string_to_metric_families(api.client.get("/metrics").text)}
    requests = {
        (s.labels["variant"], s.labels["status"]): s.value
        for s in families["hymirec_recommend_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("treatment", "200")] == 3 and requests[("none", "422")] == 1
    latency = {
        s.labels["variant"]: s.value
        for s in families["hymirec_recommend_latency_seconds"].samples
        if s.name.endswith("_count")
    }
    assert latency == {"treatment": 3}
    lookups = {
        (s.labels["model"], s.labels["result"]): s.value
        for s in families["hymirec_interest_cache_lookups"].samples
    }
    assert (lookups[("hymirec", "miss")], lookups[("hymirec", "hit")]) == (1, 2)  # same history
    versions = {
        s.labels["model"]: s.labels["version"]
        for s in families["hymirec_model_version_info"].samples
        if s.value == 1
    }
    expected = {m: api.world.registry.latest_version(m) for m in ("sasrec", "hymirec", "popular")}
    assert versions == expected
    status = api.client.get("/status").json()
    assert {m: v["version"] for m, v in status["models"].items()} == expected
    for name, info in status["models"].items():
        published = api.world.registry.latest(name)
        assert published is not None
        assert info["published_at_ms"] == published.metadata["published_at_ms"]
    schema = api.client.get("/openapi.json").json()
    parameters = {p["name"] for p in schema["paths"]["/recommend"]["get"]["parameters"]}
    assert parameters == {"user_id", "k", "experiment"}
    assert api.client.get("/health/live").json() == {"status": "alive"}


def test_a_broken_feature_store_makes_the_service_unready_and_requests_503(api: Api) -> None:
    assert api.client.get("/health/ready").status_code == 200
    database = api.world.settings.feast_dir / "online_store.db"
    with sqlite3.connect(database) as connection:
        tables = [
            name
            for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if name.endswith("user_history")
        ]
        assert tables
        connection.execute(f'DROP TABLE "{tables[0]}"')
    ready = api.client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["checks"]["feature_store"].startswith("error: online read failed")
    response = api.client.get("/recommend", params={"user_id": 1})
    assert response.status_code == 503
    assert response.json()["detail"].startswith("feature store unavailable")
    assert response.headers["Retry-After"]
