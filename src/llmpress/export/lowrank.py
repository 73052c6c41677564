"""The ``low-rank`` entry of the format table: factorized models (``LowRankLinear``) as llmpress stores them.

On disk a factorized model is a transformers-like folder whose safetensors hold
``<name>.down.weight`` / ``<name>.up.weight`` and whose config.json carries
``"llmpress": {"lowrank": {<module name>: rank}, "architectures": [...]}``;
:func:`load_lowrank_folder` rebuilds the structure from that entry and loads the tensors
unchanged. ``format="dense"`` multiplies the factors back instead (the ``dense`` entry, with
``llmpress.lowrank.module.densify``).

Other tools must not mistake the factorized folder for the dense model: plain transformers
would build the dense architecture, find no ``q_proj.weight`` and run with random weights
(it only lists them as MISSING), and lm-eval on top of it would score that. So the weights
are stored as ``lowrank.safetensors`` (``lowrank.safetensors.index.json`` when sharded), a
name transformers does not look for (``from_pretrained`` raises "no file named
model.safetensors"), and ``architectures`` names ``LlmpressLowRankForCausalLM``, which no
serving engine (vLLM selects its model class by that field) implements. Folders written with
``model.safetensors`` by earlier versions still load here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..compressed import Compressed
from ..errors import LlmpressError
from ..lowrank.module import LowRankLinear, lowrank_modules, lowrank_ranks
from .base import Folder, Format
from .staging import save_renamed, weight_files
from .tools import LLMPRESS

CONFIG_KEY = "llmpress"
WEIGHTS_STEM = "lowrank"  # lowrank.safetensors, not model.safetensors: transformers must not load the folder
ARCHITECTURE = "LlmpressLowRankForCausalLM"  # no engine implements it: they refuse instead of misreading


def set_config_entry(model: nn.Module) -> bool:
    """Write ``config.llmpress = {"lowrank": {name: rank}}`` for the factorized layers; False when there are none."""
    ranks = lowrank_ranks(model)
    if not ranks:
        return False
    entry = dict(getattr(model.config, CONFIG_KEY, None) or {})
    entry["lowrank"] = ranks
    setattr(model.config, CONFIG_KEY, entry)
    return True


def clear_config_entry(model: nn.Module) -> None:
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)


def config_ranks(config) -> dict[str, int]:
    """The ``{name: rank}`` map of a config written by a factorized model ({} for any other config)."""
    entry = getattr(config, CONFIG_KEY, None)
    return dict(entry.get("lowrank") or {}) if isinstance(entry, dict) else {}


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in weight_files(path, WEIGHTS_STEM):
        if not file.is_file():
            raise LlmpressError(f"'{path}' lacks {file.name}: the factorized model folder is incomplete; write it "
                                "again")
        state.update(load_file(str(file)))
    return state


def load_lowrank_folder(path: Path, config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a factorized model from its folder: the architecture from config, a LowRankLinear per entry of
    its ``llmpress.lowrank`` map, then the tensors."""
    from transformers import AutoModelForCausalLM

    ranks = config_ranks(config)
    original = (getattr(config, CONFIG_KEY, None) or {}).get("architectures")
    if original:  # the dense model's class name, set aside when saving
        config.architectures = original
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, rank in ranks.items():
        old = model.get_submodule(name)
        conv = isinstance(old, Conv1D)
        n, m = old.weight.shape if conv else old.weight.shape[::-1]
        model.set_submodule(name, LowRankLinear(n, m, int(rank), old.bias is not None, conv, dtype))
    state = _read_safetensors(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:  # a tensor's shape differs from the rank in config.json
        raise LlmpressError(f"'{path}': the tensors do not match the ranks in config.json; "
                            "write the folder again with llmpress compress") from None
    model.tie_weights()
    tied = _tied_to_loaded(model, state.keys(), missing)
    if unexpected or tied:
        bad = (unexpected or tied)[0]
        raise LlmpressError(f"'{path}': tensor {bad} does not match the factorized structure in config.json; "
                            "write the folder again with llmpress compress")
    return model.to(dtype).eval()


def _tied_to_loaded(model: nn.Module, loaded_keys, missing: list[str]) -> list[str]:
    """The missing keys that are not tied to a loaded tensor (tied embeddings are saved once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in loaded_keys if k in params}
    return [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]


def fits(model: nn.Module, layers: dict, results: dict[str, Compressed]) -> bool:
    """The model has factorized (LowRankLinear) layers."""
    return bool(lowrank_modules(model))


def can_save(model: nn.Module, layers: dict, results: dict[str, Compressed]) -> str | None:
    """The factors are stored as they are (quantized factors included, as their dequantized weights)."""
    if not fits(model, layers, results):
        return "the model has no factorized (low-rank) layers: run a factorization method first (e.g. recipe svd-80)"
    return None


def save(model: nn.Module, tokenizer, out: str | Path, meta: dict, layers: dict,
         results: dict[str, Compressed]) -> Path:
    """Factors + config entry, weights as ``lowrank.safetensors``; the model is left as it was."""
    reason = can_save(model, layers, results)
    if reason is not None:
        raise LlmpressError(reason)

    def mark(config: dict) -> None:  # keep the dense class name for load_lowrank_folder
        config.setdefault(CONFIG_KEY, {})["architectures"] = config.get("architectures")
        config["architectures"] = [ARCHITECTURE]

    set_config_entry(model)
    try:
        entry = {CONFIG_KEY: getattr(model.config, CONFIG_KEY)}
        return save_renamed(model, tokenizer, out, {**meta, "readers": readers(entry)}, WEIGHTS_STEM, mark)
    finally:
        clear_config_entry(model)


def detect(folder: Folder) -> bool:
    entry = folder.config.get(CONFIG_KEY)
    return isinstance(entry, dict) and bool(entry.get("lowrank"))


def load(path: Path, config, dtype: torch.dtype) -> nn.Module:
    return load_lowrank_folder(path, config, dtype)


def readers(config: dict) -> list[str]:
    """llmpress only: transformers finds no model.safetensors and raises; no engine implements the architecture."""
    return [LLMPRESS]


FORMAT = Format("low-rank", None, True, detect, load, fits, can_save, save, readers)
