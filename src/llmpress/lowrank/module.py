"""LowRankLinear: a factorized linear layer, and how factorized models are saved, loaded and made dense again.

``LowRankLinear`` holds two plain ``nn.Linear`` children, ``down`` (V: k×n, no bias)
and ``up`` (U: m×k, with the original bias), so that forward = (x Vᵀ) Uᵀ + b and so that
every per-linear stage (RTN, GPTQ), parameter count and FLOP count sees U and V as
ordinary linears (``llmpress.models.archs.block_linears`` lists them as
``<name>.down`` / ``<name>.up``).

On disk a factorized model is a transformers-like folder whose safetensors hold
``<name>.down.weight`` / ``<name>.up.weight`` and whose config.json carries
``"llmpress": {"lowrank": {<module name>: rank}, "architectures": [...]}``;
:func:`load_lowrank_folder` rebuilds the structure from that entry and loads the tensors
unchanged. :func:`densify` multiplies the factors back (U·V) for a plain transformers folder
(``--format dense``).

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

import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..errors import LlmpressError

log = logging.getLogger(__name__)

CONFIG_KEY = "llmpress"
WEIGHTS_STEM = "lowrank"  # lowrank.safetensors, not model.safetensors: transformers must not load the folder
ARCHITECTURE = "LlmpressLowRankForCausalLM"  # no engine implements it: they refuse instead of misreading


class LowRankLinear(nn.Module):
    """y = up(down(x)) = (x Vᵀ) Uᵀ + b with V = down.weight (k×n), U = up.weight (m×k).

    ``conv1d`` records that the layer replaced a GPT-2 ``Conv1D`` (so :func:`densify` gives
    one back); the computation is the same either way.
    """

    linear_children = ("down", "up")

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 conv1d: bool = False, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank, self.conv1d = in_features, out_features, rank, conv1d
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, U: Tensor, V: Tensor, bias: Tensor | None = None, conv1d: bool = False,
                     dtype: torch.dtype | None = None) -> LowRankLinear:
        """A layer computing x ↦ x (U V)ᵀ + bias; U (m×k), V (k×n)."""
        dtype = dtype or U.dtype
        layer = cls(V.shape[1], U.shape[0], U.shape[1], bias is not None, conv1d, dtype, U.device)
        with torch.no_grad():
            layer.down.weight.copy_(V)
            layer.up.weight.copy_(U)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> Tensor:
        """U·V as an (out, in) matrix."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_with_factors(model: nn.Module, name: str, U: Tensor, V: Tensor) -> LowRankLinear:
    """Replace the nn.Linear / Conv1D called ``name`` by a LowRankLinear of U (m×k) and V (k×n)."""
    old = model.get_submodule(name)
    weight = old.weight
    layer = LowRankLinear.from_factors(U.to(weight.device), V.to(weight.device), old.bias,
                                       conv1d=isinstance(old, Conv1D), dtype=weight.dtype)
    _set_module(model, name, layer)
    return layer


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """Module name -> LowRankLinear for every factorized layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def lowrank_ranks(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in lowrank_modules(model).items()}


def densify(model: nn.Module) -> nn.Module:
    """Replace every LowRankLinear of ``model`` (in place) by a dense layer holding U·V; returns the model."""
    for name, layer in lowrank_modules(model).items():
        W = layer.dense_weight().detach()
        bias = layer.up.bias
        if layer.conv1d:
            dense = Conv1D(layer.out_features, layer.in_features)
            dense.weight = nn.Parameter(W.T.contiguous())
        else:
            dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                              dtype=W.dtype, device=W.device)
            dense.weight = nn.Parameter(W.contiguous())
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().clone())
        elif layer.conv1d:
            dense.bias = None
        _set_module(model, name, dense)
    return model


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

    from ..export.staging import weight_files

    state: dict[str, Tensor] = {}
    for file in weight_files(path, WEIGHTS_STEM):
        if not file.is_file():
            raise LlmpressError(f"'{path}' lacks {file.name}: the factorized model folder is incomplete; write it again")
        state.update(load_file(str(file)))
    return state


def load_lowrank_folder(path: Path, config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a factorized model from its folder: the architecture from config, LowRankLinear per entry, the tensors."""
    from transformers import AutoModelForCausalLM

    ranks = config_ranks(config)
    original = (getattr(config, CONFIG_KEY, None) or {}).get("architectures")
    if original:  # the dense model's class name, set aside by _mark_lowrank
        config.architectures = original
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, rank in ranks.items():
        old = model.get_submodule(name)
        conv = isinstance(old, Conv1D)
        n, m = old.weight.shape if conv else old.weight.shape[::-1]
        _set_module(model, name, LowRankLinear(n, m, int(rank), old.bias is not None, conv, dtype))
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


def save_factorized(model: nn.Module, tokenizer, out: str | Path, meta: dict, format: str = "auto") -> Path:
    """Save a model with LowRankLinear layers: factors + config entry ("auto"), or U·V multiplied back ("dense").

    The dense folder is a plain transformers folder (the in-memory model stays factorized);
    its metadata drops the per-factor records (``<name>.down`` / ``.up``), which no longer exist.
    """
    from ..save import save_model

    if format == "compressed-tensors":
        raise LlmpressError("format compressed-tensors cannot hold factorized (low-rank) layers: "
                            "use --format auto (llmpress safetensors) or --format dense")
    if format == "dense":
        import copy

        factorized = set(lowrank_modules(model))
        layers = {n: m for n, m in meta.get("layers", {}).items() if n.rpartition(".")[0] not in factorized}
        notes = [*meta.get("notes", []), "low-rank factors multiplied back into dense weights (U·V)"]
        return save_model(densify(copy.deepcopy(model)), tokenizer, out, {**meta, "layers": layers, "notes": notes})
    from ..export.readers import readers
    from ..export.staging import save_renamed

    def mark(config: dict) -> None:  # keep the dense class name for load_lowrank_folder
        config.setdefault(CONFIG_KEY, {})["architectures"] = config.get("architectures")
        config["architectures"] = [ARCHITECTURE]

    set_config_entry(model)
    try:
        entry = {CONFIG_KEY: getattr(model.config, CONFIG_KEY)}
        return save_renamed(model, tokenizer, out, {**meta, "readers": readers(entry)}, WEIGHTS_STEM, mark)
    finally:
        clear_config_entry(model)
