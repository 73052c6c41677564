"""Parameter counts and the byte size of a model's weights in compressed form.

The size model follows how compressed-tensors stores checkpoints (packed
integer weights, fp16 group scales, bitmask sparsity), so a "4-bit" model is
charged for its scale and metadata overhead rather than a flat 4 bits/weight.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmpress.compressed import Grid, Sparsity
from llmpress.errors import LlmpressError

log = logging.getLogger(__name__)

ROW_OFFSET_BYTES = 8  # sparse-bitmask's int64 row_offsets
SCALE_BYTES = 2  # one fp16 scale per group per output row


def _output_embedding(model) -> nn.Module | None:
    """The LM head module, if the model exposes one."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _unique_params(model) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owner module, param name, param) with shared (tied) tensors listed once."""
    seen: set[int] = set()
    out = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            out.append((module, name, param))
    return out


def nonzero_count(param: torch.Tensor, name: str | None, nonzero: dict[str, int] | None = None) -> int:
    """Non-zero entries of ``param``: counted, or for a parameter on the meta device (a skeleton evaluated block
    by block, ``llmpress.measure.streamed``) taken from ``nonzero`` {full parameter name: count}."""
    if not param.is_meta:
        return int(torch.count_nonzero(param.detach()).item())
    if nonzero is None or name not in nonzero:
        raise LlmpressError(f"parameter {name} is on the meta device (no data): pass its non-zero count "
                            "(nonzero=, counted as the weights were read)")
    return nonzero[name]


def count_params(model, nonzero: dict[str, int] | None = None) -> dict:
    """Count unique parameters (tied embeddings once) and sort them by kind.

    ``linear``: weights of ``nn.Linear`` / ``Conv1D`` modules other than the
    LM head; ``embedding``: ``nn.Embedding`` parameters plus an untied LM-head
    weight (an embedding matrix in all but name); ``other``: everything else
    (norms, biases). ``nonzero`` counts non-zero entries over all of them
    (for parameters on the meta device, from the ``nonzero`` argument: :func:`nonzero_count`).
    """
    head = _output_embedding(model)
    names = {id(p): n for n, p in model.named_parameters()}  # a shared parameter by its first name
    counts = {"total": 0, "nonzero": 0, "linear": 0, "embedding": 0, "other": 0}
    for module, name, param in _unique_params(model):
        n = param.numel()
        counts["total"] += n
        counts["nonzero"] += nonzero_count(param, names.get(id(param)), nonzero)
        if isinstance(module, nn.Embedding) or (module is head and name == "weight"):
            counts["embedding"] += n
        elif isinstance(module, (nn.Linear, Conv1D)) and name == "weight":
            counts["linear"] += n
        else:
            counts["other"] += n
    return counts


def _bytes(bits: float) -> int:
    """Whole bytes needed for ``bits`` bits."""
    return int(math.ceil(bits / 8))


def _check_spec(name: str, spec: dict) -> None:
    """Reject malformed per-layer compression records."""
    bits, sparsity, nm = spec.get("bits"), spec.get("sparsity") or 0.0, spec.get("n:m")
    if bits is not None and not (isinstance(bits, int) and 1 <= bits <= 32):
        raise LlmpressError(f"layer {name}: bits must be an integer 1-32 or None, got {bits!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise LlmpressError(f"layer {name}: sparsity must be in [0, 1), got {sparsity!r}")
    if nm is not None and not (len(nm) == 2 and 0 < nm[0] <= nm[1]):
        raise LlmpressError(f"layer {name}: n:m must be [n, m] with 0 < n <= m, got {nm!r}")
    shape = spec.get("shape")
    if shape is not None and (len(shape) != 2 or min(shape) < 1):
        raise LlmpressError(f"layer {name}: shape must be [out, in], got {shape!r}")


def _groups_per_row(cols: int, group_size) -> int:
    """Quantization groups per output row; None / -1 / 0 means per-channel."""
    if group_size in (None, -1, 0):
        return 1
    return math.ceil(cols / int(group_size))


# per super-block of 256, besides the codes: Q4_K fp16 d and dmin + 12 bytes of 6-bit scales and mins;
# Q6_K 16 int8 scales + fp16 d (ggml's block_q4_K: 144 bytes, block_q6_K: 210 bytes)
KQUANT_SUPERBLOCK_BYTES = {"Q4_K": 2 + 2 + 12, "Q6_K": 16 + 2}


def layer_bytes(spec: dict, dense_bits: int = 16) -> int:
    """Bytes one compressed weight takes; see :func:`size_report` for the rules."""
    rows, cols = (int(d) for d in spec["shape"])
    numel = rows * cols
    grid, sparsity = Grid.of(spec), Sparsity.of(spec)
    if grid is None:
        if sparsity is None:
            return _bytes(numel * dense_bits)
        nm = sparsity.nm
        kept = numel * nm[0] // nm[1] if nm is not None else round(numel * (1.0 - sparsity.fraction))
        offsets = 0 if sparsity.two_four(cols) else rows * ROW_OFFSET_BYTES
        return _bytes(kept * dense_bits) + rows * _bytes(cols) + offsets
    if grid.codebook and grid.vector is not None:  # codes + fp16 codebooks of 2^(b·dim) dim-long codewords
        dim, per = grid.vector
        return _bytes(numel * grid.bits) + math.ceil(rows / per) * (1 << (grid.bits * dim)) * dim * SCALE_BYTES
    if grid.codebook:  # codes + one table of 2^b fp16 values per row (or group): llmpress.export.codebook
        tables = rows * _groups_per_row(cols, grid.group_size)
        return _bytes(numel * grid.bits) + tables * (1 << grid.bits) * SCALE_BYTES
    if grid.kquant is not None:  # llama.cpp's super-blocks of 256: fp16 scale(s) and packed sub-scales each
        return _bytes(numel * grid.bits) + rows * (cols // 256) * KQUANT_SUPERBLOCK_BYTES[grid.kquant]
    groups = rows * _groups_per_row(cols, grid.group_size)
    zeros = 0 if grid.sym else _bytes(groups * grid.bits)
    return _bytes(numel * grid.bits) + groups * SCALE_BYTES + zeros


def _layer_weights(model, layers: dict[str, dict]) -> dict[int, dict]:
    """Map id(weight) -> spec (with shape filled in) for each listed layer (an embedding's too)."""
    out = {}
    for name, spec in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise LlmpressError(f"size_report: model has no module named {name!r}") from exc
        weight = getattr(module, "weight", None)
        if weight is None and getattr(module, "linear_children", None):
            continue  # factorized (LowRankLinear): its two linears are counted as themselves
        if not isinstance(weight, torch.Tensor):
            raise LlmpressError(f"size_report: module {name!r} has no weight tensor")
        spec = dict(spec)
        if spec.get("shape") is None:
            shape = tuple(weight.shape)
            spec["shape"] = list(shape[::-1]) if isinstance(module, Conv1D) else list(shape)
        _check_spec(name, spec)
        out[id(weight)] = spec
    return out


def folder_bytes(folder: str | Path) -> int:
    """Sum of the sizes of all files under ``folder``, recursively."""
    path = Path(folder)
    if not path.is_dir():
        raise LlmpressError(f"size_report: folder {str(path)!r} does not exist or is not a directory")
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def size_report(
    model,
    layers: dict[str, dict] | None = None,
    folder: str | Path | None = None,
    dense_bits: int = 16,
    nonzero: dict[str, int] | None = None,
) -> dict:
    """The bytes a model's weights take in compressed form.

    ``layers`` maps a module name (``"model.layers.0.mlp.up_proj"``) to what
    compression did to its weight: ``{"shape": [out, in], "bits", "group_size",
    "sym", "sparsity", "n:m"}`` (missing shape: taken from the module). Rules,
    after compressed-tensors' storage formats (``b`` = bits, ``d`` =
    ``dense_bits``, ``g`` = groups per row = ceil(in/group_size), 1 when
    per-channel; byte counts rounded up):

    * quantized: ``out*in*b/8`` packed values + ``out*g*2`` fp16 scales +,
      if asymmetric, ``out*g*b/8`` packed zero points;
    * quantized on a codebook (non-uniform) grid: ``out*in*b/8`` packed codes +
      ``out*g*2^b*2`` bytes of fp16 lookup tables; a vector grid (GPTVQ, dim d, one
      codebook per r rows): ``out*in*b/8`` + ``ceil(out/r)*2^(b*d)*d*2``;
    * sparse only (``sparsity > 0``), as compressed-tensors' ``sparse-bitmask``:
      bitmask of ``out*ceil(in/8)`` bytes (one bit per element, rows padded to
      bytes) + the ``round(out*in*(1-s))`` kept values at ``d`` bits + one
      int64 row offset per row;
    * 2:4 only: like compressed-tensors' ``sparse-24-bitmask``: the
      ``out*in/2`` kept values at ``d`` bits + the same per-element bitmask
      (2 bits of index metadata per kept value), no row offsets; other N:M
      patterns (4:8) are saved as ``sparse-bitmask`` and counted as above,
      with ``out*in*n/m`` kept values;
    * sparse (either kind) and quantized: stored as an ordinary quantized
      layer (``pack-quantized``, the pruned weights as the zero point's code),
      so counted like one: sparsity saves no bytes there (compressed-tensors
      has no packed-and-sparse CPU format);
    * a quantized embedding (``llmpress.quant.embedding``; tied with the head or
      not) like a quantized linear, (vocab, hidden) its (out, in);
    * everything else (embeddings, norms, biases, untouched layers) at ``d``
      bits; tied tensors are counted once.

    Returns ``size_bytes``, ``dense_bytes`` (all at ``d`` bits; those of the
    original model when a record has ``base_params``), ``compression_ratio``,
    ``bits_per_weight`` (over all parameters), ``linear_bits_per_weight`` (over the listed layers other than
    embeddings, or None), ``embedding_bits_per_weight`` (over a listed embedding matrix, or None),
    ``disk_bytes`` (files under ``folder``, or None) and ``params`` (:func:`count_params`; ``nonzero``: the
    non-zero counts of a skeleton's meta parameters, by name).
    """
    if not isinstance(dense_bits, int) or dense_bits < 1:
        raise LlmpressError(f"dense_bits must be a positive integer, got {dense_bits!r}")
    specs = _layer_weights(model, layers or {})
    params = count_params(model, nonzero)
    head = _output_embedding(model)
    rest_numel = listed_bytes = listed_numel = embed_bytes = embed_numel = 0
    for module, name, param in _unique_params(model):
        spec = specs.get(id(param))
        if spec is None:
            rest_numel += param.numel()
            continue
        stored, numel = layer_bytes(spec, dense_bits), spec["shape"][0] * spec["shape"][1]
        if isinstance(module, nn.Embedding) or (module is head and name == "weight"):  # not a block linear
            embed_bytes, embed_numel = embed_bytes + stored, embed_numel + numel
        else:
            listed_bytes, listed_numel = listed_bytes + stored, listed_numel + numel
    size = _bytes(rest_numel * dense_bits) + listed_bytes + embed_bytes
    # Structured pruning shrinks the model itself: a record's "base_params" (the parameter count
    # before compression) makes dense_bytes, and so the ratio, those of the original model.
    base_params = max((int(spec.get("base_params") or 0) for spec in (layers or {}).values()), default=0)
    dense = _bytes(max(params["total"], base_params) * dense_bits)
    report = {
        "size_bytes": size,
        "dense_bytes": dense,
        "compression_ratio": dense / size if size else math.inf,
        "bits_per_weight": 8 * size / params["total"] if params["total"] else 0.0,
        "linear_bits_per_weight": 8 * listed_bytes / listed_numel if listed_numel else None,
        "embedding_bits_per_weight": 8 * embed_bytes / embed_numel if embed_numel else None,
        "disk_bytes": folder_bytes(folder) if folder is not None else None,
        "params": params,
    }
    log.debug("size %d bytes (dense %d, ratio %.3f)", size, dense, report["compression_ratio"])
    return report
