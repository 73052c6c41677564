"""Save pruned models compactly in compressed-tensors' sparse formats, and read them back.

Two layouts, byte for byte as compressed-tensors (≤ 0.14) and llm-compressor
write them (``compressors/sparse_compressors`` of compressed-tensors 0.10):

* ``sparse-bitmask`` (any sparsity): per linear ``<module>.compressed`` (the
  kept values, 1-D, row by row, in the model's dtype), ``<module>.bitmask``
  (uint8 (out, ceil(in/8)), one bit per weight, little-endian bit order, as
  ``numpy.packbits(..., bitorder="little")``), ``<module>.row_offsets`` (int64
  (out,), where each row starts in ``compressed``) and ``<module>.shape``
  (int64 [out, in]);
* ``sparse-24-bitmask`` (every pruned layer 2:4 with ``in`` a multiple of 4):
  ``<module>.compressed`` (out, in/2), ``<module>.bitmask`` and
  ``<module>.shape`` (int64, (2, 1)).

``config.json`` gets ``quantization_config = {quant_method: compressed-tensors,
sparsity_config: {format, targets (the layer names), ignore, global_sparsity,
sparsity_structure}, version}``. The bitmask marks the pruning mask (a kept
weight that happens to be 0 is stored as a value). Weights whose mask is
unknown (e.g. OWL's, computed in a model-level stage) use ``weight != 0``.

Caveat (checked here): compressed-tensors ≥ 0.15 dropped the sparse
decompressors (0.20 keeps only their config classes), and transformers 5.x
cannot decompress these folders: given a ``model.safetensors`` it builds the
dense model, lists every pruned weight as MISSING and runs with random ones
(max |Δlogit| ≈ 5.5, top-1 agreement ≈ 0 on a tiny llama). So the tensors are
stored as ``sparse.safetensors`` (``llmpress.export.staging``), which
transformers does not look for: ``from_pretrained`` raises instead.
``llmpress.load_model`` reads the folder (:func:`load_sparse`); for a stack
that still decompresses these layouts (transformers with compressed-tensors
≤ 0.14) rename the file back to ``model.safetensors``: the tensors are
byte for byte what compressed-tensors wrote.
Quantized models (pruned or not) are saved pack-quantized instead (see
``compressed_tensors.py``): that layout has no sparsity, so a pruned + int4
model is stored as plain int4 with its zeros as codes.

This module is the ``sparse`` entry of the format table (:data:`FORMAT`,
``llmpress.export.formats``): chosen for ``format="compressed-tensors"`` when some layer is pruned
and none quantized; "auto" keeps such models dense, which plain transformers 5.x loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy
import torch
from torch import Tensor, nn

from ..compressed import Compressed, Grid, Sparsity
from ..errors import LlmpressError
from ..lowrank.module import LowRankLinear
from .base import Folder, Format
from .staging import save_renamed, swapped
from .tools import LLMPRESS

log = logging.getLogger(__name__)

BITMASK, BITMASK_24 = "sparse-bitmask", "sparse-24-bitmask"
SPARSE_FORMATS = (BITMASK, BITMASK_24)
WEIGHTS_STEM = "sparse"  # sparse.safetensors: transformers 5.x would load model.safetensors with random weights


def pack_bitmask(mask: Tensor) -> Tensor:
    """bool (out, in) -> uint8 (out, ceil(in/8)), bit j%8 of byte j//8 = mask[:, j] (little-endian)."""
    return torch.from_numpy(numpy.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bitmask(bits: Tensor, columns: int) -> Tensor:
    """uint8 (out, ceil(in/8)) -> bool (out, in)."""
    return torch.from_numpy(numpy.unpackbits(bits.cpu().numpy(), axis=-1, count=columns,
                                             bitorder="little").astype(bool))


def sparse_tensors(weight: Tensor, mask: Tensor, layout: str) -> dict[str, Tensor]:
    """The stored tensors of one (out, in) weight with keep-mask ``mask`` (bool) in ``layout``.

    Values keep ``weight``'s dtype. For ``sparse-24-bitmask`` every run of 4 must keep exactly 2.
    """
    rows, cols = weight.shape
    mask = mask.to(torch.bool).cpu()
    values = weight.detach().cpu()[mask]
    if layout == BITMASK_24:
        if cols % 4 or not bool((mask.reshape(rows, -1, 4).sum(-1) == 2).all()):
            raise LlmpressError("sparse-24-bitmask needs exactly 2 of every 4 weights kept: use sparse-bitmask")
        return {"shape": torch.tensor([rows, cols]).reshape(-1, 1), "compressed": values.reshape(rows, cols // 2),
                "bitmask": pack_bitmask(mask)}
    counts = mask.sum(dim=1)
    return {"shape": torch.tensor([rows, cols]), "compressed": values, "bitmask": pack_bitmask(mask),
            "row_offsets": torch.cumsum(counts, 0) - counts}


def dense_weight(tensors: dict[str, Tensor]) -> Tensor:
    """The (out, in) weight from one layer's stored tensors (either layout)."""
    rows, cols = (int(v) for v in tensors["shape"].flatten().tolist())
    mask = unpack_bitmask(tensors["bitmask"], cols).reshape(rows, cols)
    weight = torch.zeros(rows, cols, dtype=tensors["compressed"].dtype)
    weight[mask] = tensors["compressed"].flatten()
    return weight


class SparseLinear(nn.Module):
    """Holds one linear's stored sparse tensors (and its bias) so that ``save_pretrained`` writes them.

    Only for saving: it has no forward.
    """

    def __init__(self, tensors: dict[str, Tensor], bias: nn.Parameter | None) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.bias = bias


def choose_layout(masks: dict[str, Tensor], layers: dict[str, dict]) -> str:
    """sparse-24-bitmask when every pruned layer is 2:4 (and its width a multiple of 4), else sparse-bitmask."""
    found = {n: Sparsity.of(layers.get(n)) for n in masks}
    two_four = all(s is not None and s.two_four(m.shape[1]) for s, m in zip(found.values(), masks.values()))
    return BITMASK_24 if masks and two_four else BITMASK


def sparse_layers(model: nn.Module, layers: dict[str, dict],
                  results: dict[str, Compressed] | None) -> dict[str, tuple[nn.Linear, Tensor]]:
    """{name: (module, keep-mask)} for every pruned (sparsity > 0) nn.Linear listed in ``layers``."""
    found = {}
    for name, meta in layers.items():
        if Sparsity.of(meta) is None:
            continue
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            log.warning("%s is a %s, not nn.Linear: left dense", name, type(module).__name__)
            continue
        result = (results or {}).get(name)
        mask = result.mask if result is not None and result.mask is not None else None
        if mask is None or not bool((module.weight.detach().cpu()[~mask.cpu()] == 0).all()):
            mask = module.weight.detach() != 0
        found[name] = (module, mask.cpu())
    return found


def save_sparse(model: nn.Module, tokenizer, layers: dict[str, dict], results: dict[str, Compressed] | None,
                out: str | Path, extra_meta: dict | None = None) -> Path:
    """Write ``model`` to ``out`` with its pruned linears in a compressed-tensors sparse layout.

    ``layers``/``results``: the per-layer meta and :class:`Compressed` results of the
    compression (masks); written through a temporary folder like ``llmpress.save.save_model``.
    """
    reason = can_save(model, layers, results)
    if reason is not None:
        raise LlmpressError(reason)
    chosen = sparse_layers(model, layers, results)
    layout = choose_layout({n: m for n, (_, m) in chosen.items()}, layers)
    replacements = {n: SparseLinear(sparse_tensors(mod.weight, mask, layout), mod.bias)
                    for n, (mod, mask) in chosen.items()}
    kept = sum(int(m.sum()) for _, m in chosen.values())
    total = sum(m.numel() for _, m in chosen.values())
    config = {"quant_method": "compressed-tensors", "version": "0.10.2", "sparsity_config": {
        "format": layout, "targets": sorted(chosen), "ignore": [], "global_sparsity": 1 - kept / total,
        "sparsity_structure": "2:4" if layout == BITMASK_24 else "unstructured", "registry_requires_subclass": False}}
    meta = {**(extra_meta or {})}
    meta.setdefault("layers", layers)
    meta["export"] = {"format": "compressed-tensors", "compression_format": layout, "sparse_layers": len(chosen)}
    meta["readers"] = readers({"quantization_config": config})
    with swapped(model, replacements, config):
        path = save_renamed(model, tokenizer, out, meta, WEIGHTS_STEM)
    log.info("saved %d sparse layers (%s) to %s", len(chosen), layout, path)
    return path


def is_sparse_config(qconfig: dict) -> bool:
    """Whether a ``quantization_config`` describes a sparse-only folder this module reads."""
    sparsity = qconfig.get("sparsity_config") or {}
    return sparsity.get("format") in SPARSE_FORMATS and not qconfig.get("config_groups")


def load_sparse(path: str | Path, config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A dense causal LM from a sparse-bitmask / sparse-24-bitmask folder (weights decompressed to ``dtype``)."""
    from safetensors.torch import load_file
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    tensors: dict[str, Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    for key in [k for k in tensors if k.endswith(".bitmask")]:
        name = key.removesuffix(".bitmask")
        parts = {p: tensors.pop(f"{name}.{p}") for p in ("shape", "compressed", "bitmask", "row_offsets")
                 if f"{name}.{p}" in tensors}
        tensors[f"{name}.weight"] = dense_weight(parts).to(dtype)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=tensors, dtype=dtype)


def sparse_only(layers: dict) -> bool:
    """Some layer pruned and none quantized: what this format stores (quantized models are pack-quantized)."""
    return (any(Sparsity.of(m) for m in layers.values())
            and not any(Grid.of(m) for m in layers.values()))


def fits(model: nn.Module, layers: dict, results: dict[str, Compressed] | None) -> bool:
    return sparse_only(layers)


def can_save(model: nn.Module, layers: dict, results: dict[str, Compressed] | None) -> str | None:
    """None when the pruned linears of ``layers`` can be stored sparse exactly, else why not."""
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        return ("format compressed-tensors cannot hold factorized (low-rank) layers: use --format auto "
                "(llmpress safetensors) or --format dense")
    if hasattr(model.config, "quantization_config"):
        return "this model already carries a quantization_config: export a plain (dequantized) model"
    pruned = [n for n, m in layers.items() if Sparsity.of(m)]
    if not any(type(model.get_submodule(n)) is nn.Linear for n in pruned):
        return "no pruned nn.Linear layers to export sparse: run a pruning method first (e.g. recipe wanda-50)"
    return None


def detect(folder: Folder) -> bool:
    return is_sparse_config(folder.quantization)


def kind(config: dict) -> str:
    """The layout: sparse-bitmask or sparse-24-bitmask."""
    return config["quantization_config"]["sparsity_config"]["format"]


def readers(config: dict) -> list[str]:
    """llmpress only: transformers 5.x cannot decompress these layouts and refuses the folder (see above)."""
    return [LLMPRESS]


def save(model: nn.Module, tokenizer, out: str | Path, meta: dict, layers: dict,
         results: dict[str, Compressed]) -> Path:
    return save_sparse(model, tokenizer, layers, results, out, meta)


FORMAT = Format("sparse", "compressed-tensors", False, detect, load_sparse, fits, can_save, save, readers, kind)
