"""The harness: training helps, early stopping keeps the best, checkpoints round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ConfigError, DataError
from model.evaluate import ranking_metrics
from model.training.offline import (
    evaluate_model,
    load_checkpoint,
    save_checkpoint,
    train_and_evaluate,
)
from tests.model.offline_fixtures import cyclic_data, tiny_catalog

TINY_SASREC = {"dim": 16, "heads": 1, "layers": 1, "dropout": 0.0}


def test_a_short_sasrec_run_beats_its_untrained_self_and_checkpoints(tmp_path: Path) -> None:
    catalog, data = tiny_catalog(20), cyclic_data(num_users=64, num_items=20, length=12)
    run = train_and_evaluate(
        "sasrec",
        catalog,
        data,
        seed=0,
        epochs=3,
        device="cpu",
        batch_size=32,
        lr=1e-2,
        max_len=10,
        overrides=TINY_SASREC,
    )
    untrained = run.history[0]["ndcg@10"]
    assert run.history[0]["epoch"] == 0.0 and len(run.history) == 4
    assert run.valid["ndcg@10"] > untrained + 0.1
    losses = [h["loss"] for h in run.history[1:]]
    assert losses[-1] < losses[0]
    assert run.config["dim"] == 16 and run.config["max_len"] == 10  # harness max_len reaches it
    assert run.samples_per_s > 0 and run.train_time_s > 0 and run.device == "cpu"
    assert "/proc/self/statm" in run.memory_method and run.peak_memory_mb >= 0
    assert set(run.test) >= {"recall@10", "ndcg@50", "hr@50", "diversity@50", "coverage@50"}

    path = tmp_path / "models" / "sasrec" / "seed0.pt"
    save_checkpoint(run, path)
    assert [p.name for p in path.parent.iterdir()] == ["seed0.pt"]  # no temp file left behind
    loaded = load_checkpoint(path, catalog)
    assert (loaded.name, loaded.seed, loaded.options["max_len"]) == ("sasrec", 0, 10)
    assert loaded.metrics["test"] == run.test
    again = evaluate_model(loaded.model, data, catalog.genres, "test", max_len=10)
    assert again == pytest.approx(run.test)


def test_popular_is_counted_not_trained() -> None:
    catalog, data = tiny_catalog(20), cyclic_data(num_users=30, num_items=20, length=8, seed=3)
    run = train_and_evaluate("popular", catalog, data, seed=0, epochs=5, device="cpu")
    assert (run.epochs_run, run.best_epoch, run.samples_per_s) == (0, 0, 0.0)
    counts = torch.zeros(21)
    for user in range(data.num_users):
        for item in data.training_part(user)[0]:
            counts[item] += 1
    from model.data import evaluation_batches

    chunk = next(evaluation_batches(data, "test", max_len=200, batch_size=1000))
    scores = counts.expand(data.num_users, 21).clone()
    assert run.test == pytest.approx(
        ranking_metrics(scores, chunk.target, catalog.genres, chunk.seen)
    )


def test_mismatched_catalogue_and_missing_checkpoint_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data has 20 items but the catalogue 5"):
        train_and_evaluate("popular", tiny_catalog(5), cyclic_data(4, 20, 5), seed=0, epochs=0)
    with pytest.raises(DataError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt", tiny_catalog(5))


def test_cli_train_then_eval_popular(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hymirec.cli import main
    from tests.conftest import EMBEDDING_CACHE

    for key, value in {
        "HYMIREC_DATA_DIR": str(tmp_path),
        "HYMIREC_CACHE_DIR": str(EMBEDDING_CACHE),
        "HYMIREC_CODEBOOK_LEVELS": "1",
        "HYMIREC_CODEBOOK_SIZE": "8",
    }.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--model", "popular", "--seed", "3"]) == 0
    trained = capsys.readouterr().out
    assert (tmp_path / "models" / "popular" / "seed3.pt").is_file()
    assert main(["eval", "--model", "popular", "--seed", "3"]) == 0
    evaluated = capsys.readouterr().out
    test_line = next(line for line in trained.splitlines() if line.startswith("test:"))
    assert evaluated.strip() == test_line.strip()
    assert main(["eval", "--model", "sasrec", "--seed", "3"]) == 2  # nothing trained: clear error
    assert "no checkpoint at" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sasrec", "hstu", "hymirec", "persrec", "fuxi_mme"])
def test_every_available_model_runs_one_epoch_through_the_harness(name: str) -> None:
    from model import zoo

    if not zoo.is_available(name):
        pytest.skip(f"{zoo.module_name(name)} does not exist yet")
    catalog, data = tiny_catalog(12), cyclic_data(num_users=16, num_items=12, length=10)
    small = {"dim": 16, "layers": 1}  # every model's Config has these two
    run = train_and_evaluate(
        name, catalog, data, seed=0, epochs=1, device="cpu", batch_size=8, overrides=small
    )
    assert run.epochs_run == 1 and len(run.history) == 2
    assert all(0.0 <= value <= 1.0 for value in run.test.values())


def test_samples_per_user_sets_the_prefixes_each_epoch_cuts() -> None:
    """HyMiRec cuts 4 prefixes per user and epoch by default; ``samples_per_user`` changes that
    (the issue's fair budget asks for >= 8) and the run records it; 0 is refused."""
    from model.data import training_batches

    catalog, data = tiny_catalog(12), cyclic_data(num_users=16, num_items=12, length=20)
    small = {"dim": 16, "layers": 1}
    run = train_and_evaluate(
        "hymirec", catalog, data, seed=0, epochs=1, device="cpu", samples_per_user=8,
        overrides=small,
    )  # fmt: skip
    assert run.options["samples_per_user"] == 8
    rng = np.random.default_rng(0)
    cut = sum(b.history.shape[0] for b in training_batches(data, 50, 8, rng, 5, "uniform", 8))
    assert cut == 16 * 8  # every user has more than 8 cut points
    with pytest.raises(ConfigError, match="samples_per_user must be >= 1"):
        train_and_evaluate("hymirec", catalog, data, seed=0, epochs=1, samples_per_user=0)
