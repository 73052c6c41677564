"""The ``rotated`` entry of the format table: models with online rotations or W4A4 layers, as llmpress stores them.

A model rotated with ``rotate(online=true)`` computes a Hadamard transform on the input of each MLP and attention
output linear at run time (``llmpress.rotate.online``), and a ``w4a4`` model quantizes activations to 4 bits with
a clip ratio (``llmpress.quant.w4a4``). No other tool computes either, so such a model is stored in a folder
only llmpress reads, like a factorized one (``llmpress.export.lowrank``):

- ``rotated.safetensors``: the model's state dict (W4A4 layers: ``weight_packed``, the int4 codes eight to an
  int32 word as compressed-tensors packs them (``llmpress.quant.packing``), ``weight_scale`` (out, groups) fp32,
  ``weight_zero_point`` when asymmetric; W8A8 layers: int8 codes and
  scales; everything else float). transformers does not look for that file name.
- ``config.json``: the transformers config, with ``architectures`` = ``LlmpressRotatedForCausalLM`` (no engine
  implements it: they refuse rather than misread), ``llmpress_rotated`` = ``{"architectures": [the dense
  class], "w4a4": {name: grid}, "w8a8": [names]}``, and ``llmpress_online_rotations`` (the online
  transforms: ``{"input_hadamard": [names], "kv_hadamard": true}``).

:func:`load_rotated_folder` rebuilds the model from that: the dense architecture, the W4A4/W8A8 modules
put in, every tensor loaded (a missing one is an error), the online Hadamard hooks installed.

What an engine needs to run the folder: the Llama graph, plus (1) before each module listed in
``input_hadamard``: x ← x·H/√n with H = ``llmpress.rotate.online.online_hadamard(n)`` (kron(hadamard(m),
Sylvester 2^k): 1536 = 12·128, 576 = 36·16); (2) for each W4A4 layer: per token, s = act_clip·max|x|/7.5,
x_q = clamp(round(x/s), −8, 7), y = s·(x_q·W_qᵀ)·s_w (+ bias), exact in int32; (3) when it quantizes the KV
cache and ``kv_hadamard`` is true: rotate each head's keys and values by ``hadamard(head_dim)/√head_dim``
before quantizing (or rotate q and k after RoPE, and v through W_v / W_o).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..compressed import Compressed
from ..errors import LlmpressError
from ..lowrank.module import LowRankLinear
from ..quant.packing import pack_int, unpack_int
from ..quant.w4a4 import W4A4Linear
from ..quant.w8a8 import W8A8Linear
from ..rotate.online import install, missing, online_record
from ..save import save_model
from .base import Folder, Format
from .lowrank import _tied_to_loaded
from .staging import edit_config, rename_weights, weight_files
from .tools import LLMPRESS

CONFIG_KEY = "llmpress_rotated"
WEIGHTS_STEM = "rotated"
ARCHITECTURE = "LlmpressRotatedForCausalLM"


def _int_layers(model: nn.Module) -> tuple[dict[str, dict], list[str]]:
    w4a4 = {n: m.spec() for n, m in model.named_modules() if isinstance(m, W4A4Linear)}
    w8a8 = [n for n, m in model.named_modules() if isinstance(m, W8A8Linear)]
    return w4a4, w8a8


def fits(model: nn.Module, layers: dict, results: dict[str, Compressed]) -> bool:
    """The model computes online rotations (``rotate(online=true)``) or has W4A4 layers."""
    return bool(online_record(model.config)) or any(isinstance(m, W4A4Linear) for m in model.modules())


def can_save(model: nn.Module, layers: dict, results: dict[str, Compressed]) -> str | None:
    """None when the model (its online transforms, W4A4/W8A8 layers, float weights) can be stored exactly."""
    if not fits(model, layers, results):
        return "the model has no online rotations or W4A4 layers: run e.g. recipe rotate+gptq-w4a4 first"
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        return "factorized (low-rank) layers cannot be stored with online rotations or W4A4 layers"
    gone = missing(model)
    if gone:
        return (f"the online Hadamard before {gone[0]} is gone (a later stage replaced the module): put rotate "
                "after that stage")
    return None


def save(model: nn.Module, tokenizer, out: str | Path, meta: dict, layers: dict,
         results: dict[str, Compressed]) -> Path:
    """The state dict as ``rotated.safetensors`` and the structure in config.json; the model is left as it was."""
    reason = can_save(model, layers, results)
    if reason is not None:
        raise LlmpressError(reason)
    w4a4, w8a8 = _int_layers(model)

    def mark(config: dict) -> None:
        config[CONFIG_KEY] = {"architectures": config.get("architectures"), "w4a4": w4a4, "w8a8": w8a8}
        config["architectures"] = [ARCHITECTURE]

    def finish(folder: Path) -> None:
        rename_weights(folder, WEIGHTS_STEM)
        _pack_folder(folder, {name: module.bits for name, module in model.named_modules()
                              if isinstance(module, W4A4Linear)})
        edit_config(folder, mark)

    return save_model(model, tokenizer, out, {**meta, "readers": readers({})}, finish)


def _pack_folder(folder: Path, bits: dict[str, int]) -> None:
    """Replace, on disk, each W4A4 layer's int8 ``weight`` codes by ``weight_packed`` int32 words."""
    import json

    from safetensors.torch import load_file, save_file

    renamed: dict[str, str] = {}
    for file in weight_files(folder, WEIGHTS_STEM):
        state = load_file(str(file))
        for name, b in bits.items():
            if f"{name}.weight" in state:
                state[f"{name}.weight_packed"] = pack_int(state.pop(f"{name}.weight"), b)
                renamed[f"{name}.weight"] = f"{name}.weight_packed"
        save_file(state, str(file), metadata={"format": "pt"})
    index = folder / f"{WEIGHTS_STEM}.safetensors.index.json"
    if renamed and index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed.get(k, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def load_rotated_folder(path: Path, config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the model of a folder :func:`save` wrote (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    entry = getattr(config, CONFIG_KEY, None) or {}
    if entry.get("architectures"):
        config.architectures = entry["architectures"]
    delattr(config, CONFIG_KEY)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in (entry.get("w4a4") or {}).items():
        old = model.get_submodule(name)
        model.set_submodule(name, W4A4Linear.from_spec(old.in_features, old.out_features, spec))
    for name in entry.get("w8a8") or []:
        old = model.get_submodule(name)
        model.set_submodule(name, W8A8Linear(old.in_features, old.out_features, old.bias is not None))
    from safetensors.torch import load_file

    state = {k: v for file in weight_files(path, WEIGHTS_STEM) for k, v in load_file(str(file)).items()}
    for name in entry.get("w4a4") or {}:  # int4 codes packed into int32 words (older folders: int8 as they are)
        packed = state.pop(f"{name}.weight_packed", None)
        if packed is not None:
            module = model.get_submodule(name)
            try:
                state[f"{name}.weight"] = unpack_int(packed, module.bits, module.in_features)
            except LlmpressError:
                raise LlmpressError(f"'{path}': tensor {name}.weight_packed does not match the structure in "
                                    "config.json; write the folder again with llmpress compress") from None
    try:
        missing_keys, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:
        raise LlmpressError(f"'{path}': the tensors do not match the structure in config.json; write the folder "
                            "again with llmpress compress") from None
    model.tie_weights()
    absent = _tied_to_loaded(model, state.keys(), missing_keys)
    if unexpected or absent:
        raise LlmpressError(f"'{path}': tensor {(unexpected or absent)[0]} does not match the structure in "
                            "config.json; write the folder again with llmpress compress")
    install(model)
    return model.eval()


def detect(folder: Folder) -> bool:
    return isinstance(folder.config.get(CONFIG_KEY), dict)


def load(path: Path, config, dtype: torch.dtype) -> nn.Module:
    return load_rotated_folder(path, config, dtype)


def readers(config: dict) -> list[str]:
    """llmpress only: no other tool computes the online Hadamard transforms or clipped int4 activations."""
    return [LLMPRESS]


FORMAT = Format("rotated", None, True, detect, load, fits, can_save, save, readers)
