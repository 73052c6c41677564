"""The ``codebook`` entry of the format table: non-uniform (lookup-table) quantized models, as llmpress stores them.

A layer quantized on a codebook grid (``Grid.codebook``: SqueezeLLM, ``gptq-lut``; ``llmpress.quant.squeezellm``)
is stored as its :class:`~llmpress.quant.codebook.CodebookLinear` state: ``<name>.weight_codes`` (int32, the
indices packed ``bits`` to a weight), ``<name>.weight_lut`` (out, 2^bits) fp16 (the table's own dtype),
``<name>.weight_shape`` and the bias; everything else as the dense model has it. A vector-quantized layer
(GPTVQ, ``llmpress.quant.vq``) is stored as its :class:`~llmpress.quant.vq.VQLinear` state instead:
``weight_codes`` (the bits·dim-bit codes packed), ``weight_codebook`` (groups, 2^(bits·dim), dim) fp16,
``weight_shape``, bias. ``config.json`` carries ``"llmpress": {"codebook": {<module name>: bits},
"vq": {<module name>: [bits, dim, rows]}, "architectures": [...]}``. Safetensors and JSON only.

compressed-tensors has no lookup-table scheme and no serving engine reads one, so, as for the low-rank entry
(``export/lowrank.py``), the weights are named ``codebook.safetensors`` (transformers looks for
``model.safetensors`` and raises) and ``architectures`` names ``LlmpressCodebookForCausalLM`` (no engine
implements it): other tools refuse the folder instead of running random weights. :func:`load` rebuilds the
CodebookLinear layers, loads the tensors, checks that every one was used, and returns the dense model with each
weight read through its table (``lut[codes]``, exactly the weights the compressed model computed with);
:func:`load_codebook_folder` with ``dense=False`` keeps the CodebookLinear layers instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from ..compressed import Compressed, Grid
from ..errors import LlmpressError
from ..lowrank.module import LowRankLinear
from ..quant.codebook import LUT_DTYPES, CodebookLinear, lookup
from ..quant.vq import VQLinear, vq_lookup
from .base import Folder, Format
from .staging import save_renamed, swapped, weight_files
from .tools import LLMPRESS

CONFIG_KEY = "llmpress"
ENTRY = "codebook"
VQ_ENTRY = "vq"  # {name: [bits, dim, rows]}: vector-quantized layers (GPTVQ, llmpress.quant.vq)
WEIGHTS_STEM = "codebook"  # codebook.safetensors: transformers must not load the folder as a dense model
ARCHITECTURE = "LlmpressCodebookForCausalLM"  # no engine implements it: they refuse instead of misreading


def _grid(name: str, layers: dict, result: Compressed) -> Grid | None:
    return Grid.of(layers.get(name)) if layers.get(name) else result.grid


def _codebook_layers(layers: dict, results: dict[str, Compressed]) -> dict[str, Compressed]:
    """The layers of ``results`` quantized on a codebook grid (by their record, else the result's grid)."""
    found = {}
    for name, result in results.items():
        grid = _grid(name, layers, result)
        if grid is not None and grid.codebook:
            found[name] = result
    return found


def _read_back(result: Compressed, grid: Grid) -> Tensor:
    """The weight the codes and table(s) of ``result`` stand for (CPU)."""
    if grid.vector is not None:
        return vq_lookup(result.qweight.cpu(), result.codebook.cpu(), grid.vector[1])
    return lookup(result.qweight.cpu(), result.codebook.cpu())


def fits(model: nn.Module, layers: dict, results: dict[str, Compressed]) -> bool:
    """Some layer is quantized on a codebook grid."""
    return bool(_codebook_layers(layers, results)) or any(Grid.of(m) is not None and Grid.of(m).codebook
                                                          for m in layers.values())


def can_save(model: nn.Module, layers: dict, results: dict[str, Compressed]) -> str | None:
    """None when every codebook layer has its codes and table and is an ``nn.Linear`` of the right shape."""
    wanted = [n for n, m in layers.items() if Grid.of(m) is not None and Grid.of(m).codebook]
    found = _codebook_layers(layers, results)
    if not wanted and not found:
        return "the model has no codebook-quantized layers: run e.g. recipe squeezellm-w3 first"
    missing = [n for n in wanted if n not in found]
    if missing:
        return f"layer {missing[0]} has no codes and table in the results: pass the results of this compression"
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        return "the codebook format cannot hold factorized (low-rank) layers: use --format dense"
    if hasattr(model.config, "quantization_config"):
        return "this model already carries a quantization_config: export a plain (dequantized) model"
    for name, result in found.items():
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            return f"module {name} is a {type(module).__name__}, and codebook layers replace nn.Linear only"
        if result.qweight is None or result.codebook is None:
            return f"layer {name} has no codes and table in the results: pass the results of this compression"
        grid = _grid(name, layers, result)
        out, cols = module.weight.shape
        shape = (out, cols // grid.vector[0]) if grid.vector is not None else (out, cols)
        if tuple(result.qweight.shape) != shape:
            return f"the codes of {name} do not fit its weight: pass the results computed for this model"
        stored = _read_back(result, grid).to(module.weight.dtype)
        if not torch.equal(stored, module.weight.detach().cpu()):
            return f"the weight of {name} is not its table read at its codes: the model changed after quantization"
    return None


def save(model: nn.Module, tokenizer, out: str | Path, meta: dict, layers: dict,
         results: dict[str, Compressed]) -> Path:
    """Codes + tables + config entry, weights as ``codebook.safetensors``; the model is left as it was."""
    reason = can_save(model, layers, results)
    if reason is not None:
        raise LlmpressError(reason)
    replacements = {}
    for name, result in _codebook_layers(layers, results).items():
        lut_dtype = LUT_DTYPES[(layers.get(name) or result.meta).get("lut_dtype", "float16")]
        linear = model.get_submodule(name)
        if _grid(name, layers, result).vector is not None:
            result = dataclasses.replace(result, grid=_grid(name, layers, result))
            replacements[name] = VQLinear.from_compressed(linear, result, lut_dtype)
        else:
            replacements[name] = CodebookLinear.from_compressed(linear, result, lut_dtype)
    dtypes = sorted({str(_table(m).dtype).removeprefix("torch.") for m in replacements.values()})
    entry = {ENTRY: {name: module.bits for name, module in sorted(replacements.items())
                     if isinstance(module, CodebookLinear)}}
    vq = {name: [m.bits, m.dim, m.group_rows] for name, m in sorted(replacements.items()) if isinstance(m, VQLinear)}
    if vq:
        entry[VQ_ENTRY] = vq

    def mark(config: dict) -> None:  # keep the dense class name for load_codebook_folder
        config[CONFIG_KEY] = {**entry, "architectures": config.get("architectures")}
        config["architectures"] = [ARCHITECTURE]

    extra = {**meta, "readers": readers({CONFIG_KEY: entry}),
             "export": {"format": "codebook", "codebook_layers": len(replacements), "lut_dtypes": dtypes}}
    with swapped(model, replacements, None):
        return save_renamed(model, tokenizer, out, extra, WEIGHTS_STEM, mark)


def _table(module: nn.Module) -> Tensor:
    return module.weight_codebook if isinstance(module, VQLinear) else module.weight_lut


def _entry(config) -> dict:
    entry = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    return entry if isinstance(entry, dict) else {}


def _read(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in weight_files(path, WEIGHTS_STEM):
        if not file.is_file():
            raise LlmpressError(f"'{path}' lacks {file.name}: the codebook model folder is incomplete; write it again")
        state.update(load_file(str(file)))
    return state


def load_codebook_folder(path: Path, config, dtype: torch.dtype = torch.float32, dense: bool = True) -> nn.Module:
    """The model of a codebook folder: CodebookLinear layers from its config entry, the tensors loaded (every one
    must be used, every weight present), then (``dense``) each such layer replaced by an ``nn.Linear`` whose
    weight is ``lut[codes]`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    entry = _entry(config)
    if entry.get("architectures"):
        config.architectures = entry["architectures"]
    delattr(config, CONFIG_KEY)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, bits in (entry.get(ENTRY) or {}).items():
        old = model.get_submodule(name)
        model.set_submodule(name, CodebookLinear(old.in_features, old.out_features, int(bits), old.bias is not None,
                                                 dtype=dtype))
    for name, spec in (entry.get(VQ_ENTRY) or {}).items():
        old = model.get_submodule(name)
        try:
            bits, dim, rows = (int(v) for v in spec)
        except (TypeError, ValueError):
            raise LlmpressError(f"'{path}': config.json's vq entry for {name} is not [bits, dim, rows]; write the "
                                "folder again with llmpress compress") from None
        model.set_submodule(name, VQLinear(old.in_features, old.out_features, bits, dim, rows, old.bias is not None,
                                           dtype=dtype))
    state = _read(Path(path))
    names = [*(entry.get(ENTRY) or {}), *(entry.get(VQ_ENTRY) or {})]
    for name in names:  # the table keeps its stored dtype (buffers are overwritten as loaded)
        module = model.get_submodule(name)
        key = "weight_codebook" if isinstance(module, VQLinear) else "weight_lut"
        table = state.get(f"{name}.{key}")
        if table is not None:
            setattr(module, key, torch.empty_like(table))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:
        raise LlmpressError(f"'{path}': the tensors do not match the codebook layers in config.json; write the "
                            "folder again with llmpress compress") from None
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise LlmpressError(f"'{path}': tensor {(unexpected or untied)[0]} does not match the codebook structure "
                            "in config.json; write the folder again with llmpress compress")
    if dense:
        for name in names:
            module = model.get_submodule(name)
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, dtype=dtype)
            linear.weight.data = module.dequantized_weight(dtype)
            if module.bias is not None:
                linear.bias = module.bias
            model.set_submodule(name, linear)
    return model.eval()


def detect(folder: Folder) -> bool:
    return bool(_entry(folder.config).get(ENTRY) or _entry(folder.config).get(VQ_ENTRY))


def load(path: Path, config, dtype: torch.dtype) -> nn.Module:
    return load_codebook_folder(path, config, dtype)


def readers(config: dict) -> list[str]:
    """llmpress only: transformers finds no model.safetensors and raises; no engine implements the architecture."""
    return [LLMPRESS]


FORMAT = Format("codebook", None, True, detect, load, fits, can_save, save, readers)
