"""MovieLens-100K, read from the installed ``recbole`` wheel (a data-only dependency).

The data is never copied into this repository (its licence forbids redistribution); the files
are read from the installed package. Ratings come back in *replay order*: by timestamp, ties kept
in file order (a stable sort), which is the order the event stream replays them in.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import DataError

__all__ = ["item_texts", "load_items", "load_ratings", "movielens_dir", "replay_histories"]


def movielens_dir() -> Path:
    """Folder of the ML-100K atomic files inside the installed recbole package."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "MovieLens-100K comes from the recbole wheel: `pip install --no-deps recbole==1.2.1`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise DataError(f"ml-100k.inter not found under {folder}; reinstall recbole")
    return folder


def load_ratings(folder: Path | None = None) -> pd.DataFrame:
    """All ratings as ``user_id, item_id, rating, ts_ms`` (int64 but rating), in replay order."""
    path = (folder or movielens_dir()) / "ml-100k.inter"
    frame = pd.read_csv(path, sep="\t", header=0, names=["user_id", "item_id", "rating", "ts_s"])
    if frame.isna().any().any():
        raise DataError(f"{path} has missing values")
    frame = frame.astype({"user_id": "int64", "item_id": "int64", "rating": "float64"})
    frame["ts_ms"] = (frame.pop("ts_s").astype("float64") * 1000).astype("int64")
    return frame.sort_values("ts_ms", kind="stable").reset_index(drop=True)


def load_items(folder: Path | None = None) -> pd.DataFrame:
    """Item metadata as ``item_id, title, year, genres`` (genres: a list of strings), by item_id."""
    path = (folder or movielens_dir()) / "ml-100k.item"
    frame = pd.read_csv(
        path,
        sep="\t",
        header=0,
        names=["item_id", "title", "year", "genres"],
        dtype={"item_id": "int64", "title": "string", "year": "string", "genres": "string"},
        keep_default_na=False,
    )
    frame["year"] = pd.to_numeric(frame["year"], errors="coerce").fillna(0).astype("int64")
    frame["genres"] = [g.split() if g else [] for g in frame["genres"].astype(str)]
    frame["title"] = frame["title"].astype(str)
    return frame.sort_values("item_id").reset_index(drop=True)


def item_texts(items: pd.DataFrame) -> list[str]:
    """The text each item is embedded from: title, year and genres."""
    texts = []
    for title, year, genres in zip(items["title"], items["year"], items["genres"], strict=True):
        when = f" ({year})" if year else ""
        kinds = ", ".join(genres) if genres else "unknown genre"
        texts.append(f"{title}{when}. Genres: {kinds}.")
    return texts


def replay_histories(ratings: pd.DataFrame) -> dict[int, np.ndarray]:
    """Each user's item ids in replay order, computed straight from the ratings frame."""
    return {
        int(user): group["item_id"].to_numpy(dtype=np.int64)
        for user, group in ratings.groupby("user_id", sort=True)
    }
