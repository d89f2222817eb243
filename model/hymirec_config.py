"""HyMiRec's hyper-parameters (``model.hymirec_model`` builds the model from them), with the
comparisons on ML-100K that chose their defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.errors import ConfigError
from model.interest_merge import MERGES, Merge
from model.llm_refiner import check_llm_options

__all__ = ["Config"]


@dataclass(frozen=True)
class Config:
    """HyMiRec hyper-parameters; the defaults train one ML-100K epoch in ~10-20 s on 2 CPU cores.

    ``assignment="hungarian"`` is the default from a comparison on ML-100K (2026-11-26, harness
    defaults: lr 1e-3, batch 128, W = 5, max_len 1000, patience 3, <= 20 epochs, CPU, seeds 0-2):
    test NDCG@10 0.0661 vs 0.0529 for "argmax" (mean of 3 seeds; hungarian ahead on all 3), test
    HR@50 0.345 vs 0.347. Command: ``train_and_evaluate("hymirec", catalog, data, seed=s,
    epochs=20, overrides={"assignment": rule})``.

    ``dense_weight=1.0`` (the refiner's recent positions also predict their next item, SASRec's
    dense objective, ``HyMiRec.dense_loss``) and ``temperature=0.07`` from a comparison on
    ML-100K (2026-11-26, seed 0 only, batch 32 as in ``benchmarks/offline_eval.py``, patience 3,
    CPU, 1 torch thread; valid / test, Recall@50 and NDCG@10 of the best-on-valid epoch):

    ======================  ======  ===============  ===============  ======
    setting                 epochs  valid R@50/N@10  test R@50/N@10   Div@50
    ======================  ======  ===============  ===============  ======
    no dense loss, tau 0.07  <= 12  0.459 / 0.0824   0.414 / 0.0619   0.959
    dense 1.0, tau 0.07      <= 12  0.460 / 0.0905   0.405 / 0.0774   0.942
    dense 1.0, tau 0.1       <= 10  0.442 / 0.0922   0.408 / 0.0758   0.940
    dense 1.0, tau 0.2       <= 10  0.453 / 0.0913   0.401 / 0.0682   0.964
    ======================  ======  ===============  ===============  ======

    The dense loss lifts NDCG@10 (valid +0.008, test +0.016) at an unchanged Recall@50 (one
    seed: differences of 0.01 are noise); a warmer softmax bought nothing. Most of the gain over
    the 0.345 above is the smaller batch (4x more optimiser steps per epoch), not the dense loss.
    More samples per user (8 instead of 4) doubles an epoch's cost and was not tried. Command:
    ``train_and_evaluate("hymirec", catalog, data, seed=0, epochs=E, batch_size=32,
    overrides={"dense_weight": w, "temperature": tau})``.

    ``merge="logsumexp"`` from a comparison on ML-100K (2026-12-05, seeds 0-2, harness defaults:
    <= 20 epochs, patience 3, batch 32, CPU, 1 torch thread, 1-minute load 3.5-5 on 2 shared
    cores; the three rules score the same best-on-validation weights, selected with logsumexp;
    mean ± std over seeds):

    =========  ===============================  ===============================  =================
    merge      valid R@50 / NDCG@10             test R@50 / NDCG@10              tie-free test
    =========  ===============================  ===============================  =================
    max        0.4426 ± 0.0313 / 0.0840 ± .0048  0.4026 ± 0.0267 / 0.0657 ± .0085  0.3333 / 0.0507
    logsumexp  0.4652 ± 0.0227 / 0.0912 ± .0031  0.4175 ± 0.0274 / 0.0718 ± .0077  0.3535 / 0.0572
    gate       0.4641 ± 0.0254 / 0.0926 ± .0070  0.4206 ± 0.0245 / 0.0711 ± .0107  0.3586 / 0.0553
    =========  ===============================  ===============================  =================

    logsumexp beats max on both validation figures (+0.023 R@50, +0.007 NDCG@10); the gate and
    logsumexp are within 0.002 of each other on validation, well inside the seed spread, so the
    rule without learned parts is the default. Command: ``python -m benchmarks.offline_eval
    --models hymirec sasrec hstu --seeds 0 1 2 --threads 1 --multi-target 0``.

    ``long_positions=False`` from a comparison on ML-100K (2026-12-05, seeds 0-2, <= 20 epochs,
    patience 5, batch 32, CPU, 1 torch thread; test R@50 / NDCG@10 and valid NDCG@10, mean of 3
    seeds): with 4 interests 0.4199 / 0.0734 / 0.0981 with ages against 0.4196 / 0.0749 / 0.0964
    without; with 1 interest and the item bias 0.4475 / 0.0846 / 0.1057 against 0.4468 / 0.0848 /
    0.1055. The ages do reach the pooling (``tests/model/test_long_branch.py``) but buy nothing
    measurable, so they stay off. Command: ``python -m benchmarks.offline_eval --models
    --variants hymirec:long_positions=True hymirec:long_positions=True,item_bias=True,interests=1
    --seeds 0 1 2 --epochs 20 --patience 5 --threads 1 --multi-target 0``.

    ``state_interest=False`` (scoring with the refiner's newest recent state as one more
    interest) from a comparison on ML-100K (2026-12-05, seeds 0-2, patience 5, CPU; test R@50 /
    NDCG@10 / valid NDCG@10, with it against without): K = 4, <= 20 epochs, 0.4305 / 0.0775 /
    0.1003 against 0.4196 / 0.0749 / 0.0964; K = 1 with the item bias, <= 20 epochs, 0.4528 /
    0.0842 / 0.1073 against 0.4468 / 0.0848 / 0.1055; the same on the trained codebook, <= 30
    epochs, 0.4549 / 0.0900 / 0.1079 against 0.4539 / 0.0865 / 0.1044. Validation gains of
    0.002-0.004, inside one seed spread; it stays off until a closed-loop run (the demo's world)
    measures what it does to the served lists.
    """

    dim: int = 64  # model width (interests and item embeddings)
    heads: int = 2
    layers: int = 2  # blocks of the LLM-based recommender
    recent_len: int = 50  # R: the newest R items go to the LLM-based recommender as items
    coarse_interests: int = 4  # Kc: outputs of the lightweight recommender
    interests: int = 4  # K: refined interests, one retrieval query each
    dropout: float = 0.1
    temperature: float = 0.07  # softmax temperature on cosine scores
    use_id_embedding: bool = True
    assignment: Literal["hungarian", "argmax"] = "hungarian"
    kmeans_iters: int = 10  # Lloyd steps when grouping targets (hungarian only)
    diversity_weight: float = 0.0  # weight of the squared-cosine penalty between interests
    dense_weight: float = 1.0  # weight of the auxiliary next-item loss on the recent positions
    merge: Merge = "logsumexp"  # how the K interest scores become one (model/interest_merge.py)
    gate_weight: float = 1.0  # weight of the interest gate's own loss (0: the gate is not trained)
    item_bias: bool = False  # a learned per-item logit offset (popularity), beside the cosines
    # score with the newest recent position's state (trained by the dense loss) as one more
    # interest; training is unchanged (scoring and serving only)
    state_interest: bool = False
    long_positions: bool = False  # add a learned embedding of each long item's age (log2 buckets)
    # "adapter": the long history's codes approximate text embeddings and share the item encoder's
    # adapter; "own": their own linear map (a codebook fitted on other vectors, e.g. trained item
    # embeddings: ``model.stage1_codebook``)
    long_projection: Literal["adapter", "own"] = "adapter"
    refiner: Literal["transformer", "llm"] = "transformer"  # "llm": SmolLM2-135M (llm_refiner.py)
    llm_lora_rank: int = 8  # LoRA rank on the LLM's q/v projections (0: LLM wholly frozen)
    llm_layers: int = 0  # LLM blocks kept (0: all 30)
    llm_cache_dir: str = ""  # folder for the de-quantised LLM weights ("": de-quantise each build)

    def __post_init__(self) -> None:
        for name in ("dim", "heads", "layers", "recent_len", "coarse_interests", "interests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Config.{name} must be >= 1; got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ConfigError(f"Config.dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"Config.dropout must be in [0, 1); got {self.dropout}")
        if self.temperature <= 0.0:
            raise ConfigError(f"Config.temperature must be > 0; got {self.temperature}")
        if self.assignment not in ("hungarian", "argmax"):
            raise ConfigError(
                f"Config.assignment must be 'hungarian' or 'argmax'; got {self.assignment!r}"
            )
        if self.diversity_weight < 0.0:
            raise ConfigError(f"Config.diversity_weight must be >= 0; got {self.diversity_weight}")
        if self.dense_weight < 0.0:
            raise ConfigError(f"Config.dense_weight must be >= 0; got {self.dense_weight}")
        if self.merge not in MERGES:
            raise ConfigError(f"Config.merge must be one of {MERGES}; got {self.merge!r}")
        if self.gate_weight < 0.0:
            raise ConfigError(f"Config.gate_weight must be >= 0; got {self.gate_weight}")
        if self.long_projection not in ("adapter", "own"):
            raise ConfigError(
                f"Config.long_projection must be 'adapter' or 'own'; got {self.long_projection!r}"
            )
        if self.refiner not in ("transformer", "llm"):
            raise ConfigError(
                f"Config.refiner must be 'transformer' or 'llm'; got {self.refiner!r}"
            )
        check_llm_options(self.llm_lora_rank, self.llm_layers)
