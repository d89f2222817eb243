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
   Options: ``Config.long_positions`` adds a learned embedding of each long item's age (log2
   buckets, 0 = the newest long item); ``Config.long_projection="own"`` gives the long branch
   its own projection, for a codebook fitted on other vectors (``model.stage1_codebook``: the
   trained item embeddings, the paper's stage 1 by analogy; an offline experiment).
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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.base import Batch, CatalogInfo, SequentialRecommender
from model.hymirec_config import Config
from model.interest_merge import InterestGate, Merge, gate_loss, merge_interest_scores
from model.layers import MLP, Block, causal_padding_mask, init_weights
from model.llm_refiner import LLMRefiner
from model.matching import assign_targets, diversity_penalty, multi_interest_loss

__all__ = ["LONG_AGE_BUCKETS", "Config", "HyMiRec", "build_model", "long_age_buckets"]

LONG_AGE_BUCKETS = 12  # ages 0 .. 2046 get their own log2 bucket; older items share the last


def long_age_buckets(length: int, device: torch.device | str = "cpu") -> Tensor:
    """(length,) ``min(floor(log2(age + 1)), LONG_AGE_BUCKETS - 1)`` of each position of a long
    history ``length`` items long, newest last (age 0): left padding leaves the newest item's
    age where it is, so training's padded rows and serving's bare rows get the same buckets."""
    ages = torch.arange(length - 1, -1, -1, device=device)
    bounds = 2 ** torch.arange(1, LONG_AGE_BUCKETS, device=device) - 1
    return torch.bucketize(ages, bounds, right=True)


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
        x, mask, num_coarse = self._inputs(coarse, recent, recent_valid)
        for block in self.blocks:
            x = block(x, mask)
        out: Tensor = self.head(self.ln_f(x[:, num_coarse:]))
        num_queries = self.queries.shape[0]
        return out[:, -num_queries:], out[:, :-num_queries]

    def interests(
        self, coarse: Tensor, recent: Tensor, recent_valid: Tensor, newest: int = 0
    ) -> Tensor:
        """``forward(...)[0]``, the interests alone: the last block and the head run on the
        query positions only (what serving and evaluation need; 13% less time per user here),
        the same operations on those rows (equal to float rounding: tests/model/test_layers.py).
        ``newest`` > 0 keeps that many newest recent positions' outputs in front of them."""
        x, mask, _ = self._inputs(coarse, recent, recent_valid)
        *first, last = self.blocks
        for block in first:
            x = block(x, mask)
        assert isinstance(last, Block)
        rows = self.queries.shape[0] + newest
        out: Tensor = self.head(self.ln_f(last.forward_last(x, mask, rows)))
        return out

    def _inputs(
        self, coarse: Tensor, recent: Tensor, recent_valid: Tensor
    ) -> tuple[Tensor, Tensor, int]:
        """The sequence [coarse ; recent ; queries] after dropout, its mask, and Kc."""
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
        return self.dropout(x), causal_padding_mask(valid), num_coarse


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
        # Both absent by default, so a default model draws the same initial weights as before.
        self.long_ages = (
            nn.Embedding(LONG_AGE_BUCKETS, config.dim) if config.long_positions else None
        )
        code_dim = catalog.codebook_centroids.shape[-1]
        self.long_project = (
            nn.Linear(code_dim, config.dim) if config.long_projection == "own" else None
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
        return self.pool_long(self.decoder(history_codes, self.code_projection()), history_codes)

    def code_projection(self) -> nn.Linear:
        """The linear map from the codebook's space to the model width: the item encoder's
        adapter (codes of text embeddings, the default) or the long branch's own map."""
        return self.items.adapter if self.long_project is None else self.long_project

    def pool_long(self, tokens: Tensor, history_codes: Tensor) -> Tensor:
        """(B, Kc, D) coarse interests from the decoded, projected long history ``tokens``
        (B, T, D) and its codes (B, T, levels), newest last; with ``Config.long_positions`` each
        token first gets the embedding of its age's log2 bucket (0 = the newest long item)."""
        valid = (history_codes != self.decoder.unknown).any(dim=-1)
        if self.long_ages is not None:
            tokens = tokens + self.long_ages(long_age_buckets(tokens.shape[1], tokens.device))
        coarse: Tensor = self.lightweight(tokens, valid)
        return coarse

    def refine(self, coarse: Tensor, recent: Tensor) -> Tensor:
        """(B, K, D) unit interests from coarse interests and recent item indices (B, <= R),
        left-padded with 0, oldest first; (B, K + 1, D) with ``Config.state_interest``."""
        recent = self._padded_recent(recent)
        if not isinstance(self.refiner, InterestRefiner):
            interests, states = self._refine(coarse, recent)
            return self._with_state(interests, states[:, -1:], recent)
        newest = int(self.config.state_interest)
        out = self.refiner.interests(coarse, self.items(recent), recent > 0, newest)
        out = F.normalize(out, dim=-1)
        return self._with_state(out[:, newest:], out[:, :newest], recent)

    def _padded_recent(self, recent: Tensor) -> Tensor:
        """``recent`` (B, <= R) left-padded with 0 to (B, R); more than R items is an error."""
        recent_len = self.config.recent_len
        if recent.shape[1] > recent_len:
            raise ValueError(f"recent has {recent.shape[1]} items; at most {recent_len} allowed")
        return F.pad(recent, (recent_len - recent.shape[1], 0))

    def _with_state(self, interests: Tensor, state: Tensor, recent: Tensor) -> Tensor:
        """With ``Config.state_interest``, the newest recent position's state (B, 1, D) after
        the K interests; a user with no recent item gets a copy of their first interest there
        instead (under logsumexp that adds tau * log 2 to every item, under max nothing: the
        ranking is the K interests' own)."""
        if not self.config.state_interest:
            return interests
        state = torch.where((recent[:, -1] > 0)[:, None, None], state, interests[:, :1])
        return torch.cat([interests, state], dim=1)

    def _refine(self, coarse: Tensor, recent: Tensor) -> tuple[Tensor, Tensor]:
        """Unit interests (B, K, D) and unit recent-position states (B, R, D)."""
        recent = self._padded_recent(recent)
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
