"""The online-training core: stream histories, examples, catalogue growth, exact resume."""

from __future__ import annotations

import dataclasses
import functools
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import zoo
from model.base import Batch, SequentialRecommender
from model.checkpoint_registry import CheckpointRegistry
from model.interest_merge import Merge
from model.popularity import Config, PopularityRecommender
from model.training.online import ModelTrainer, StreamRecord, TrainerOptions, load_version_model
from model.training.online_core import (
    Example,
    StreamHistories,
    examples_for_step,
    extend_catalog,
    grow_model,
    length_buckets,
    make_batch,
    prequential_metrics,
)
from streaming.schema import TrainingSample
from tests.model.offline_fixtures import tiny_catalog

NUM_ITEMS = 40


def _sample(user: int, seq: int, item: int, recent: list[int] | None = None) -> TrainingSample:
    return TrainingSample(
        event_id=uuid.uuid4(),
        user_id=user,
        item_id=item,
        event_type="click",
        ts_ms=1_000_000 + seq * 1000,
        seq=seq,
        recent_item_ids=recent or [],
    )


def _stream(users: int, per_user: int, seed: int = 0, items: int = NUM_ITEMS) -> list[StreamRecord]:
    """Interleaved users; each walks the catalogue with a user-specific stride (learnable)."""
    rng = np.random.default_rng(seed)
    records, seqs, histories = [], dict.fromkeys(range(users), 0), {u: [] for u in range(users)}
    order = rng.permutation(np.repeat(np.arange(users), per_user))
    for offset, user in enumerate(order.tolist()):
        seq = seqs[user]
        item = 1 + (user * 3 + seq * (1 + user % 4)) % items
        records.append(
            StreamRecord(user % 2, offset, _sample(user, seq, item, histories[user][-5:]), 0)
        )
        histories[user].append(item)
        seqs[user] += 1
    return records


def test_histories_skip_repeats_seed_gaps_and_keep_the_last_items() -> None:
    histories = StreamHistories(max_len=3)
    assert histories.apply(_sample(7, 0, 5)) == "new"
    assert histories.apply(_sample(7, 0, 5)) == "duplicate"
    assert histories.apply(_sample(7, 1, 6)) == "new"
    # seq 4 after seq 1: the samples 2 and 3 are missing; the sample's recent items fill in.
    assert histories.apply(_sample(7, 4, 9, recent=[5, 6, 7, 8])) == "gap"
    assert histories.items(7) == [7, 8, 9]
    assert histories.next_seq(7) == 5
    restored = StreamHistories.from_state(histories.state())
    assert restored.items(7) == [7, 8, 9] and restored.next_seq(7) == 5


def test_examples_follow_each_models_cut_policy() -> None:
    histories = StreamHistories(max_len=100)
    for seq, item in enumerate([3, 4, 5, 6, 7, 8]):
        histories.apply(_sample(1, seq, item))
    rng = np.random.default_rng(0)
    # SASRec-style: the newest prefix, predicting the newest item (every position is learned).
    last = examples_for_step(histories, {1: (3, 6)}, zoo.training_defaults("sasrec"), 0, rng)
    assert len(last) == 1
    assert last[0].history.tolist() == [3, 4, 5, 6, 7] and last[0].targets.tolist() == [8]
    # HyMiRec-style: cuts only at the new positions, each predicting the items after it.
    defaults = zoo.training_defaults("hymirec")
    cuts = examples_for_step(histories, {1: (3, 6)}, defaults, 0, rng)
    assert 1 <= len(cuts) <= min(defaults.samples_per_user, 3)
    for example in cuts:
        cut = len(example.history)
        assert cut in (3, 4, 5)
        assert example.targets.tolist() == [3, 4, 5, 6, 7, 8][cut : cut + defaults.target_window]
    # Replay adds examples from the whole history, ratio per new example.
    mixed = examples_for_step(histories, {1: (3, 6)}, zoo.training_defaults("sasrec"), 2, rng)
    assert len(mixed) == 3
    batch = make_batch(mixed, 1)
    assert batch.history.shape == (3, 5) and batch.targets[:, 0].tolist() == [8, 8, 8]


@pytest.mark.parametrize("name", ["sasrec", "hymirec"])
def test_growing_the_catalogue_keeps_every_old_score(name: str) -> None:
    catalog = tiny_catalog(NUM_ITEMS)
    torch.manual_seed(0)
    config = {"max_len": 20} if name == "sasrec" else {}
    old = zoo.build(name, catalog, **config).eval()
    grown = zoo.build(name, extend_catalog(catalog, NUM_ITEMS + 7), **config)
    grow_model(old, grown, NUM_ITEMS + 1).eval()
    batch = make_batch(_examples_for(catalog), 1)
    with torch.no_grad():
        before = old.score_all(batch)
        after = grown.score_all(batch)
    assert after.shape[1] == NUM_ITEMS + 8
    torch.testing.assert_close(after[:, : NUM_ITEMS + 1], before)


def _examples_for(catalog: object) -> list:  # type: ignore[type-arg]
    histories = StreamHistories(20)
    for seq, item in enumerate([1, 5, 9, 13]):
        histories.apply(_sample(2, seq, item))
    return examples_for_step(
        histories, {2: (0, 4)}, zoo.training_defaults("sasrec"), 0, np.random.default_rng(0)
    )


def test_new_items_in_the_stream_get_learned_without_a_restart() -> None:
    trainer = ModelTrainer("sasrec", tiny_catalog(NUM_ITEMS), TrainerOptions(), {"max_len": 20})
    trainer.learn(_stream(6, 10))
    assert trainer.catalog.num_items == NUM_ITEMS
    new_item = NUM_ITEMS + 5
    # User 0 now keeps clicking a brand-new item after item 1.
    records = []
    for step in range(30):
        offset = 1000 + 2 * step
        records.append(StreamRecord(0, offset, _sample(99, 2 * step, 1), 0))
        records.append(StreamRecord(0, offset + 1, _sample(99, 2 * step + 1, new_item), 0))
    initial = None
    for start in range(0, len(records), 10):
        trainer.learn(records[start : start + 10])
        if initial is None:
            initial = trainer.model.item_embeddings()[new_item].detach().clone()
    assert trainer.catalog.num_items == new_item
    assert trainer.model.item_embeddings().shape[0] == new_item + 1
    assert initial is not None
    assert not torch.allclose(trainer.model.item_embeddings()[new_item], initial)
    # The optimiser kept its moments for the old rows across the growth.
    state = trainer.optimizer.state_dict()["state"] if trainer.optimizer else {}
    assert state and all(int(s["step"]) > 1 for s in state.values())


@pytest.mark.parametrize("name", ["sasrec", "hymirec", "popular"])
def test_resume_restores_exactly_what_was_published(name: str, tmp_path: Path) -> None:
    catalog = tiny_catalog(NUM_ITEMS)
    config = {"max_len": 20} if name == "sasrec" else {}
    trainer = ModelTrainer(name, catalog, TrainerOptions(), config)
    stream = _stream(8, 12)
    for start in range(0, 64, 16):
        trainer.learn(stream[start : start + 16])
    assert trainer.learn(stream[:16]) == 0  # already learned: offsets say so
    store = CheckpointRegistry(tmp_path)
    published = trainer.publish(store, "training", keep=3)
    resumed = ModelTrainer.resume(store.latest(name), catalog, TrainerOptions())  # type: ignore[arg-type]
    assert resumed.offsets == trainer.offsets and resumed.samples_seen == 64
    assert (
        resumed.digest == trainer.digest == sum(r.sample.event_id.int for r in stream[:64]) % 2**64
    )
    for user in range(8):
        assert resumed.histories.items(user) == trainer.histories.items(user)
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)
    if trainer.optimizer is not None:
        a, b = trainer.optimizer.state_dict(), resumed.optimizer.state_dict()  # type: ignore[union-attr]
        for index, moments in a["state"].items():
            for key, value in moments.items():
                torch.testing.assert_close(b["state"][index][key], value)
    # Both go on identically over the rest of the stream (same dropout draws).
    for copy in (trainer, resumed):
        torch.manual_seed(1)
        copy.learn(stream[64:])
    assert resumed.samples_seen == trainer.samples_seen == len(stream)
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)
    served = load_version_model(published, catalog)
    assert not served.training


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=40), width=st.integers(1, 70))
def test_length_buckets_split_every_row_once_and_pad_at_most_twofold(
    lengths: list[int], width: int
) -> None:
    buckets = length_buckets(np.array(lengths), width)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(len(lengths)))
    for rows in buckets:
        in_bucket = [lengths[i] for i in rows]
        # Padded to the bucket's longest: at most ``width``, else at most twice the shortest.
        assert max(in_bucket) <= width or max(in_bucket) <= 2 * min(in_bucket)


PROBE_MAX_LEN = 64
CATALOG = tiny_catalog(NUM_ITEMS)


class _NextItemBoost(PopularityRecommender):
    """A model with its own ``score_all`` (the fast path must call it): popularity plus one for
    each item that follows a history item in the catalogue's order."""

    def score_all(self, batch: Batch, merge: Merge | None = None) -> torch.Tensor:
        scores = super().score_all(batch, merge)
        following = batch.history % NUM_ITEMS + 1
        return scores.scatter_add(1, following, (batch.history > 0).float())


@functools.cache
def _ranking_model(name: str) -> SequentialRecommender:
    torch.manual_seed(0)
    if name == "next_item_boost":
        model: SequentialRecommender = _NextItemBoost(CATALOG, Config())
    else:
        fields = {f.name for f in dataclasses.fields(zoo.make_config(name))}
        config = {"max_len": PROBE_MAX_LEN} if "max_len" in fields else {}
        model = zoo.build(name, CATALOG, **config)
    if isinstance(model, PopularityRecommender):  # counts with ties: tie-breaking is exercised
        model.fit(torch.randint(0, 4, (NUM_ITEMS + 1,)).float())
    return model


@pytest.mark.parametrize("name", [*zoo.MODEL_NAMES, "next_item_boost"])
@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, PROBE_MAX_LEN), min_size=1, max_size=12),
    width=st.integers(1, 16),
    seed=st.integers(0, 10_000),
)
def test_bucketed_ranking_matches_the_reference(
    name: str, lengths: list[int], width: int, seed: int
) -> None:
    """The fast path (a forward per length bucket) against the plain one (one padded forward)."""
    model = _ranking_model(name)
    rng = np.random.default_rng(seed)
    examples = []
    for user, length in enumerate(lengths):
        history = rng.integers(1, NUM_ITEMS + 1, size=length)
        target = rng.integers(1, NUM_ITEMS + 1, size=1)
        examples.append(Example(user, history, np.zeros_like(history), target, np.zeros(1)))
    device = torch.device("cpu")
    reference = prequential_metrics(model, examples, CATALOG.genres, device, bucket_width=None)
    fast = prequential_metrics(model, examples, CATALOG.genres, device, bucket_width=width)
    assert fast.users == reference.users == len(examples)
    assert fast.result() == pytest.approx(reference.result(), abs=1e-9)
    assert model.training  # left in the mode it was in


def _learned(options: TrainerOptions, name: str = "sasrec") -> ModelTrainer:
    config = {"max_len": 20} if name == "sasrec" else {}
    trainer = ModelTrainer(name, tiny_catalog(NUM_ITEMS), options, config)
    stream = _stream(8, 12)
    torch.manual_seed(3)
    for start in range(0, len(stream), 32):
        trainer.learn(stream[start : start + 32])
    return trainer


def test_prequential_ranking_is_sampled_and_says_so(tmp_path: Path) -> None:
    exact = _learned(TrainerOptions(prequential_sample=None))
    # 96 samples of 8 users: every sample but each user's first has a history to rank with.
    assert exact.metrics()["prequential_examples"] == 88
    assert exact.metrics()["prequential_sampled_from"] == 88
    # A micro-batch of 32 has at most 32 probes: a limit of 32 ranks them all, the same way.
    assert _learned(TrainerOptions(prequential_sample=32)).metrics() == exact.metrics()
    # The plain reference path ranks the same.
    plain = _learned(TrainerOptions(prequential_sample=None, prequential_bucket=None))
    assert plain.metrics() == pytest.approx(exact.metrics(), abs=1e-9)
    sampled = _learned(TrainerOptions(prequential_sample=5))
    metrics = sampled.metrics()
    assert metrics["prequential_examples"] == 3 * 5  # three micro-batches, 5 probes each
    assert metrics["prequential_sampled_from"] == 88
    assert 0.0 <= metrics["prequential_recall@50"] <= 1.0
    assert _learned(TrainerOptions(prequential_sample=5)).metrics() == metrics  # seeded
    # Ranking fewer probes changes nothing about what is learned.
    for key, value in exact.model.state_dict().items():
        torch.testing.assert_close(sampled.model.state_dict()[key], value)
    meta = sampled.publish(CheckpointRegistry(tmp_path), "training", keep=2).metadata
    assert meta["prequential"] == {
        "ranked": 15,
        "probes": 88,
        "samples_learned": 96,
        "max_ranked_per_micro_batch": 5,
        "exact": False,
    }
    assert meta["metrics"]["prequential_examples"] == 15


def test_popular_builds_no_training_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("popular learns by counting; it needs no examples")

    monkeypatch.setattr("model.training.online.examples_for_step", refuse)
    trainer = _learned(TrainerOptions(), "popular")
    assert trainer.samples_seen == 96
    assert float(trainer.model.counts.sum()) == 96  # type: ignore[operator]
    assert trainer.metrics()["prequential_examples"] > 0  # still ranked, as the others
