"""The ``int-quantized`` entry of the format table: W8A8 models (int8 weights, int8 activations) as
compressed-tensors writes them.

A model whose linears are ``llmpress.quant.w8a8.W8A8Linear`` (SmoothQuant W8A8) already holds the
stored tensors (``weight`` int8, ``weight_scale`` (out, 1)); saving adds
``w8a8_quantization_config`` to ``config.json`` for the duration of the write. Loading rebuilds the
W8A8Linear modules (``load_w8a8_folder``). What plain transformers and vLLM compute from such a
folder is in ``llmpress.quant.w8a8``'s docstring.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..compressed import Compressed
from ..errors import LlmpressError
from ..lowrank.module import LowRankLinear
from ..quant.w8a8 import (
    W8A8Linear,
    is_w8a8_config,
    load_w8a8_folder,
    w8a8_quantization_config,
)
from ..save import save_model
from .base import Folder, Format
from .staging import swapped
from .tools import LLMPRESS, LM_EVAL, TRANSFORMERS_CT, VLLM


def fits(model: nn.Module, layers: dict, results: dict[str, Compressed]) -> bool:
    """The model has W8A8Linear layers."""
    return any(isinstance(m, W8A8Linear) for m in model.modules())


def can_save(model: nn.Module, layers: dict, results: dict[str, Compressed]) -> str | None:
    """None when the model's W8A8Linear layers (and everything else, as it is) can be stored int-quantized."""
    if not fits(model, layers, results):
        return "the model has no W8A8 layers (int8 weights and activations): run e.g. recipe smoothquant-w8a8 first"
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        return ("format compressed-tensors cannot hold factorized (low-rank) layers: use --format auto "
                "(llmpress safetensors) or --format dense")
    existing = getattr(model.config, "quantization_config", None)
    if existing is not None and not is_w8a8_config(existing):
        return "this model already carries a quantization_config: export a plain (dequantized) model"
    return None


def save(model: nn.Module, tokenizer, out: str | Path, meta: dict, layers: dict,
         results: dict[str, Compressed]) -> Path:
    """Write the model with ``w8a8_quantization_config`` in its config.json; the model is left as it was."""
    reason = can_save(model, layers, results)
    if reason is not None:
        raise LlmpressError(reason)
    config = w8a8_quantization_config(model)
    with swapped(model, {}, config):
        return save_model(model, tokenizer, out, {**meta, "readers": readers({"quantization_config": config})})


def detect(folder: Folder) -> bool:
    return is_w8a8_config(folder.quantization)


def load(path: Path, config, dtype: torch.dtype) -> nn.Module:
    return load_w8a8_folder(path, dtype)


def readers(config: dict) -> list[str]:
    """transformers reads the int8 codes and scales and fake-quantizes activations like ours (see
    ``llmpress.quant.w8a8``); vLLM serves the scheme with its int8 kernels; lm-eval loads through transformers."""
    return [LLMPRESS, TRANSFORMERS_CT, VLLM, LM_EVAL]


FORMAT = Format("int-quantized", "compressed-tensors", True, detect, load, fits, can_save, save, readers)
