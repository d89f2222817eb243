"""The served lists are exactly the lists the service ranked before issue 19, on the same versions:
for every ML-100K user, on a first request (the interests computed) and on a repeat (from the
cache), and after a user's history changes. Also the lean online read against Feast's own."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from abtest.experiments import load_experiments
from abtest.splitter import Splitter
from core.errors import FeatureStoreError
from features.item_features import load_item_features
from features.store import FeatureStoreClient
from model.base import Batch
from model.checkpoint import load_version_model
from model.hymirec_model import HyMiRec
from serving import RecommendationService
from serving.features import UserHistory
from tests.serving.conftest import World, history_row

pytestmark = pytest.mark.integration


class TodaysRanking:
    """``serving/models.py`` as it ranked before issue 19, on its own copy of a version: the
    interests computed on every request (HyMiRec: ``encode_long`` on the long codes, ``refine``
    with the recent ids), the best interest per item, item 0 and seen items at -inf, then a
    stable descending sort of every score, cut at the finite ones."""

    def __init__(self, world: World, name: str) -> None:
        published = world.registry.latest(name)
        assert published is not None
        self.version = published.version
        self.model = load_version_model(published, world.catalog())
        with torch.inference_mode():
            self.items = self.model.item_embeddings().detach().float()
        self.num_items = self.items.shape[0] - 1

    def _known(self, ids: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        return torch.where(t <= self.num_items, t, 0)

    def rank(self, history: UserHistory | None, k: int) -> list[int]:
        model = self.model
        recent_ids = history.recent_item_ids if history is not None else np.zeros(0, np.int64)
        with torch.no_grad():
            if isinstance(model, HyMiRec):
                r = min(model.config.recent_len, len(recent_ids))
                codes = history.long_codes if history is not None else np.zeros((0, 1), np.int64)
                levels = model.decoder.table.shape[0]
                long_codes = torch.from_numpy(np.asarray(codes[: max(0, len(codes) - r)]))
                coarse = model.encode_long(long_codes.reshape(-1, levels).long()[None])
                recent = self._known(recent_ids[len(recent_ids) - r :])
                interests = model.refine(coarse, recent[None])[0]
            else:
                ids = self._known(recent_ids)[None]
                zeros = torch.zeros(1, 1, dtype=torch.long)
                batch = Batch(zeros[0], ids, torch.zeros_like(ids), zeros, zeros)
                interests = model.user_interests(batch)[0]
            # merged by the model's own rule (HyMiRec: Config.merge; the others: the max)
            scores = model.interest_scores(interests.float(), self.items).float()
            scores = torch.nan_to_num(scores, nan=-torch.inf)
            scores[0] = -torch.inf
        if history is not None and len(history.seen_item_ids):
            seen = history.seen_item_ids[history.seen_item_ids <= self.num_items]
            scores[torch.from_numpy(seen)] = -torch.inf
        order = torch.argsort(scores, descending=True, stable=True)
        count = min(k, int(torch.isfinite(scores).sum()))
        return [int(i) for i in order[:count]]


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


def reference_history(world: World, service: RecommendationService, user: int) -> UserHistory:
    """The user's history through Feast's ``get_online_features`` (not the service's read)."""
    row = FeatureStoreClient(world.settings).user_histories([user])[user]
    assert row is not None
    return service.features.decode(row)


def test_every_users_list_is_todays_list_first_and_from_the_cache(world: World) -> None:
    service = RecommendationService.build(world.settings)
    try:
        splitter = Splitter(load_experiments(world.settings.experiments_file))
        today = {name: TodaysRanking(world, name) for name in ("sasrec", "hymirec", "popular")}
        store = FeatureStoreClient(world.settings)
        users = sorted(world.histories)
        rows = store.user_histories(users)
        cold = [100_003, 2**40]
        for k in (10, 200):
            for attempt in ("computed", "cached"):
                for user in [*users, *cold]:
                    served = service.recommend(user, k)
                    row = rows.get(user)
                    history = service.features.decode(row) if row is not None else None
                    name = splitter.route(user).model if history is not None else "popular"
                    assert (served.model, served.model_version) == (name, today[name].version)
                    expected = today[name].rank(history, k)
                    assert served.items == expected, (user, k, attempt)
        cache = service.pool.get("hymirec")
        assert cache is not None and cache.interest_cache.hits > 0
    finally:
        service.close()


def test_a_changed_history_is_ranked_anew(world: World) -> None:
    service = RecommendationService.build(world.settings)
    try:
        splitter = Splitter(load_experiments(world.settings.experiments_file))
        built = load_item_features(world.settings)
        users = [u for u in sorted(world.histories) if splitter.route(u).variant == "treatment"][:5]
        today = TodaysRanking(world, "hymirec")
        before = {u: service.recommend(u, 20).items for u in users}
        rows = []
        for user in users:
            items = world.histories[user]
            new_items = np.append(items, before[user][:3])  # the user played the top three
            rows.append(history_row(user, new_items, world.settings, built.codebook, built.table))
        FeatureStoreClient(world.settings).push_user_histories(rows)
        for user in users:
            after = service.recommend(user, 20).items
            assert after == today.rank(reference_history(world, service, user), 20)
            assert not set(after) & set(before[user][:3])  # now seen
    finally:
        service.close()


def test_the_lean_online_read_returns_what_feast_returns(world: World) -> None:
    service = RecommendationService.build(world.settings)
    try:
        users = [*sorted(world.histories), 100_001, 0, 2**63 - 1]
        expected = FeatureStoreClient(world.settings).user_histories(users)
        assert service.features.rows.read(users) == expected
        assert service.features.rows.read([users[5]]) == {users[5]: expected[users[5]]}
        assert sum(v is None for v in expected.values()) == 3
    finally:
        service.close()


def test_a_failing_online_read_is_a_feature_store_error(world: World) -> None:
    service = RecommendationService.build(world.settings)
    try:
        service.features.rows.config = None  # type: ignore[assignment]
        with pytest.raises(FeatureStoreError, match="online read failed"):
            service.features.read(1)
    finally:
        service.close()
