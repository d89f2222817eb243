"""Residual cosine codebook: numbers checked against brute-force references written here."""

from __future__ import annotations

import itertools
import json
import math
import socket

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import CodebookError
from core.movielens import item_texts, load_items
from features import item_embeddings
from features.codebook import ResidualCodebook, balanced_assignment, spherical_balanced_kmeans
from features.item_embeddings import embed_item_texts, embedding_cache_path

FAST = settings(max_examples=40, deadline=None)


def mixture(n: int = 240, dim: int = 24, topics: int = 10, noise: float = 0.25, seed: int = 0):
    """Items near a few topic directions, with very uneven topic weights (so balance matters)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = np.arange(1, topics + 1, dtype=float) ** 2
    topic = rng.choice(topics, size=n, p=weights / weights.sum())
    x = centres[topic] + noise * rng.standard_normal((n, dim)) / math.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_codebook(levels: int, size: int, dim: int = 3, seed: int = 0) -> ResidualCodebook:
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((levels, size, dim))
    centroids /= np.linalg.norm(centroids, axis=2, keepdims=True)
    return ResidualCodebook(centroids.astype(np.float32), rng.uniform(0.1, 1, (levels, size)))


def greedy_reference(sims: np.ndarray, capacity: int) -> np.ndarray:
    """The definition: all (item, centroid) pairs by cosine desc; take one if both are free."""
    n, k = sims.shape
    pairs = sorted((-sims[i, j], i, j) for i in range(n) for j in range(k))
    assigned, count = [-1] * n, [0] * k
    for _, i, j in pairs:
        if assigned[i] < 0 and count[j] < capacity:
            assigned[i], count[j] = j, count[j] + 1
    return np.array(assigned)


def encode_reference(codebook: ResidualCodebook, x: np.ndarray):
    """One item and one centroid at a time: max cosine, then subtract the projection."""
    centroids = codebook.centroids.astype(np.float64)
    codes, residuals = [], []
    for row in x.astype(np.float64):
        r, item_codes, item_residuals = row.copy(), [], []
        for level in range(codebook.levels):
            cosines = [
                float(r @ c) / (np.linalg.norm(r) * np.linalg.norm(c)) for c in centroids[level]
            ]
            best = max(range(codebook.size), key=lambda k: (cosines[k], -k))
            c = centroids[level, best]
            r = r - (r @ c) / (c @ c) * c
            item_codes.append(best)
            item_residuals.append(r)
        codes.append(item_codes)
        residuals.append(item_residuals)
    return np.array(codes), np.array(residuals).transpose(1, 0, 2)  # (n, L), (L, n, D)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return mixture()


@pytest.fixture(scope="module")
def deep(data) -> ResidualCodebook:
    return ResidualCodebook.fit(data, levels=4, size=16, iters=15, seed=0)


def test_decode_of_encode_is_close_and_beats_the_zero_byte_baseline(data, deep):
    cosine = deep.reconstruction_cosine(data, deep.encode(data))
    mean = data.mean(axis=0)
    baseline = data @ mean / (np.linalg.norm(data, axis=1) * np.linalg.norm(mean))
    assert cosine.mean() > 0.97
    assert np.quantile(cosine, 0.05) > 0.95
    assert cosine.mean() > baseline.mean() + 0.3


def test_reconstruction_cosine_does_not_fall_as_levels_are_added(data, deep):
    codes = deep.encode(data)
    means = []
    for kept in range(1, deep.levels + 1):
        truncated = codes.copy()
        truncated[:, kept:] = deep.UNKNOWN
        means.append(deep.reconstruction_cosine(data, truncated).mean())
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(means)), means
    assert means[-1] > means[0] + 0.01, means


def test_a_shallower_fit_is_a_prefix_of_a_deeper_one(data, deep):
    shallow = ResidualCodebook.fit(data, levels=2, size=16, iters=15, seed=0)
    np.testing.assert_array_equal(shallow.centroids, deep.centroids[:2])
    np.testing.assert_array_equal(shallow.scales, deep.scales[:2])


def test_encode_matches_a_one_item_at_a_time_reference(data, deep):
    x = data[:40]
    ref_codes, ref_residuals = encode_reference(deep, x)
    trace = deep.trace(x)
    np.testing.assert_array_equal(deep.encode(x), ref_codes)
    np.testing.assert_array_equal(trace.codes, ref_codes)
    np.testing.assert_allclose(trace.residuals[1:], ref_residuals, atol=1e-6)
    np.testing.assert_allclose(trace.residuals[0], x)


def test_each_residual_is_orthogonal_to_the_centroid_chosen_at_its_level(data, deep):
    trace = deep.trace(data)
    for level in range(deep.levels):
        chosen = deep.centroids[level][trace.codes[:, level]].astype(np.float64)
        before, after = trace.residuals[level], trace.residuals[level + 1]
        np.testing.assert_allclose(np.sum(after * chosen, axis=1), 0, atol=1e-9)
        np.testing.assert_allclose(trace.coefficients[:, level], np.sum(before * chosen, axis=1))
        # Pythagoras: removing a projection takes exactly a^2 off the squared norm.
        np.testing.assert_allclose(
            np.sum(after**2, axis=1),
            np.sum(before**2, axis=1) - trace.coefficients[:, level] ** 2,
            atol=1e-9,
        )


@FAST
@given(seed=st.integers(0, 10_000), levels=st.integers(1, 3), size=st.integers(1, 12))
def test_encode_picks_the_max_cosine_centroid_of_any_codebook(seed, levels, size):
    codebook = random_codebook(levels, size, dim=5, seed=seed)
    x = np.random.default_rng(seed + 1).standard_normal((15, 5)) * 3
    codes = codebook.encode(x)
    ref_codes, _ = encode_reference(codebook, x)
    np.testing.assert_array_equal(codes, ref_codes)


def test_scales_are_the_mean_coefficient_of_each_centroids_members(data, deep):
    trace = deep.trace(data)
    for level in range(deep.levels):
        for k in range(deep.size):
            members = trace.codes[:, level] == k
            expected = trace.coefficients[members, level].mean() if members.any() else 0.0
            assert deep.scales[level, k] == pytest.approx(expected, abs=1e-6)


def test_centroids_are_unit_norm_and_fit_is_deterministic(data, deep):
    np.testing.assert_allclose(np.linalg.norm(deep.centroids, axis=2), 1, atol=1e-6)
    again = ResidualCodebook.fit(data, levels=4, size=16, iters=15, seed=0)
    assert again.version == deep.version
    other = ResidualCodebook.fit(data, levels=4, size=16, iters=15, seed=1)
    assert other.version != deep.version


@FAST
@given(
    n=st.integers(1, 14),
    k=st.integers(1, 6),
    slack=st.integers(0, 1),
    seed=st.integers(0, 10_000),
    ties=st.booleans(),
)
def test_balanced_assignment_equals_the_sorted_pairs_greedy(n, k, slack, seed, ties):
    k = min(k, n)
    capacity = math.ceil(n / k) + slack
    rng = np.random.default_rng(seed)
    sims = rng.integers(-2, 3, (n, k)).astype(float) if ties else rng.uniform(-1, 1, (n, k))
    assigned = balanced_assignment(sims, capacity)
    np.testing.assert_array_equal(assigned, greedy_reference(sims, capacity))
    assert np.bincount(assigned, minlength=k).max() <= capacity


def test_fit_time_clusters_hold_at_most_ceil_n_over_k(data, deep):
    size = 16
    capacity = math.ceil(len(data) / size)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    centroids, assignment = spherical_balanced_kmeans(
        unit.astype(np.float64), size, 15, np.random.default_rng([0, 0])
    )
    # The same call fit() makes for level 0, so these are the fit-time clusters.
    np.testing.assert_allclose(centroids, deep.centroids[0], atol=1e-6)
    assert np.bincount(assignment, minlength=size).max() <= capacity
    # Without the constraint the uneven topics would overfill clusters: the check has teeth.
    free = np.bincount(np.argmax(unit @ centroids.T, axis=1), minlength=size)
    assert free.max() > capacity


def test_empty_clusters_are_reseeded_so_every_centroid_stays_a_unit_direction():
    # Nine items on three directions, four clusters of capacity three: one cluster must stay
    # empty during fitting and be re-seeded; duplicates and zero residuals must not break it.
    base = np.eye(3, 4)
    x = np.repeat(base, 3, axis=0)
    codebook = ResidualCodebook.fit(x, levels=3, size=4, iters=5, seed=0)
    np.testing.assert_allclose(np.linalg.norm(codebook.centroids, axis=2), 1, atol=1e-6)
    np.testing.assert_allclose(codebook.reconstruction_cosine(x, codebook.encode(x)), 1, atol=1e-6)


@pytest.mark.parametrize(
    ("size", "dtype", "unknown"), [(255, np.uint8, 255), (256, np.uint16, 256)]
)
def test_code_dtype_holds_the_reserved_unknown_value(size, dtype, unknown):
    codebook = random_codebook(levels=3, size=size)
    assert codebook.code_dtype == np.dtype(dtype)
    assert unknown == codebook.UNKNOWN
    assert codebook.bytes_per_item == 3 * np.dtype(dtype).itemsize
    assert codebook.encode(np.ones((2, 3))).dtype == np.dtype(dtype)


@FAST
@given(data=st.data(), size=st.sampled_from([2, 255, 256, 1000]), levels=st.integers(1, 4))
def test_pack_unpack_round_trip_including_unknown(data, size, levels):
    codebook = random_codebook(levels, size)
    n = data.draw(st.integers(0, 20))
    values = data.draw(st.lists(st.integers(0, size), min_size=n * levels, max_size=n * levels))
    codes = np.array(values, dtype=np.int64).reshape(n, levels)
    packed = codebook.pack(codes)
    assert len(packed) == n * codebook.bytes_per_item
    unpacked = codebook.unpack(packed)
    assert unpacked.dtype == codebook.code_dtype
    assert unpacked.shape == (n, levels)
    np.testing.assert_array_equal(unpacked, codes)


def test_pack_is_little_endian_row_major():
    codebook = random_codebook(levels=2, size=300)
    assert codebook.pack(np.array([[1, 256], [300, 2]])) == bytes([1, 0, 0, 1, 44, 1, 2, 0])


def test_unpack_rejects_a_partial_item_and_out_of_range_values():
    codebook = random_codebook(levels=3, size=300)
    with pytest.raises(CodebookError, match="not a multiple of 6"):
        codebook.unpack(b"\x00" * 7)
    with pytest.raises(CodebookError, match="UNKNOWN"):
        codebook.unpack(np.array([301, 0, 0], dtype="<u2").tobytes())


def test_decode_is_the_sum_of_scaled_centroids_and_unknown_drops_a_level(deep, data):
    codes = deep.encode(data[:30]).astype(np.int64)
    expected = sum(
        deep.scales[level, codes[:, level], None] * deep.centroids[level, codes[:, level]]
        for level in range(deep.levels)
    )
    np.testing.assert_allclose(deep.decode(codes), expected, atol=1e-6)
    for level in range(deep.levels):
        dropped = codes.copy()
        dropped[:, level] = deep.UNKNOWN
        term = deep.scales[level, codes[:, level], None] * deep.centroids[level, codes[:, level]]
        np.testing.assert_allclose(deep.decode(dropped), expected - term, atol=1e-6)
    everything_unknown = np.full((2, deep.levels), deep.UNKNOWN)
    np.testing.assert_array_equal(deep.decode(everything_unknown), 0)
    assert deep.decode(codes).dtype == np.float32


def test_save_load_round_trip(tmp_path, data, deep):
    deep.save(tmp_path / "cb")
    loaded = ResidualCodebook.load(tmp_path / "cb")
    assert loaded.version == deep.version
    np.testing.assert_array_equal(loaded.centroids, deep.centroids)
    np.testing.assert_array_equal(loaded.encode(data), deep.encode(data))
    meta = json.loads((tmp_path / "cb" / "codebook.json").read_text())
    assert meta == {"levels": 4, "size": 16, "dim": 24, "version": deep.version}


def test_load_rejects_a_mismatched_version_and_a_missing_folder(tmp_path, deep):
    deep.save(tmp_path)
    meta = json.loads((tmp_path / "codebook.json").read_text())
    (tmp_path / "codebook.json").write_text(json.dumps(meta | {"version": "0" * 16}))
    with pytest.raises(CodebookError, match="does not match"):
        ResidualCodebook.load(tmp_path)
    with pytest.raises(CodebookError, match="cannot load"):
        ResidualCodebook.load(tmp_path / "absent")


def nan_row() -> np.ndarray:
    x = mixture(n=20)
    x[3, 1] = np.nan
    return x


@pytest.mark.parametrize(
    ("embeddings", "kwargs", "message"),
    [
        (np.ones(10), {}, "2-D array"),
        (nan_row(), {}, "NaN or inf"),
        (mixture(n=20), {"size": 21}, "size 21 exceeds the number of embeddings 20"),
        (mixture(n=20), {"levels": 0}, "levels must be an integer >= 1"),
        (mixture(n=20), {"size": 2.5}, "size must be an integer >= 1"),
        (mixture(n=20), {"iters": 0}, "iters must be an integer >= 1"),
        (np.array([["a", "b"]]), {}, "real numbers"),
    ],
)
def test_fit_rejects_bad_input_with_a_message_naming_it(embeddings, kwargs, message):
    arguments = {"levels": 2, "size": 4} | kwargs
    with pytest.raises(CodebookError, match=message):
        ResidualCodebook.fit(embeddings, **arguments)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda cb: cb.encode(np.ones((2, 5))), "dim 5; this codebook expects 3"),
        (lambda cb: cb.decode(np.zeros((2, 3), dtype=int)), r"codes must be \(n, 2\)"),
        (lambda cb: cb.decode(np.array([[0, 9]])), r"0\.\.8 \(8 = UNKNOWN\)"),
        (lambda cb: cb.decode(np.array([[-1, 0]])), "must lie in"),
        (lambda cb: cb.decode(np.array([[0.5, 1.0]])), "must be integers"),
        (lambda cb: cb.pack(np.array([[0, 9]])), "must lie in"),
        (lambda cb: cb.reconstruction_cosine(np.ones((3, 3)), np.zeros((2, 2), int)), "3 emb"),
    ],
)
def test_encode_decode_pack_reject_bad_shapes_and_values(call, message):
    with pytest.raises(CodebookError, match=message):
        call(random_codebook(levels=2, size=8))


def test_constructor_rejects_inconsistent_arrays():
    with pytest.raises(CodebookError, match="scales must be"):
        ResidualCodebook(np.ones((2, 4, 3), dtype=np.float32), np.ones((2, 5)))
    with pytest.raises(CodebookError, match="levels, size, dim"):
        ResidualCodebook(np.ones((4, 3), dtype=np.float32), np.ones(4))


# The codebook's input: real item text embeddings (kept here beside the codebook they feed).


def test_real_movielens_texts_embed_offline_normalised_cached_and_meaningful(tmp_path, monkeypatch):
    items = load_items()
    titles = ["Godfather, The", "Godfather: Part II, The", "Toy Story"]
    chosen = items.set_index("title").loc[titles].reset_index()
    texts = item_texts(chosen)

    def no_network(*args, **kwargs):
        raise AssertionError("the encoder tried to open a network connection")

    with monkeypatch.context() as offline:
        offline.setattr(socket.socket, "connect", no_network)
        first = embed_item_texts(texts, tmp_path)
    assert first.shape == (3, 384)
    assert first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1, atol=1e-6)
    assert embedding_cache_path(texts, tmp_path).is_file()

    def no_model():
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(item_embeddings, "load_sentence_encoder", no_model)
    np.testing.assert_array_equal(embed_item_texts(texts, tmp_path), first)
    similar, different = first[0] @ first[1], first[0] @ first[2]
    assert similar > different + 0.1, (similar, different)
