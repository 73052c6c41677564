"""Save a quantized model in the compressed-tensors ``pack-quantized`` format (transformers, vLLM).

The folder is an ordinary transformers folder whose quantized linears are
stored as ``<module>.weight_packed`` (int32, see ``llmpress.quant.packing``),
``weight_scale`` (out, groups) in the model's dtype (fp32 for our default
model; vLLM casts scales to its activation dtype on load. With fp16/bf16
scales the reloaded weights are ``(q - zero) * scale`` rounded once more
than the dense in-memory weights, about 1 in 10 differing by one bf16 ulp;
fp32 models reload bit-identically), ``weight_shape``
and, for asymmetric grids, ``weight_zero_point`` (int32, packed along the
output dim). ``config.json`` carries ``quantization_config`` in
compressed-tensors' schema (quant_method ``compressed-tensors``, format
``pack-quantized``, status ``compressed``), with one config group per
distinct (bits, group size, symmetry) and every other linear (lm_head,
skipped layers) in ``ignore``. 8-bit weight-only layers are pack-quantized
too: compressed-tensors' ``int-quantized`` format is for W8A8 schemes that
also quantize activations.

compressed-tensors 0.20 dequantizes a group only when ``in_features`` is a
multiple of ``group_size`` (``_process_group`` raises "tensor column shape
must be divisble by the given group_size"), so when a scheme's group size
does not divide every width (e.g. 576 columns, group 128) its layers are
written with group size ``gcd(group_size, widths)`` and repeated scales:
the same dequantized weights, exactly, for more scale bytes. GPT-2's
``Conv1D`` layers are left dense (dequantized): compressed-tensors packs
``nn.Linear`` only.

Loading (transformers 5.23, compressed-tensors 0.20, CPU):
``AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))``
gives the dense model exactly when the folder has one config group; with
several, transformers dequantizes every layer with the first group's
scheme and fails, so :func:`load_compressed_tensors` (used by
``llmpress.load_model``) dequantizes such folders itself. The default
compressed execution works on CPU for symmetric schemes only (for
asymmetric ones compressed-tensors allocates unpacked zero points and the
load reports a size mismatch). vLLM serves the folder directly
(``vllm serve out``; as far as we know its WNA16 kernels take 4 and 8 bits; not tried here).

Zero points must be integers. compressed-tensors 0.20.1 has ``QuantizationArgs.zp_dtype``, but
its pack-quantized decompressor always unpacks ``weight_zero_point`` from int32 words
(``unpack_from_int32`` raises "Expected torch.int32" for anything else), so neither transformers
nor vLLM could read a float zero point from this layout, and rounding one (HQQ's, meta
``"zero_float": True``) changes the weights. :func:`can_save` refuses such layers with that
reason, and "auto" then saves the model dense, which stores the weights exactly.

A quantized input embedding (``llmpress.quant.embedding``) is stored the same way, as
``<embedding>.weight_packed`` / ``weight_scale`` / ``weight_zero_point`` / ``weight_shape`` with (vocab,
hidden) as (out, in) and its own config group ``embedding`` targeting it by name (its group size as
chosen: llmpress reads it); a head tied to it has no tensor of its own (the codes are the head's too).
transformers and vLLM quantize linears only, so such a folder is read by llmpress alone
(:func:`readers`), which dequantizes it and ties the head again on load.

This module is the ``pack-quantized`` entry of the format table (:data:`FORMAT`,
``llmpress.export.formats``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import re
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..compressed import Compressed, Grid
from ..errors import LlmpressError
from ..lowrank.module import LowRankLinear
from ..models.lazy import Checkpoint
from ..primitives import expand_groups
from ..quant.embedding import QuantizedEmbedding
from ..quant.qlinear import QuantizedLinear, dequantize_packed, integer_zero
from ..save import save_model
from .base import Folder, Format
from .staging import swapped
from .tools import LLMPRESS, LM_EVAL, TRANSFORMERS_CT, VLLM

log = logging.getLogger(__name__)

PACKED = "pack-quantized"  # compressed-tensors' name of the layout
EMBEDDING_GROUP = "embedding"  # the config group of a quantized (tied) embedding matrix: llmpress reads it


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One config group: ``group_size`` None means one scale per output channel."""

    bits: int
    group_size: int | None
    sym: bool

    def weights(self) -> dict:
        """compressed-tensors' ``QuantizationArgs`` for the weights, as JSON."""
        return {"num_bits": self.bits, "type": "int", "symmetric": self.sym,
                "strategy": "channel" if self.group_size is None else "group",
                "group_size": self.group_size, "dynamic": False, "observer": "minmax"}


def storage_group_size(group_size: int | None, in_features: list[int]) -> int | None:
    """The group size compressed-tensors can load for layers of these widths (None: per channel).

    ``group_size`` when it divides every width; else ``gcd(group_size, *widths)``, which
    splits every group, partial last ones included, into equal parts. One size for all
    layers of a scheme keeps them in one config group (transformers 5.23 dequantizes
    every layer with the first group's scheme).
    """
    if group_size is None or group_size <= 0:
        return None
    if all(width % group_size == 0 for width in in_features):
        return group_size
    return math.gcd(group_size, *in_features)


def regroup(result: Compressed, group_size: int | None, new_group_size: int | None) -> Compressed:
    """``result`` with scale/zero (out, groups) re-expressed for ``new_group_size``, which divides
    every group of ``group_size`` and the width; the dequantized weight is unchanged."""
    in_features = result.qweight.shape[1]
    old = None if group_size is None or group_size <= 0 else group_size
    if old == new_group_size:
        return result
    if new_group_size is None or (old is not None and old % new_group_size) or in_features % new_group_size:
        raise LlmpressError(f"cannot regroup group_size {group_size} into {new_group_size} for "
                            f"{in_features} columns: the new size must divide both")

    def every(per_group: torch.Tensor) -> torch.Tensor:
        return expand_groups(per_group, in_features, old)[:, ::new_group_size].contiguous()

    zero = None if result.zero is None else every(result.zero)
    return dataclasses.replace(result, scale=every(result.scale), zero=zero)


def _grid(name: str, result: Compressed, layers: dict) -> Grid | None:
    """The grid of a weight-quantized layer with codes (its record's, else the result's), else None."""
    grid = Grid.of(layers.get(name)) if layers.get(name) else result.grid
    return None if result.qweight is None else grid


def _layer_key(name: str, result: Compressed, layers: dict) -> tuple[int, int, bool] | None:
    """(bits, group size, sym) of a weight-quantized layer with codes, else None."""
    grid = _grid(name, result, layers)
    return None if grid is None else (grid.bits, grid.group_size, grid.sym)


def can_save(model: nn.Module, layers: dict, results: dict[str, Compressed]) -> str | None:
    """None when the quantized linears in ``results`` can be stored pack-quantized exactly, else why not."""
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        return ("format compressed-tensors cannot hold factorized (low-rank) layers: use --format auto "
                "(llmpress safetensors) or --format dense")
    if hasattr(model.config, "quantization_config"):
        return "this model already carries a quantization_config: export a plain (dequantized) model"
    for name, meta in layers.items():
        grid = Grid.of(meta)
        if grid is not None and grid.act_bits:
            return (f"layer {name} also quantizes activations (W8A8), and pack-quantized writes weight-only "
                    "schemes: save it with --format auto, which writes W8A8 models int-quantized")
        if grid is not None and grid.codebook:
            return (f"layer {name} is quantized on a lookup table (non-uniform grid), which pack-quantized cannot "
                    "store: save it with --format auto (llmpress's codebook folder) or --format dense")
    linears, convs = 0, 0
    for name, result in results.items():
        key = _layer_key(name, result, layers)
        if key is None:
            continue
        module = model.get_submodule(name)
        if isinstance(module, Conv1D):
            convs += 1
            continue
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return (f"module {name} is a {type(module).__name__}, not nn.Linear: pass the results computed for "
                    "this model")
        meta = layers.get(name) or result.meta
        float_zero = _grid(name, result, layers).float_zero or (result.grid is not None and result.grid.float_zero)
        if float_zero or not (key[2] or integer_zero(result.zero)):
            return (f"layer {name} has float zero points ({meta.get('method', 'its method')}'s grid), and "
                    "pack-quantized stores integer ones only: save it with --format dense, which is exact")
        linears += 1
    if not linears and convs:
        return ("only GPT-2 Conv1D layers are quantized, and compressed-tensors packs nn.Linear only: save this "
                "model with --format dense")
    if not linears:
        return ("no quantized nn.Linear layers to export: run a quantization method first (e.g. recipe "
                "rtn-w4-g64) and pass its results")
    return None


def fits(model: nn.Module, layers: dict, results: dict[str, Compressed]) -> bool:
    """Some linear weight-only quantized, every such layer with its codes, no GPT-2 Conv1D (``Arch.transposed``):
    what "auto" packs."""
    grids = {n: Grid.of(meta) for n, meta in layers.items()}
    weight_only = [n for n, grid in grids.items() if grid is not None and grid.act_bits is None]
    return bool(weight_only) and all(results.get(n) is not None and results[n].qweight is not None
                                     for n in weight_only) and not any(isinstance(m, Conv1D) for m in model.modules())


def _quantized_layers(model: nn.Module, layers: dict, results: dict[str, Compressed]):
    """{name: (module, result in storage grouping, scheme)} per exportable layer; names of dense Conv1D ones.

    Call after :func:`can_save` said yes."""
    found, dense, embeddings = {}, [], {}
    for name, result in results.items():
        key = _layer_key(name, result, layers)
        if key is None:
            continue
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):  # read by llmpress alone: any group size, stored as it is
            embeddings[name] = (module, result, Scheme(key[0], None if key[1] == -1 else key[1], key[2]))
            continue
        if isinstance(module, Conv1D):
            dense.append(name)
            continue
        found[name] = (module, result, key)
    if dense:
        log.warning("%d Conv1D layers (GPT-2) are saved dense: compressed-tensors packs nn.Linear only", len(dense))
    widths: dict[tuple, list[int]] = {}
    for module, _, key in found.values():
        widths.setdefault(key, []).append(module.in_features)
    storage = {key: storage_group_size(key[1], w) for key, w in widths.items()}
    for (bits, group, _sym), size in storage.items():
        if size is not None and size != group:
            log.warning("%d-bit group %d does not divide every layer width: stored as group %d (same weights, "
                        "%dx the scales) so that compressed-tensors can load it", bits, group, size, group // size)
    chosen = {}
    for name, (module, result, key) in found.items():
        scheme = Scheme(key[0], storage[key], key[2])
        chosen[name] = (module, regroup(result, key[1], scheme.group_size), scheme)
    return chosen, dense, embeddings


MARLIN_TILES = (128, 64)  # vLLM's Marlin kernel: input features and output features multiples of these
MARLIN_GROUPS = (-1, 32, 64, 128)


def vllm_marlin_misfits(shapes: dict[str, tuple[int, int]], schemes: dict[str, Scheme]) -> list[str]:
    """The packed layers vLLM's Marlin int4/int8 kernel cannot run: (out, in) ``shapes`` whose inputs are not
    a multiple of 128 or outputs of 64 (``GPTQ_MARLIN_MIN_THREAD_K``/``_N``), or a group size it lacks. Marlin
    is the kernel vLLM picks on most GPUs; such layers need another (Machete on Hopper, Exllama in fp16)."""
    misfit = []
    for name, (out_features, in_features) in shapes.items():
        scheme = schemes[name]
        if (in_features % MARLIN_TILES[0] or out_features % MARLIN_TILES[1] or scheme.bits not in (4, 8)
                or (scheme.group_size or -1) not in MARLIN_GROUPS):
            misfit.append(name)
    return misfit


def quantization_config(schemes: dict[Scheme, list[str]], ignore: list[str]) -> dict:
    """``config.json``'s ``quantization_config`` in compressed-tensors' schema.

    One scheme targets the class ``Linear`` (as llm-compressor writes it) with every
    other linear in ``ignore``; several schemes each target their modules by name.
    """
    groups = {}
    for i, (scheme, names) in enumerate(sorted(schemes.items(), key=lambda kv: -len(kv[1]))):
        groups[f"group_{i}"] = {"targets": ["Linear"] if len(schemes) == 1 else sorted(names),
                                "weights": scheme.weights(), "input_activations": None,
                                "output_activations": None, "format": PACKED}
    return {"quant_method": "compressed-tensors", "format": PACKED, "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "global_compression_ratio": None}


def save_compressed_tensors(model: nn.Module, tokenizer, layers: dict[str, dict],
                            results: dict[str, Compressed], out: str | Path,
                            extra_meta: dict | None = None) -> Path:
    """Write ``model`` to ``out`` with the layers in ``results`` packed (see the module docstring).

    ``layers`` is the per-layer meta from ``compress_blocks`` and ``results`` its ``results=``
    dict (codes, scales, zeros). The model itself is left as it was. ``extra_meta`` (e.g.
    ``CompressResult.meta``) goes into ``llmpress.json`` with ``layers`` and an ``export``
    record. Written through a temporary folder renamed into place, like ``save_model``.
    """
    reason = can_save(model, layers, results)
    if reason is not None:
        raise LlmpressError(reason)
    chosen, dense, embeddings = _quantized_layers(model, layers, results)
    schemes: dict[Scheme, list[str]] = {}
    replacements = {}
    for name, (module, result, scheme) in chosen.items():
        schemes.setdefault(scheme, []).append(name)
        meta = Grid(scheme.bits, scheme.group_size or -1, scheme.sym).to_record()
        replacements[name] = QuantizedLinear.from_compressed(module, result, meta)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in replacements]
    config = quantization_config(schemes, ignore)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    for name, (module, result, scheme) in embeddings.items():  # its own group, by name (at most one embedding)
        replacements[name] = QuantizedEmbedding.from_compressed(module, result, Grid(scheme.bits,
                                                                 scheme.group_size or -1, scheme.sym))
        if head is not None and getattr(head, "weight", None) is module.weight:  # tied: the codes are the head's
            replacements[next(n for n, m in model.named_modules() if m is head)] = nn.Identity()
        config["config_groups"][EMBEDDING_GROUP] = {"targets": [name], "weights": scheme.weights(),
                                                    "input_activations": None, "output_activations": None,
                                                    "format": PACKED}
    scale_dtype = str(next(iter(replacements.values())).weight_scale.dtype).removeprefix("torch.")
    meta = {**(extra_meta or {})}
    meta.setdefault("layers", layers)
    misfits = vllm_marlin_misfits({n: (m.out_features, m.in_features) for n, m in replacements.items()
                                   if n in chosen},
                                  {n: scheme for n, (_, _, scheme) in chosen.items()})
    if misfits:
        log.warning("vLLM: %d of %d packed layers do not fit its Marlin kernel (inputs a multiple of 128, outputs "
                    "of 64), e.g. %s: on GPUs other than Hopper (Machete) serve with --dtype float16 (Exllama), "
                    "or compress a model whose widths fit", len(misfits), len(replacements), misfits[0])
    meta["export"] = {"format": "compressed-tensors", "compression_format": PACKED, "scale_dtype": scale_dtype,
                      "packed_layers": len(chosen), "packed_embedding": next(iter(embeddings), None),
                      "dense_conv1d_layers": dense,
                      "vllm_marlin_misfits": len(misfits)}
    meta["readers"] = readers({"quantization_config": config})
    with swapped(model, replacements, config):
        path = save_model(model, tokenizer, out, meta)
    log.info("saved %d packed layers (%d schemes) to %s", len(replacements), len(schemes), path)
    return path


def _readable(group: dict, config: dict) -> bool:
    """Whether :func:`dense_state_dict` can read this config group (weight-only pack-quantized int)."""
    weights = group.get("weights") or {}
    return ((group.get("format") or config.get("format")) == PACKED and weights.get("type", "int") == "int"
            and weights.get("strategy") in ("group", "channel") and not group.get("input_activations"))


def _scheme_for(name: str, groups: dict) -> dict | None:
    """The config group of module ``name``, by compressed-tensors' precedence: exact name, regex, class."""
    found: dict[int, dict] = {}
    for group in groups.values():
        for target in group.get("targets", []):
            if target == name:
                found.setdefault(0, group)
            elif target.startswith("re:") and re.match(target[3:], name):
                found.setdefault(1, group)
            elif target == "Linear":  # a packed weight belongs to a linear
                found.setdefault(2, group)
    return found[min(found)] if found else None


PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")  # a packed layer's tensors


def _packed_weights(name: str, config: dict, where) -> dict:
    """The weights scheme of the config group targeting packed layer ``name`` (a one-line error when no
    readable group does)."""
    group = _scheme_for(name, config.get("config_groups") or {})
    if group is None or not _readable(group, config):
        raise LlmpressError(f"{where}: no readable pack-quantized config group targets {name}: "
                            "check quantization_config in config.json")
    return group["weights"]


def _packed_parts(path: str | Path, config: dict):
    """The folder's safetensors, and for each packed layer its config group's weights scheme and its packed
    tensors (removed from the first): (tensors, {name: (weights scheme, {part: tensor})})."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    layers = {}
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key.removesuffix(".weight_packed")
        layers[name] = (_packed_weights(name, config, path), {p: tensors.pop(f"{name}.{p}", None) for p in PARTS})
    return tensors, layers


def _dequantized(weights: dict, parts: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """The (out, in) weight of one packed layer, in its scales' dtype."""
    zero = None if weights.get("symmetric", True) else parts["weight_zero_point"]
    group_size = weights.get("group_size") if weights["strategy"] == "group" else None
    return dequantize_packed(parts["weight_packed"], parts["weight_scale"], zero, int(weights["num_bits"]),
                             group_size, int(parts["weight_shape"][1]))


def dense_tensors(checkpoint: Checkpoint, config: dict, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of ``checkpoint`` named ``prefix...`` as the dense model holds them: each packed layer's
    weight dequantized from its packed tensors into ``<module>.weight``, every floating tensor in ``dtype``.

    ``config`` is the folder's ``quantization_config`` ({} for a dense folder). Reads only the tensors under
    ``prefix`` ("model.layers.3."; "" for all): a streamed evaluation (``llmpress.measure.streamed``) reads a
    folder one block at a time this way.
    """
    names = [n for n in checkpoint.names() if n.startswith(prefix)]
    packed = [n.removesuffix(".weight_packed") for n in names if n.endswith(".weight_packed")]
    parts_of = {f"{name}.{part}" for name in packed for part in PARTS}
    tensors = {n: checkpoint.get(n, dtype) for n in names if n not in parts_of}
    for name in packed:
        weights = _packed_weights(name, config, checkpoint.folder)
        parts = {p: checkpoint.get(f"{name}.{p}") if f"{name}.{p}" in checkpoint else None for p in PARTS}
        tensors[f"{name}.weight"] = _dequantized(weights, parts).to(dtype)
    return tensors


def dense_state_dict(path: str | Path, config: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors, packed layers dequantized to ``<module>.weight`` in ``dtype``."""
    return dense_tensors(Checkpoint(path), config, "", dtype)


def packed_codes(path: str | Path) -> dict[str, Compressed]:
    """Each packed layer of a pack-quantized folder as its integer codes, scales (fp32) and zero points, with
    its grid: what a method returned, for writing the same codes in another format (GGUF)."""
    import json

    from ..quant.qlinear import unpack_codes

    config = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    _, layers = _packed_parts(path, config)
    found = {}
    for name, (weights, parts) in layers.items():
        bits, (out_features, in_features) = int(weights["num_bits"]), (int(n) for n in parts["weight_shape"])
        sym = bool(weights.get("symmetric", True))
        group_size = int(weights.get("group_size") or -1) if weights["strategy"] == "group" else -1
        codes, zero = unpack_codes(parts["weight_packed"], None if sym else parts["weight_zero_point"], bits,
                                   out_features, in_features)
        found[name] = Compressed(None, codes, parts["weight_scale"].float(), None if zero is None else zero.float(),
                                 grid=Grid(bits, group_size, sym))
    return found


def load_compressed_tensors(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A dense causal LM from a compressed-tensors folder, on CPU (weights dequantized to ``dtype``).

    One config group: transformers with ``CompressedTensorsConfig(dequantize=True)``. Several
    (mixed bits / group sizes), or compressed-tensors not installed: read here with
    :func:`dense_state_dict`, since transformers 5.23 dequantizes every layer with the first
    group's scheme.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    qconfig = config.quantization_config
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    groups = qconfig.get("config_groups") or {}
    ours = Path(path).is_dir() and bool(groups) and all(_readable(g, qconfig) for g in groups.values())
    installed = importlib.util.find_spec("compressed_tensors") is not None
    if not ours or (len(groups) == 1 and installed and EMBEDDING_GROUP not in groups):
        from transformers import CompressedTensorsConfig

        with warnings.catch_warnings():  # "the model already has a quantization_config": intended
            warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")
            return AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True))
    del config.quantization_config
    state = dense_state_dict(path, qconfig, dtype)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the Auto class needs a path; a state dict has none
    return model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)


def _groups_formats(folder: Folder) -> tuple[int, set]:
    groups = folder.quantization.get("config_groups") or {}
    fallback = folder.quantization.get("format")
    return len(groups), {(g or {}).get("format") or fallback for g in groups.values()}


def detect(folder: Folder) -> bool:
    """compressed-tensors with every config group pack-quantized (one group, or several: mixed schemes)."""
    count, formats = _groups_formats(folder)
    return count > 0 and formats == {PACKED}


def kind(config: dict) -> str:
    """"pack-quantized", or "pack-quantized-mixed" for several config groups (transformers cannot read those)."""
    return PACKED if _groups_formats(Folder(None, config))[0] == 1 else f"{PACKED}-mixed"


def readers(config: dict) -> list[str]:
    """One group: llmpress, transformers (compressed-tensors), vLLM, and lm-eval for symmetric schemes
    (its default loading runs the compressed layers, which fails for asymmetric ones); several: llmpress, vLLM."""
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    if EMBEDDING_GROUP in groups:  # transformers and vLLM pack linears only
        return [LLMPRESS]
    if len(groups) > 1:
        return [LLMPRESS, VLLM]
    symmetric = all(((g or {}).get("weights") or {}).get("symmetric", True) for g in groups.values())
    return [LLMPRESS, TRANSFORMERS_CT, VLLM, *([LM_EVAL] if symmetric else [])]


def load(path: Path, config, dtype: torch.dtype) -> nn.Module:
    return load_compressed_tensors(path, dtype)


def save(model: nn.Module, tokenizer, out: str | Path, meta: dict, layers: dict,
         results: dict[str, Compressed]) -> Path:
    return save_compressed_tensors(model, tokenizer, layers, results, out, meta)


FORMAT = Format("pack-quantized", "compressed-tensors", True, detect, load, fits, can_save, save, readers, kind)
