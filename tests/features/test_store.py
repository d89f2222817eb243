"""The Feast adapter on the real Feast store (local provider, SQLite online store)."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import FeatureStoreError
from core.settings import FEATURE_REPO_DIR, Settings
from features.item_features import ItemCodeTable
from features.store import (
    FeatureStoreClient,
    UserHistoryFeatures,
    _repo_config,
    user_history_frame,
)


def test_both_configs_parse_with_paths_from_settings(tmp_path: Path) -> None:
    local = _repo_config(Settings(data_dir=tmp_path))
    assert local.online_store.type == "sqlite"
    assert local.online_store.path == f"{tmp_path.resolve()}/feast/online_store.db"
    production = _repo_config(
        Settings(
            data_dir=tmp_path,
            features_store_config=FEATURE_REPO_DIR / "feature_store.production.yaml",
            features_redis_url="redis.internal:6379",
        )
    )
    assert production.online_store.type == "redis"
    assert production.online_store.connection_string == "redis.internal:6379"


def test_a_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FeatureStoreError, match="cannot read Feast config"):
        FeatureStoreClient(
            Settings(data_dir=tmp_path, features_store_config=tmp_path / "nope.yaml")
        )


def test_pushed_histories_read_back_and_later_pushes_replace_them(tmp_path: Path) -> None:
    client = FeatureStoreClient(Settings(data_dir=tmp_path))
    names = client.apply_definitions()
    assert {"user_history", "item_codebook", "item_metadata", "user_history_push"} <= set(names)
    first = UserHistoryFeatures(7, [1, 2, 3], b"\x01\x02\x03", 3, 30, 11, "v1")
    client.push_user_histories([first, UserHistoryFeatures(8, [9], b"\x09", 1, 5, 2, "v1")])
    assert client.user_histories([7, 8, 99]) == {
        7: first,
        8: UserHistoryFeatures(8, [9], b"\x09", 1, 5, 2, "v1"),
        99: None,
    }
    newer = UserHistoryFeatures(7, [2, 3, 4], b"\x02\x03\x04", 4, 40, 12, "v1")
    client.push_user_histories([newer])
    assert client.user_histories([7])[7] == newer
    # push_user_histories writes the view directly: it must be the only one the source feeds.
    views = client.store.list_feature_views()
    fed = [v.name for v in views if v.stream_source and v.stream_source.name == "user_history_push"]
    assert fed == ["user_history"]


_int64 = st.integers(0, 2**63 - 1)
_rows = st.lists(
    st.builds(
        UserHistoryFeatures,
        user_id=_int64,
        recent_item_ids=st.lists(_int64, max_size=5),
        long_codes=st.binary(max_size=12),
        history_len=_int64,
        last_ts_ms=_int64,
        last_offset=st.integers(-1, 2**63 - 1),
        codebook_version=st.text(max_size=8),
    ),
    min_size=1,
    max_size=6,
    unique_by=lambda row: row.user_id,
)


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureStoreClient, ...]:
    clients = []
    for name in ("fast", "reference"):
        client = FeatureStoreClient(Settings(data_dir=tmp_path_factory.mktemp(name)))
        client.apply_definitions()
        clients.append(client)
    return tuple(clients)


@settings(max_examples=25, deadline=None)
@given(rows=_rows)
def test_push_user_histories_stores_what_feasts_push_stores(
    two_stores: tuple[FeatureStoreClient, FeatureStoreClient], rows: list[UserHistoryFeatures]
) -> None:
    """The direct write against Feast's own push of the same frame (the reference)."""
    fast, reference = two_stores
    fast.push_user_histories(rows)
    reference.push("user_history_push", user_history_frame(rows))
    users = [row.user_id for row in rows]
    assert (
        fast.user_histories(users)
        == reference.user_histories(users)
        == {row.user_id: row for row in rows}
    )


def test_item_code_lookup_marks_unknown_items() -> None:
    table = ItemCodeTable(
        item_ids=np.array([3, 5, 9]),
        codes=np.array([[1, 2], [3, 4], [5, 6]], np.uint8),
        unknown=255,
    )
    np.testing.assert_array_equal(
        table.lookup([9, 4, 3, 100, 0]), [[5, 6], [255, 255], [1, 2], [255, 255], [255, 255]]
    )
    assert table.lookup([]).shape == (0, 2)
