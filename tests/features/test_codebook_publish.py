"""The published codebook: its rows decode exactly as ResidualCodebook.decode, also after a round
trip through a real Feast store, and publishing a new version leaves the older one readable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import CodebookError
from core.settings import Settings
from features.codebook import ResidualCodebook
from features.codebook_publish import codebook_frames, decode_vectors, publish_codebook
from features.decode import CodebookTable
from features.store import FeatureStoreClient


def random_codebook(levels: int, size: int, dim: int, seed: int = 0) -> ResidualCodebook:
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((levels, size, dim))
    centroids /= np.linalg.norm(centroids, axis=2, keepdims=True)
    return ResidualCodebook(centroids.astype(np.float32), rng.uniform(0.1, 1, (levels, size)))


def table_of(codebook: ResidualCodebook) -> CodebookTable:
    return CodebookTable(codebook.version, codebook.code_dtype.itemsize, decode_vectors(codebook))


@settings(max_examples=40, deadline=None)
@given(
    levels=st.integers(1, 4),
    size=st.sampled_from([2, 7, 255, 256, 300]),  # 256 and 300 need two-byte codes
    items=st.integers(0, 30),
    seed=st.integers(0, 2**16),
)
def test_the_client_decoder_equals_the_codebook_decode_bit_for_bit(
    levels: int, size: int, items: int, seed: int
) -> None:
    codebook = random_codebook(levels, size, dim=5, seed=seed)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, size + 1, (items, levels))  # size itself is UNKNOWN
    packed = codebook.pack(codes)
    table = table_of(codebook)
    np.testing.assert_array_equal(table.unpack(packed), codes)
    decoded = table.decode(packed)
    assert decoded.dtype == np.float32 and decoded.shape == (items, 5)
    np.testing.assert_array_equal(decoded, codebook.decode(codes))


def test_the_decoder_refuses_partial_items_and_codes_past_unknown() -> None:
    table = table_of(random_codebook(levels=2, size=7, dim=3))
    with pytest.raises(CodebookError, match="not whole items of 2 bytes"):
        table.unpack(b"\x01\x02\x03")
    with pytest.raises(CodebookError, match="code 9 is above"):
        table.unpack(bytes([1, 9]))


def test_frames_hold_one_meta_row_and_every_level_and_code() -> None:
    codebook = random_codebook(levels=3, size=300, dim=4)
    meta, centroids = codebook_frames(codebook)
    assert meta.drop(columns="event_timestamp").to_dict("records") == [
        {"codebook_version": codebook.version, "levels": 3, "size": 300, "dim": 4, "code_bytes": 2}
    ]
    assert len(centroids) == 3 * 301
    assert set(zip(centroids["level"], centroids["code"], strict=True)) == {
        (level, code) for level in range(3) for code in range(301)
    }
    unknown = centroids[centroids["code"] == 300]["vector"]
    assert all(np.array_equal(v, np.zeros(4)) for v in unknown)
    row = centroids[(centroids["level"] == 1) & (centroids["code"] == 5)]["vector"].iloc[0]
    np.testing.assert_array_equal(
        row, np.float64(codebook.scales[1, 5]) * codebook.centroids[1, 5].astype(np.float64)
    )


def _read_back(client: FeatureStoreClient, codebook: ResidualCodebook) -> CodebookTable:
    meta = client.online(
        ["codebook_meta:levels", "codebook_meta:size", "codebook_meta:dim",
         "codebook_meta:code_bytes"],
        [{"codebook_version": codebook.version}],
    )  # fmt: skip
    levels, size, dim = meta["levels"][0], meta["size"][0], meta["dim"][0]
    rows = [
        {"codebook_version": codebook.version, "level": level, "code": code}
        for level in range(levels)
        for code in range(size + 1)
    ]
    vectors = client.online(["codebook_centroids:vector"], rows)["vector"]
    return CodebookTable(
        codebook.version, meta["code_bytes"][0], np.asarray(vectors).reshape(levels, size + 1, dim)
    )


def test_a_newer_version_leaves_the_older_one_readable(tmp_path: Path) -> None:
    settings_ = Settings(data_dir=tmp_path)
    client = FeatureStoreClient(settings_)
    client.apply_definitions()
    old, new = random_codebook(3, 9, 6, seed=1), random_codebook(2, 300, 6, seed=2)
    assert publish_codebook(client, settings_.feast_dir, old) == old.version
    publish_codebook(client, settings_.feast_dir, new)
    publish_codebook(client, settings_.feast_dir, old)  # a republish of the same rows is harmless
    codes = np.array([[0, 8, 9], [3, 3, 1]])
    for codebook, item_codes in ((old, codes), (new, codes[:, :2] * 30)):
        table = _read_back(client, codebook)
        np.testing.assert_array_equal(table.vectors, decode_vectors(codebook))
        packed = codebook.pack(item_codes)
        np.testing.assert_array_equal(table.decode(packed), codebook.decode(item_codes))
    offline = tmp_path / "feast" / "offline"
    versions = pd.read_parquet(offline / "codebook_centroids.parquet")["codebook_version"]
    assert versions.value_counts().to_dict() == {old.version: 3 * 10, new.version: 2 * 301}
