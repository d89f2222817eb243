"""HyMiRec's long branch options: age positions (``long_positions``), its own projection, and
the codebook fitted on trained item embeddings (``model.stage1_codebook``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from benchmarks.variants import parse_variant
from core.errors import ConfigError
from model.base import CatalogInfo
from model.hymirec_model import LONG_AGE_BUCKETS, Config, HyMiRec, long_age_buckets
from model.stage1_codebook import with_trained_codebook
from serving.models import LoadedModel, encode_long
from tests.model.test_hymirec import HISTORY, LEVELS, TINY, batch_of, make_catalog, random_text

AGED = dataclasses.replace(TINY, long_positions=True)
OWN = dataclasses.replace(TINY, long_positions=True, long_projection="own")


@pytest.fixture(scope="module")
def catalog() -> CatalogInfo:
    return make_catalog(random_text())


def model_with(catalog: CatalogInfo, config: Config, seed: int = 0) -> HyMiRec:
    torch.manual_seed(seed)
    model = HyMiRec(catalog, config)
    if model.long_ages is not None:  # init draws N(0, 0.02): make ages matter in a test
        torch.nn.init.normal_(model.long_ages.weight, std=1.0)
    return model.eval()


def test_age_buckets_are_floor_log2_of_age_plus_one_capped() -> None:
    length = 5000
    ages = range(length - 1, -1, -1)  # newest last, age 0
    expected = [min((age + 1).bit_length() - 1, LONG_AGE_BUCKETS - 1) for age in ages]
    assert long_age_buckets(length).tolist() == expected
    assert long_age_buckets(0).shape == (0,)


@pytest.mark.parametrize("config", [AGED, OWN], ids=["aged", "own-projection"])
def test_left_padding_keeps_the_ages_and_the_interests(
    catalog: CatalogInfo, config: Config
) -> None:
    model = model_with(catalog, config)
    with torch.no_grad():
        plain = model.user_interests(batch_of(HISTORY))
        padded = model.user_interests(batch_of(F.pad(HISTORY, (9, 0))))
    assert torch.allclose(plain, padded, atol=1e-6)


def test_ages_make_the_long_branch_see_order(catalog: CatalogInfo) -> None:
    """Attention pooling is blind to the order of the long history; with ages it is not."""
    long = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    reordered = long.flip(1)
    for config, blind in ((TINY, True), (AGED, False)):
        model = model_with(catalog, config)
        with torch.no_grad():
            a, b = (model.encode_long(catalog.codes[x]) for x in (long, reordered))
        assert torch.allclose(a, b, atol=1e-5) is blind


def test_serving_fast_path_equals_the_model_with_ages_and_own_projection(
    catalog: CatalogInfo,
) -> None:
    model = model_with(catalog, OWN)
    assert model.code_projection() is model.long_project is not None
    loaded = LoadedModel.build("hymirec", "v000001", model, 0)
    assert loaded.code_table is not None
    gen = torch.Generator().manual_seed(1)
    for length in (0, 1, 7, 300):
        codes = torch.randint(0, model.decoder.unknown + 1, (3, length, LEVELS), generator=gen)
        with torch.no_grad():
            assert torch.equal(
                encode_long(model, loaded.code_table, codes), model.encode_long(codes)
            )


def test_trained_codebook_replaces_codes_with_those_of_the_given_vectors(
    catalog: CatalogInfo,
) -> None:
    gen = torch.Generator().manual_seed(3)
    vectors = F.normalize(torch.randn(catalog.num_items + 1, 12, generator=gen), dim=-1)
    replaced, cosine = with_trained_codebook(catalog, vectors, seed=0)
    levels, size = catalog.codebook_centroids.shape[:2]
    assert replaced.codebook_centroids.shape == (levels, size, 12)
    assert replaced.codes.shape == catalog.codes.shape
    assert (replaced.codes[0] == size).all()  # the pad stays UNKNOWN
    # Independent decode: the sum over levels of scale x centroid, then the cosine per item.
    rows = torch.arange(levels)
    decoded = torch.stack(
        [
            (replaced.codebook_scales[rows, c][:, None] * replaced.codebook_centroids[rows, c]).sum(
                0
            )
            for c in replaced.codes[1:]
        ]
    )
    expected = F.cosine_similarity(decoded, vectors[1:], dim=-1).mean().item()
    assert cosine == pytest.approx(expected, abs=1e-5)
    assert replaced.text_embeddings is catalog.text_embeddings
    # A model reading that codebook through its own projection trains and scores.
    model = model_with(replaced, OWN)
    model.train()
    targets = torch.tensor([[20, 21], [30, 31]])
    model.loss(batch_of(HISTORY, targets)).backward()
    assert model.long_project is not None and model.long_project.weight.grad is not None
    with pytest.raises(ValueError, match="row 0 = pad"):
        with_trained_codebook(catalog, vectors[1:])


def test_codebook_variant_key_is_checked() -> None:
    assert parse_variant("hymirec:codebook=trained,interests=1").codebook == "trained"
    with pytest.raises(ConfigError, match="codebook"):
        parse_variant("hymirec:codebook=learned")
    with pytest.raises(ConfigError, match="codebook"):
        parse_variant("sasrec:codebook=trained")
    assert parse_variant("hymirec:cut=last").harness == {"cut": "last"}
    with pytest.raises(ConfigError, match="cut"):
        parse_variant("hymirec:cut=every")
    with pytest.raises(ConfigError, match="long_projection"):
        Config(long_projection="text")  # type: ignore[arg-type]


def test_state_interest_appends_the_newest_recent_state_and_leaves_training_alone(
    catalog: CatalogInfo,
) -> None:
    model = model_with(catalog, TINY)
    long, recent = HISTORY[:, : -TINY.recent_len], HISTORY[:, -TINY.recent_len :]
    targets = torch.tensor([[20, 21], [30, 31]])
    with torch.no_grad():
        coarse = model.encode_long(catalog.codes[long])
        plain = model.refine(coarse, recent)
        _, states = model._refine(coarse, recent)  # every position, full forward
        loss = model.loss(batch_of(HISTORY, targets))
        model.config = dataclasses.replace(TINY, state_interest=True)
        both = model.refine(coarse, recent)
        assert both.shape == (2, TINY.interests + 1, TINY.dim)
        assert torch.allclose(both[:, :-1], plain, atol=1e-6)
        assert torch.allclose(both[:, -1], states[:, -1], atol=1e-6)
        assert torch.equal(model.loss(batch_of(HISTORY, targets)), loss)
        # No recent item: the extra row repeats the first interest, so the ranking is unchanged.
        cold = model.refine(coarse, torch.zeros(2, 0, dtype=torch.long))
        assert torch.equal(cold[:, -1], cold[:, 0])
        items = model.item_embeddings()
        scores = model.interest_scores(both, items)
        by_hand = TINY.temperature * torch.logsumexp(both @ items.T / TINY.temperature, dim=1)
        assert torch.allclose(scores, by_hand, atol=1e-5)


def test_more_recent_items_than_the_window_is_an_error(catalog: CatalogInfo) -> None:
    model = model_with(catalog, dataclasses.replace(TINY, state_interest=True))
    coarse = model.encode_long(torch.zeros(1, 0, LEVELS, dtype=torch.long))
    too_many = torch.ones(1, TINY.recent_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=f"at most {TINY.recent_len} allowed"):
        model.refine(coarse, too_many)
