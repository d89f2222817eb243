"""Console views of what the pipeline produced (online features, progress)."""

from __future__ import annotations

import numpy as np

from core.settings import Settings
from features.codebook import ResidualCodebook
from features.store import FeatureStoreClient, UserHistoryFeatures

__all__ = ["describe_user", "print_user_features"]


def describe_user(
    row: UserHistoryFeatures,
    codebook: ResidualCodebook,
    titles: dict[int, str],
    show_recent: int = 5,
) -> list[str]:
    codes = codebook.unpack(row.long_codes)
    recent = [titles.get(i, f"item {i}") for i in row.recent_item_ids[-show_recent:]]
    return [
        f"user {row.user_id}: {row.history_len} events, last at ts_ms={row.last_ts_ms}",
        f"  recent (last {len(row.recent_item_ids)} ids kept; newest {len(recent)}): "
        + "; ".join(recent),
        f"  long history: {codes.shape[0]} items x {codes.shape[1]} codes = "
        f"{len(row.long_codes)} bytes (float32 would be {codes.shape[0] * 4 * codebook.dim} bytes)"
        f", codebook {row.codebook_version}",
        f"  newest codes: {np.asarray(codes[-3:]).tolist()}",
    ]


def print_user_features(settings: Settings, user_ids: list[int]) -> None:
    from features.item_features import load_item_features

    store = FeatureStoreClient(settings)
    codebook = load_item_features(settings).codebook
    rows = store.user_histories(user_ids)
    item_ids = sorted({i for r in rows.values() if r for i in r.recent_item_ids})
    meta = store.online(["item_metadata:title"], [{"item_id": i} for i in item_ids])
    titles = {int(i): str(t) for i, t in zip(meta["item_id"], meta["title"], strict=True)}
    for user in user_ids:
        row = rows[user]
        if row is None:
            print(f"user {user}: no online history")
            continue
        print("\n".join(describe_user(row, codebook, titles)))
