"""Which tools can read a folder llmpress wrote, from its ``config.json`` alone.

Checked on this machine with transformers 5.24 and compressed-tensors 0.20 (CPU), by
``tests/test_plain_transformers.py`` (logits against ``llmpress.load_model``):

=====================  ======================================================  ==============================
format                 plain transformers                                      readers
=====================  ======================================================  ==============================
dense                  ``from_pretrained(folder)``: identical logits           llmpress, transformers, vLLM,
                                                                               lm-eval
pack-quantized,        ``quantization_config=CompressedTensorsConfig(          llmpress, transformers
one config group       dequantize=True)``: identical logits; the default       (compressed-tensors), vLLM,
                       (compressed execution) too for symmetric schemes; for   lm-eval (symmetric only)
                       asymmetric ones it raises (zero-point size mismatch)
pack-quantized,        dequantizes every layer with the first group's          llmpress, vLLM
several groups         scheme and fails
int-quantized (W8A8)   ``from_pretrained(folder)``: the same int8 codes and    llmpress, transformers
                       scales, activations fake-quantized per token; logits    (compressed-tensors), vLLM,
                       equal llmpress's up to the float GEMM's rounding (see   lm-eval
                       ``llmpress.quant.w8a8``). ``dequantize=True`` drops
                       the activation quantization (a W8A16 model)
sparse-bitmask,        refused ("no file named model.safetensors"):            llmpress
sparse-24-bitmask      compressed-tensors 0.15+ cannot decompress them
low-rank (factorized)  refused ("no file named model.safetensors")             llmpress
=====================  ======================================================  ==============================

vLLM is listed from the format's schema (its compressed-tensors WNA16 and W8A8 int8 paths,
and plain dense folders), not from a run here; lm-eval's ``--model hf`` loads through
``AutoModelForCausalLM.from_pretrained(folder)`` without a quantization override.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LlmpressError

LLMPRESS, TRANSFORMERS, TRANSFORMERS_CT, VLLM, LM_EVAL = (
    "llmpress", "transformers", "transformers (compressed-tensors)", "vLLM", "lm-eval")


def folder_format(config: dict) -> str:
    """The storage format a ``config.json`` (as a dict) describes: dense | pack-quantized |
    pack-quantized-mixed | int-quantized | sparse-bitmask | sparse-24-bitmask | low-rank | unknown."""
    entry = config.get("llmpress")
    if isinstance(entry, dict) and entry.get("lowrank"):
        return "low-rank"
    qconfig = config.get("quantization_config")
    if not qconfig:
        return "dense"
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "compressed-tensors":
        return "unknown"
    groups = qconfig.get("config_groups") or {}
    if not groups:
        sparsity = (qconfig.get("sparsity_config") or {}).get("format")
        return sparsity if sparsity in ("sparse-bitmask", "sparse-24-bitmask") else "unknown"
    formats = {(g or {}).get("format") or qconfig.get("format") for g in groups.values()}
    if formats == {"pack-quantized"}:
        return "pack-quantized" if len(groups) == 1 else "pack-quantized-mixed"
    if formats == {"int-quantized"}:
        return "int-quantized"
    return "unknown"


def _symmetric(config: dict) -> bool:
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    return all(((g or {}).get("weights") or {}).get("symmetric", True) for g in groups.values())


def readers(folder_meta: dict | str | Path) -> list[str]:
    """The tools that read this folder with llmpress's numbers (see the module docstring's table).

    ``folder_meta``: the folder, or its ``config.json`` as a dict. ``["llmpress"]`` means llmpress only:
    other tools refuse the folder with an error (they never run it with random weights).
    """
    config = _config(folder_meta)
    kind = folder_format(config)
    if kind == "dense":
        return [LLMPRESS, TRANSFORMERS, VLLM, LM_EVAL]
    if kind == "pack-quantized":
        return [LLMPRESS, TRANSFORMERS_CT, VLLM, *([LM_EVAL] if _symmetric(config) else [])]
    if kind == "pack-quantized-mixed":
        return [LLMPRESS, VLLM]
    if kind == "int-quantized":
        return [LLMPRESS, TRANSFORMERS_CT, VLLM, LM_EVAL]
    return [LLMPRESS]


def _config(folder_meta: dict | str | Path) -> dict:
    if isinstance(folder_meta, dict):
        return folder_meta
    path = Path(folder_meta) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise LlmpressError(f"cannot read {path} ({type(exc).__name__}): give a folder written by llmpress "
                            "compress") from None
    if not isinstance(config, dict):
        raise LlmpressError(f"{path} is not a JSON object: give a folder written by llmpress compress")
    return config
