"""HyMiRec: a hybrid multi-interest sequential recommender (Zhou et al. 2025, arXiv 2510.13738).

What we follow from the paper (abstract and public summaries; the full method text was not
available to us):

1. **Item encoder.** An LLM encodes each item's text once; the encoder is then frozen and the
   embeddings cached (the paper's stage 1). Here the LLM is the catalog's sentence encoder
   (all-MiniLM-L6-v2, ``CatalogInfo.text_embeddings``), followed by a trainable linear adapter to
   the model width, plus a trainable item-ID embedding (``Config.use_id_embedding``, on by
   default: on MovieLens the collaborative signal in IDs matters, and titles alone are weak).
   The same vectors, L2-normalised, are what ``item_embeddings`` returns and retrieval scores.
2. **Long history through the residual cosine codebook.** Items older than the last
   ``recent_len`` are rebuilt from their codes only (``features/codebook.py``: the sum over levels
   of ``scales[l, c_l] * centroids[l, c_l]``), never from their own text embedding: that is what
   serving fetches from the feature store. The decoded vectors go through the item encoder's
   adapter (they approximate the same text embeddings); it is linear, so projecting the small
   code table first and summing gathered rows is exact and costs O(levels x length x dim).
3. **Lightweight recommender → coarse interests.** ``Kc`` learnable queries attention-pool the
   decoded long history (one attention read, linear in its length) into ``Kc`` coarse interests.
4. **LLM-based recommender → refined interests.** A small causal transformer reads
   [coarse interests ; recent items ; K interest queries]; the K query positions' outputs are the
   user's K interests. By default we train this transformer from scratch: the shipped
   SmolLM2-135M over ~60 tokens per user makes one ML-100K epoch take ~25 minutes on two CPU
   cores instead of seconds. ``Config(refiner="llm")`` is the paper's choice, the frozen
   SmolLM2-135M with LoRA (``model/llm_refiner.py``), a GPU job (``benchmarks/gpu_check.sh``).
5. **Disentangled multi-interest learning** (``model/matching.py``): each user's next ``W``
   items are grouped and the groups matched one-to-one to interests (Hungarian), or each target
   goes to its closest interest (ComiRec's argmax), then a full softmax over all items per target.

Scoring merges the K interest scores by ``Config.merge`` (``model/interest_merge.py``): the soft
maximum ``tau * logsumexp(s / tau)`` at the training temperature by default, or the max (ComiRec's
retrieval), or a learned gate over interests. ``encode_long`` and ``refine`` split inference so the
long-history part can be computed once per user and cached; :meth:`HyMiRec.interest_scores` scores
cached interests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError
from model.base import Batch, CatalogInfo, SequentialRecommender
from model.interest_merge import MERGES, InterestGate, Merge, gate_loss, merge_interest_scores
from model.layers import MLP, Block, causal_padding_mask, init_weights
from model.llm_refiner import LLMRefiner, check_llm_options
from model.matching import assign_targets, diversity_penalty, multi_interest_loss

__all__ = ["Config", "HyMiRec", "build_model"]


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
        if self.refiner not in ("transformer", "llm"):
            raise ConfigError(
                f"Config.refiner must be 'transformer' or 'llm'; got {self.refiner!r}"
            )
        check_llm_options(self.llm_lora_rank, self.llm_layers)


class ItemEncoder(nn.Module):
    """Frozen text embedding -> trainable linear adapter, plus a trainable ID embedding."""

    text: Tensor  # (N + 1, D_text) frozen buffer

    def __init__(self, text_embeddings: Tensor, dim: int, use_id_embedding: bool) -> None:
        super().__init__()
        self.register_buffer("text", text_embeddings.float().clone(), persistent=False)
        self.adapter = nn.Linear(text_embeddings.shape[1], dim)
        num_rows = text_embeddings.shape[0]
        self.ids = nn.Embedding(num_rows, dim, padding_idx=0) if use_id_embedding else None

    def forward(self, items: Tensor) -> Tensor:
        """(..., dim) vectors of item indices ``items`` (any shape)."""
        vectors: Tensor = self.adapter(self.text[items])
        return vectors if self.ids is None else vectors + self.ids(items)


class CodebookDecoder(nn.Module):
    """Items rebuilt from residual-codebook codes, then projected: ``project(decode(codes))``.

    ``decode`` is ``features.codebook.ResidualCodebook.decode`` (UNKNOWN = ``size`` decodes to
    zero). As ``project`` is linear, ``project(sum_l T_l[c_l]) = sum_l (T_l W^T)[c_l] + b``: we
    project the (levels, size + 1, D_text) table and gather at the model width.
    """

    table: Tensor  # (levels, size + 1, D_text) scales x centroids; row ``size`` zero

    def __init__(self, centroids: Tensor, scales: Tensor) -> None:
        super().__init__()
        levels, size, dim_text = centroids.shape
        table = torch.zeros(levels, size + 1, dim_text)  # row ``size`` = UNKNOWN = zero
        table[:, :size] = scales.float()[..., None] * centroids.float()
        self.register_buffer("table", table, persistent=False)
        self.unknown = size

    def forward(self, codes: Tensor, project: nn.Linear) -> Tensor:
        """``codes`` (B, T, levels) -> (B, T, dim) projected decoded embeddings."""
        projected = F.linear(self.table, project.weight)  # (levels, size + 1, dim)
        out = project.bias.expand(*codes.shape[:-1], -1)
        for level in range(projected.shape[0]):
            out = out + projected[level][codes[..., level]]
        return out


class CoarseInterestPooling(nn.Module):
    """The lightweight recommender: Kc learnable queries attention-pool the long history.

    coarse_k = v_k + MLP(LN(v_k)),  v_k = W_v sum_t a_kt LN(x_t) + b_v,
    a_kt = softmax_t(<q_k, LN(x_t)> / sqrt(D)).
    This is single-head attention with the key and value maps moved off the sequence: a key map
    only re-parametrises q_k (<q, W h + b> = <W^T q, h> + const, and softmax ignores constants),
    and a value map commutes with a convex combination. Per long-history item the cost is one
    LayerNorm and Kc dot products, O(T x Kc x D). A user without a long history pools nothing
    (v_k = 0).
    """

    def __init__(self, dim: int, num_queries: int, dropout: float) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.ln_in = nn.LayerNorm(dim)
        self.value = nn.Linear(dim, dim)
        self.ln_out = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim, dropout)

    def forward(self, tokens: Tensor, valid: Tensor) -> Tensor:
        """``tokens`` (B, T, D), ``valid`` (B, T) -> (B, Kc, D)."""
        h = self.ln_in(tokens)
        scores = torch.einsum("kd,btd->bkt", self.queries, h) / math.sqrt(h.shape[-1])
        scores = scores.masked_fill(~valid[:, None, :], -torch.inf)
        # A row with no valid key would be all -inf: give it finite scores, then zero its weights.
        has_long = valid.any(dim=1)[:, None, None]
        scores = torch.where(has_long, scores, 0.0)
        weights = scores.softmax(dim=-1) * valid[:, None, :].to(scores.dtype)
        pooled: Tensor = self.value(torch.einsum("bkt,btd->bkd", weights, h)) * has_long
        refined: Tensor = self.mlp(self.ln_out(pooled))
        return pooled + refined


class InterestRefiner(nn.Module):
    """The LLM-based recommender: a causal transformer over [coarse ; recent ; interest queries].

    The coarse interests come first, then the recent items oldest to newest (left-padded to R,
    pads masked), then K learnable interest queries; the queries' outputs are the K interests.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        dim = config.dim
        self.coarse_type = nn.Parameter(torch.zeros(dim))
        self.positions = nn.Embedding(config.recent_len, dim)  # slot in the recent window
        self.queries = nn.Parameter(torch.randn(config.interests, dim) * 0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(dim, config.heads, config.dropout) for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)

    def forward(
        self, coarse: Tensor, recent: Tensor, recent_valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``coarse`` (B, Kc, D), ``recent`` (B, R, D), ``recent_valid`` (B, R) -> interests
        (B, K, D) and the recent positions' outputs (B, R, D), both through the output head.

        The mask is causal, so recent position ``t`` sees the coarse interests (built from items
        older than every recent item) and recent items ``<= t`` only: it may predict item ``t + 1``.
        """
        batch, num_coarse, _ = coarse.shape
        num_queries = self.queries.shape[0]
        slots = torch.arange(recent.shape[1], device=recent.device)
        x = torch.cat(
            [
                coarse + self.coarse_type,
                recent + self.positions(slots),
                self.queries.expand(batch, -1, -1),
            ],
            dim=1,
        )
        always = recent_valid.new_ones(batch, num_coarse)
        valid = torch.cat([always, recent_valid, always.new_ones(batch, num_queries)], dim=1)
        mask = causal_padding_mask(valid)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, mask)
        out: Tensor = self.head(self.ln_f(x[:, num_coarse:]))
        return out[:, -num_queries:], out[:, :-num_queries]


def _keep_gate_of_older_checkpoints(
    module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: object
) -> None:
    """A checkpoint saved before the interest gate existed has no ``gate.*`` weights: it loads
    with the module's freshly initialised gate (used only by ``merge="gate"``), not an error."""
    gate = module.gate
    assert isinstance(gate, nn.Module)
    for name, tensor in gate.state_dict().items():
        state_dict.setdefault(f"{prefix}gate.{name}", tensor.detach().clone())


class HyMiRec(SequentialRecommender):
    """Long history (codes) -> coarse interests; [coarse ; recent items] -> K refined interests."""

    codes: Tensor  # (N + 1, levels) each item's codebook codes (row 0 = UNKNOWN)

    def __init__(self, catalog: CatalogInfo, config: Config) -> None:
        super().__init__()
        self.config = config
        self.num_interests = config.interests
        self.register_buffer("codes", catalog.codes.long().clone(), persistent=False)
        self.items = ItemEncoder(catalog.text_embeddings, config.dim, config.use_id_embedding)
        self.decoder = CodebookDecoder(catalog.codebook_centroids, catalog.codebook_scales)
        self.lightweight = CoarseInterestPooling(
            config.dim, config.coarse_interests, config.dropout
        )
        self.refiner: nn.Module = (
            InterestRefiner(config) if config.refiner == "transformer" else nn.Identity()
        )
        init_weights(self)  # before the LLM joins: it would overwrite the pretrained weights
        if config.refiner == "llm":
            cache = Path(config.llm_cache_dir) if config.llm_cache_dir else None
            self.refiner = LLMRefiner(
                config.dim,
                config.interests,
                config.dropout,
                config.llm_lora_rank,
                config.llm_layers,
                cache,
            )
        # Scores are cosines over a temperature, so an item's popularity cannot sit in its norm
        # as it does in SASRec's dot products: ``item_bias`` adds a logit per item (zeros at the
        # start, no random draw, so the other weights initialise as without it).
        self.item_bias = (
            nn.Parameter(torch.zeros(catalog.codes.shape[0])) if config.item_bias else None
        )
        # Built on a forked RNG: adding the gate left every other initial weight and the dropout
        # stream as they were, and its loss does not reach them, so the other weights train
        # exactly as without it (only the merge rule and what it selects on differ).
        with torch.random.fork_rng(devices=[]):
            self.gate = InterestGate(config.dim)
            init_weights(self.gate)
        self.register_load_state_dict_pre_hook(_keep_gate_of_older_checkpoints)  # type: ignore[no-untyped-call]

    def split_history(self, history: Tensor) -> tuple[Tensor, Tensor]:
        """(long (B, max(L - R, 0)), recent (B, R)) of a left-padded history (B, L)."""
        recent_len = self.config.recent_len
        if history.shape[1] < recent_len:
            history = F.pad(history, (recent_len - history.shape[1], 0))
        return history[:, :-recent_len], history[:, -recent_len:]

    def encode_long(self, history_codes: Tensor) -> Tensor:
        """(B, Kc, D) coarse interests from the long history's codes (B, T, levels).

        Rows whose codes are all UNKNOWN (padding, or an item the codebook does not know, which
        decodes to zero anyway) are ignored. Cache the result per user for serving.
        """
        tokens = self.decoder(history_codes, self.items.adapter)
        valid = (history_codes != self.decoder.unknown).any(dim=-1)
        coarse: Tensor = self.lightweight(tokens, valid)
        return coarse

    def refine(self, coarse: Tensor, recent: Tensor) -> Tensor:
        """(B, K, D) unit interests from coarse interests and recent item indices (B, <= R),
        left-padded with 0, oldest first."""
        return self._refine(coarse, recent)[0]

    def _refine(self, coarse: Tensor, recent: Tensor) -> tuple[Tensor, Tensor]:
        """Unit interests (B, K, D) and unit recent-position states (B, R, D)."""
        recent_len = self.config.recent_len
        if recent.shape[1] > recent_len:
            raise ValueError(f"recent has {recent.shape[1]} items; at most {recent_len} allowed")
        recent = F.pad(recent, (recent_len - recent.shape[1], 0))
        interests, states = self.refiner(coarse, self.items(recent), recent > 0)
        return F.normalize(interests, dim=-1), F.normalize(states, dim=-1)

    def user_interests(self, batch: Batch) -> Tensor:
        long, recent = self.split_history(batch.history)
        return self.refine(self.encode_long(self.codes[long]), recent)

    def interest_scores(
        self, interests: Tensor, items: Tensor, merge: Merge | None = None
    ) -> Tensor:
        """(..., N) scores of unit ``interests`` (..., K, D) against ``items`` (N, D), merged by
        ``merge`` (default ``Config.merge``) at the training temperature."""
        rule = merge or self.config.merge
        scores = torch.einsum("...kd,nd->...kn", interests, items)
        logits = self.gate(interests) if rule == "gate" else None
        merged = merge_interest_scores(scores, rule, self.config.temperature, logits)
        if self.item_bias is None:
            return merged
        if items.shape[0] != self.item_bias.shape[0]:
            raise ValueError(
                f"item_bias covers {self.item_bias.shape[0]} items; got {items.shape[0]}"
            )
        # the same for every interest, so it commutes with every merge rule: tau * (s / tau + b)
        return merged + self.config.temperature * self.item_bias.to(merged.dtype)

    def score_all(self, batch: Batch, merge: Merge | None = None) -> Tensor:
        """The base class's scoring, defined here so that callers that special-case the base
        class's max (``model.training.online_core``'s bucketed evaluation) call this model's own
        merge."""
        return super().score_all(batch, merge)

    def item_embeddings(self) -> Tensor:
        everything = torch.arange(self.codes.shape[0], device=self.codes.device)
        return F.normalize(self.items(everything), dim=-1)

    def dense_loss(self, states: Tensor, recent: Tensor, targets: Tensor, items: Tensor) -> Tensor:
        """SASRec's next-item loss on the recent positions, at the model's temperature.

        ``states`` (B, R, D) unit outputs of the recent positions, ``recent`` (B, R) their items
        (left-padded with 0), ``targets`` (B, W), ``items`` (N + 1, D) unit item embeddings:
        mean over positions with a real item and a real next item of
        ``-log softmax(<s_t, e_n> / tau)[next_t]`` (``next_t`` = ``recent[t + 1]``, or
        ``targets[0]`` after the newest), item 0 excluded.
        """
        next_items = torch.cat([recent[:, 1:], targets[:, :1]], dim=1)
        valid = (recent > 0) & (next_items > 0)
        if not valid.any():
            return states.new_zeros(())
        logits = states[valid].float() @ items.float().T / self.config.temperature
        if self.item_bias is not None:
            logits = logits + self.item_bias.float()
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, next_items[valid])

    def loss(self, batch: Batch) -> Tensor:
        long, recent = self.split_history(batch.history)
        interests, states = self._refine(self.encode_long(self.codes[long]), recent)
        items = self.item_embeddings()  # (N + 1, D)
        valid = batch.targets > 0
        assignment = assign_targets(
            interests, items[batch.targets], valid, self.config.assignment, self.config.kmeans_iters
        )
        loss = multi_interest_loss(
            interests, items, batch.targets, assignment, self.config.temperature, self.item_bias
        )
        if self.config.diversity_weight > 0.0:
            loss = loss + self.config.diversity_weight * diversity_penalty(interests)
        if self.config.dense_weight > 0.0:
            dense = self.dense_loss(states, recent, batch.targets, items)
            loss = loss + self.config.dense_weight * dense
        if self.config.gate_weight > 0.0:
            gated = gate_loss(self.gate, interests, items, batch.targets, self.config.temperature)
            loss = loss + self.config.gate_weight * gated
        return loss


def build_model(catalog: CatalogInfo, config: Config | None = None) -> SequentialRecommender:
    """A HyMiRec model for ``catalog`` (defaults sized for ML-100K on a CPU)."""
    return HyMiRec(catalog, config if config is not None else Config())
