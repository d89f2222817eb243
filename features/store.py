"""The Feast adapter: open the store from the settings, apply the definitions, push and read.

The feature_store.yaml named by the settings is a template whose ``${HYMIREC_*}`` placeholders are
filled from the settings object (not from the environment), so embedded and production differ only
by which yaml is named. Feast exceptions become :class:`~core.errors.FeatureStoreError` here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import yaml
from feast import FeatureStore, FeatureView
from feast.data_source import PushMode
from feast.infra.online_stores.helpers import get_online_store_from_config
from feast.infra.online_stores.online_store import OnlineStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Int64List
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig

from core.errors import FeatureStoreError
from core.settings import Settings

__all__ = [
    "USER_HISTORY_FEATURES",
    "FeatureStoreClient",
    "UserHistoryFeatures",
    "user_history_frame",
    "user_history_protos",
]

log = logging.getLogger(__name__)

USER_HISTORY_FEATURES = [
    "user_history:recent_item_ids",
    "user_history:long_codes",
    "user_history:history_len",
    "user_history:last_ts_ms",
    "user_history:last_offset",
    "user_history:codebook_version",
]


@dataclass(frozen=True)
class UserHistoryFeatures:
    """One user's online history row. ``long_codes`` is ``ResidualCodebook.pack`` output."""

    user_id: int
    recent_item_ids: list[int]
    long_codes: bytes
    history_len: int
    last_ts_ms: int
    last_offset: int
    codebook_version: str


def user_history_frame(
    rows: list[UserHistoryFeatures], now: datetime | None = None
) -> pd.DataFrame:
    """The DataFrame a push of user histories takes (one row per user)."""
    stamp = now or datetime.now(UTC)
    return pd.DataFrame(
        {
            "user_id": [r.user_id for r in rows],
            "recent_item_ids": [list(r.recent_item_ids) for r in rows],
            "long_codes": [r.long_codes for r in rows],
            "history_len": [r.history_len for r in rows],
            "last_ts_ms": [r.last_ts_ms for r in rows],
            "last_offset": [r.last_offset for r in rows],
            "codebook_version": [r.codebook_version for r in rows],
            "event_timestamp": [stamp] * len(rows),
        }
    )


UserHistoryProtos = list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]]


def user_history_protos(
    rows: list[UserHistoryFeatures], now: datetime | None = None
) -> UserHistoryProtos:
    """The rows as the online store writes them (what Feast makes of ``user_history_frame``)."""
    stamp = now or datetime.now(UTC)
    return [
        (
            EntityKeyProto(join_keys=["user_id"], entity_values=[ValueProto(int64_val=r.user_id)]),
            {
                "recent_item_ids": ValueProto(int64_list_val=Int64List(val=r.recent_item_ids)),
                "long_codes": ValueProto(bytes_val=r.long_codes),
                "history_len": ValueProto(int64_val=r.history_len),
                "last_ts_ms": ValueProto(int64_val=r.last_ts_ms),
                "last_offset": ValueProto(int64_val=r.last_offset),
                "codebook_version": ValueProto(string_val=r.codebook_version),
            },
            stamp,
            None,
        )
        for r in rows
    ]


def _repo_config(settings: Settings) -> RepoConfig:
    try:
        text = settings.features.store_config.read_text()
    except OSError as exc:
        raise FeatureStoreError(
            f"cannot read Feast config {settings.features.store_config}: {exc}"
        ) from exc
    raw = yaml.safe_load(settings.fill_template(text))
    try:
        config = RepoConfig(**raw)
    except Exception as exc:  # pydantic's error names the field
        raise FeatureStoreError(
            f"invalid Feast config {settings.features.store_config}: {exc}"
        ) from exc
    config.repo_path = settings.feast_dir
    return config


class FeatureStoreClient:
    """A Feast FeatureStore opened from the settings, with the project's reads and writes."""

    def __init__(self, settings: Settings) -> None:
        settings.feast_dir.mkdir(parents=True, exist_ok=True)
        (settings.feast_dir / "offline").mkdir(exist_ok=True)
        self._user_history_writer: tuple[OnlineStore, FeatureView] | None = None
        try:
            self.store = FeatureStore(config=_repo_config(settings))
        except FeatureStoreError:
            raise
        except Exception as exc:
            raise FeatureStoreError(f"cannot open the Feast store: {exc}") from exc

    def apply_definitions(self) -> list[str]:
        """Register the entities, push sources and feature views of ``features/feature_repo``."""
        from features.feature_repo import definitions

        objects = [
            value
            for name, value in vars(definitions).items()
            if not name.startswith("_")
            and type(value).__module__.startswith("feast.")
            and type(value).__name__ in {"Entity", "FeatureView", "PushSource"}
        ]
        try:
            self.store.apply(objects)
        except Exception as exc:
            raise FeatureStoreError(f"feast apply failed: {exc}") from exc
        return sorted(getattr(o, "name", "?") for o in objects)

    def push(self, push_source: str, frame: pd.DataFrame, offline: bool = False) -> None:
        """Upsert rows to the online store (and the offline store when asked)."""
        mode = PushMode.ONLINE_AND_OFFLINE if offline else PushMode.ONLINE
        try:
            self.store.push(push_source, frame, to=mode)
        except Exception as exc:
            raise FeatureStoreError(f"push to {push_source} failed: {exc}") from exc

    def push_user_histories(self, rows: list[UserHistoryFeatures]) -> None:
        """Upsert users' online histories (the stream worker calls this once per batch).

        The same write as ``push("user_history_push", user_history_frame(rows))`` (the test
        compares them), made the way Feast makes it once it has converted the frame: value protos
        handed to the online store's ``online_write_batch`` for the ``user_history`` view, the one
        view that push source feeds. Feast's ``push`` first rebuilds every feature view from the
        registry, lists the feature services, and goes through pandas and arrow: 3.8 ms for one
        row against 0.05 ms, 42 ms for 600 rows against 22 ms, measured here. The view is read
        from the registry once per client: apply new definitions, then restart the worker.
        """
        if not rows:
            return
        try:
            if self._user_history_writer is None:
                self._user_history_writer = (
                    get_online_store_from_config(self.store.config.online_store),
                    self.store.get_feature_view("user_history"),
                )
            online_store, view = self._user_history_writer
            data = user_history_protos(rows)
            online_store.online_write_batch(self.store.config, view, data, None)
        except Exception as exc:
            raise FeatureStoreError(f"push to user_history failed: {exc}") from exc

    def online(
        self, features: list[str], entity_rows: list[dict[str, Any]]
    ) -> dict[str, list[Any]]:
        try:
            response = self.store.get_online_features(features=features, entity_rows=entity_rows)
            result: dict[str, list[Any]] = response.to_dict()
        except Exception as exc:
            raise FeatureStoreError(f"online read failed: {exc}") from exc
        return result

    def user_histories(self, user_ids: list[int]) -> dict[int, UserHistoryFeatures | None]:
        """Read users' online histories; a user with none maps to ``None``."""
        data = self.online(USER_HISTORY_FEATURES, [{"user_id": int(u)} for u in user_ids])
        out: dict[int, UserHistoryFeatures | None] = {}
        for i, user in enumerate(data["user_id"]):
            if data["history_len"][i] is None:
                out[int(user)] = None
                continue
            out[int(user)] = UserHistoryFeatures(
                user_id=int(user),
                recent_item_ids=[int(x) for x in data["recent_item_ids"][i] or []],
                long_codes=bytes(data["long_codes"][i] or b""),
                history_len=int(data["history_len"][i]),
                last_ts_ms=int(data["last_ts_ms"][i]),
                last_offset=int(data["last_offset"][i]),
                codebook_version=str(data["codebook_version"][i]),
            )
        return out
