"""Reading a registry version's model: the one place that knows the online checkpoint's format.

A version folder (``model.checkpoint_registry``) holds ``model.pt``: a dict with ``format``
(:data:`ONLINE_CHECKPOINT_FORMAT`), ``model_name``, ``config`` (the model's config as a dict),
``num_items`` (the catalogue size it was trained on; the catalogue only grows) and
``state_dict``. The trainer writes it (``model.training.online``); the trainer's resume and the
recommendation service read it through :func:`read_version_model`, so serving loads a version
without importing the trainer or its stream machinery.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from core.errors import DataError, TrainerError
from model import zoo
from model.base import CatalogInfo, SequentialRecommender
from model.checkpoint_registry import PublishedVersion

__all__ = [
    "ONLINE_CHECKPOINT_FORMAT",
    "extend_catalog",
    "load_version_model",
    "read_checkpoint_file",
    "read_version_model",
]

ONLINE_CHECKPOINT_FORMAT = "hymirec-online-checkpoint/1"


def read_checkpoint_file(path: Path) -> Any:
    """``torch.load`` of tensors and plain containers only; DataError if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several types for unreadable files
        raise DataError(f"cannot read {path}: {exc}") from exc


def extend_catalog(catalog: CatalogInfo, num_items: int) -> CatalogInfo:
    """The catalogue with rows up to ``num_items``: new items have no text (zero embedding),
    UNKNOWN codes and no genres, so they are learned from their id embedding alone."""
    extra = num_items - catalog.num_items
    if extra < 0:
        raise ValueError(f"cannot shrink the catalogue from {catalog.num_items} to {num_items}")
    if extra == 0:
        return catalog
    unknown = catalog.codebook_scales.shape[1]  # UNKNOWN = size (features.codebook)
    text = torch.zeros(extra, catalog.text_embeddings.shape[1])
    codes = torch.full((extra, catalog.codes.shape[1]), unknown, dtype=catalog.codes.dtype)
    return dataclasses.replace(
        catalog,
        num_items=num_items,
        text_embeddings=torch.cat([catalog.text_embeddings, text]),
        codes=torch.cat([catalog.codes, codes]),
        genres=[*catalog.genres, *([frozenset[str]()] * extra)],
    )


def read_version_model(
    published: PublishedVersion, catalog: CatalogInfo, device: torch.device
) -> tuple[SequentialRecommender, int]:
    """The version's model on ``device`` (in train mode, as built) and the catalogue size it
    was trained on (items beyond ``catalog`` get the rows :func:`extend_catalog` gives)."""
    payload = read_checkpoint_file(published.path / "model.pt")
    if not isinstance(payload, dict) or payload.get("format") != ONLINE_CHECKPOINT_FORMAT:
        raise DataError(f"{published.path} does not hold a {ONLINE_CHECKPOINT_FORMAT} model")
    num_items = int(payload["num_items"])
    if num_items < catalog.num_items:
        raise TrainerError(
            f"{published.path} was trained on {num_items} items but the catalogue has "
            f"{catalog.num_items}; the catalogue may only grow"
        )
    model = zoo.build(
        str(payload["model_name"]), extend_catalog(catalog, num_items), **payload["config"]
    )
    model.load_state_dict(payload["state_dict"])
    return model.to(device), num_items


def load_version_model(
    published: PublishedVersion, catalog: CatalogInfo, device: torch.device | str = "cpu"
) -> SequentialRecommender:
    """The model a registry version holds, in eval mode, for serving."""
    model, _ = read_version_model(published, catalog, torch.device(device))
    return model.eval()
