"""The ``dense`` entry of the format table: a plain transformers folder, every weight a float tensor.

What ``from_pretrained`` reads everywhere (transformers, vLLM, lm-eval). Every compressed model
that computes with float weights is stored exactly: quantized and pruned weights as the values
the model computes with (e.g. HQQ's float zero points, which pack-quantized cannot hold), and
factorized layers multiplied back (U·V, ``llmpress.lowrank.module.densify``; the in-memory model
stays factorized). Modules that compute otherwise (W8A8's int8 activations, packed
``QuantizedLinear``) are refused: a dense folder would not hold what they compute.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from ..compressed import Compressed
from ..errors import LlmpressError
from ..lowrank.module import densify, lowrank_modules
from ..models.archs import arch_for
from ..quant.qlinear import QuantizedLinear
from ..quant.w8a8 import W8A8Linear
from ..save import save_model
from .base import Folder, Format
from .codebook import detect as is_codebook
from .lowrank import detect as is_lowrank
from .rotated import detect as is_rotated
from .tools import LLMPRESS, LM_EVAL, TRANSFORMERS, VLLM

log = logging.getLogger(__name__)


def fits(model: nn.Module, layers: dict, results: dict[str, Compressed]) -> bool:
    """Every model: the format "auto" falls back to."""
    return True


def can_save(model: nn.Module, layers: dict, results: dict[str, Compressed]) -> str | None:
    """None unless a module computes with something other than its float weights (W8A8, packed codes)."""
    w8a8 = sum(isinstance(m, W8A8Linear) for m in model.modules())
    if w8a8:
        return (f"the model has {w8a8} W8A8 layers (int8 activations), which a dense folder cannot hold: use "
                "--format auto or compressed-tensors (int-quantized)")
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        return ("the model has packed QuantizedLinear layers, which a dense folder cannot hold: save the model "
                "before replace_linears, or with format compressed-tensors")
    return None


def save(model: nn.Module, tokenizer, out: str | Path, meta: dict, layers: dict,
         results: dict[str, Compressed]) -> Path:
    """A plain folder; factorized layers multiplied back in a copy, their per-factor records dropped from ``meta``."""
    reason = can_save(model, layers, results)
    if reason is not None:
        raise LlmpressError(reason)
    factorized = set(lowrank_modules(model))
    if factorized:
        records = {n: m for n, m in meta.get("layers", {}).items() if n.rpartition(".")[0] not in factorized}
        notes = [*meta.get("notes", []), "low-rank factors multiplied back into dense weights (U·V)"]
        model, meta = densify(copy.deepcopy(model)), {**meta, "layers": records, "notes": notes}
    return save_model(model, tokenizer, out, {**meta, "readers": readers(model.config.to_dict())})


def detect(folder: Folder) -> bool:
    return (not folder.config.get("quantization_config") and not is_lowrank(folder) and not is_codebook(folder)
            and not is_rotated(folder))


def readers(config: dict) -> list[str]:
    """Everything that reads transformers folders (a config that also names a quantization: llmpress only)."""
    return [LLMPRESS] if config.get("quantization_config") else [LLMPRESS, TRANSFORMERS, VLLM, LM_EVAL]


def load(path: Path, config, dtype: torch.dtype) -> nn.Module:
    """``from_pretrained`` with every weight present: a missing one is an error, not a random tensor."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random numbers and only log a report
        arch_for(model)  # an architecture llmpress does not support (an encoder's LM head) says so first
        raise LlmpressError(f"the checkpoint in '{path}' lacks {len(missing)} weight(s) config.json needs "
                            f"(first: {missing[0]}): it is incomplete or from another model; save or download it "
                            "again")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        log.info("ignored %d checkpoint tensor(s) the model does not use (first: %s)", len(unexpected), unexpected[0])
    return model


FORMAT = Format("dense", "dense", True, detect, load, fits, can_save, save, readers)
