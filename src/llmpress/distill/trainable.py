"""What trains during distillation: the student's trainable parameters, masks and QAT/LoRA wrappers.

Three choices, all restricted to the decoder blocks (embeddings, the tied
lm_head and the final norm stay frozen):

- "all": every block linear's weight and bias and every norm. Pruned layers
  keep their zeros (``Student.after_step`` re-applies the masks after each
  optimizer step); quantized layers train on their fixed grid as
  :class:`~llmpress.distill.qat.QATLinear` (quantization-aware training);
  codebook (lookup-table) layers keep their codes and train their tables
  (:class:`~llmpress.distill.codebook_qat.CodebookQATLinear`); W4A4 layers
  train as QATLinear with their inputs fake-quantized and become W4A4 again.
- "lora": rank-r adapters on every block linear, bases frozen (Hu et al. 2021);
  a quantized layer's base becomes a packed ``QuantizedLinear`` (QLoRA,
  Dettmers et al. 2023) and its merged weight is rounded back on its grid;
  a pruned layer's update is masked.
- "norms": only the norm weights (and linear biases, where there are any):
  a few hundred thousand parameters, nothing to re-round or re-mask.

:meth:`Student.finalize` undoes the wrappers in place and leaves the model
as the engine does: nn.Linear layers holding dequantized weights, with the
integer codes in ``results[name]`` for the compressed-tensors export.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..calib import block_prefix
from ..compressed import Compressed, Grid, Sparsity
from ..errors import LlmpressError
from ..models.archs import Arch, block_linears, get_blocks
from ..quant.qlinear import QuantizedLinear
from ..quant.w4a4 import W4A4Linear
from ..rotate.online import add_input_hadamard, remove_input_hadamard, replacing
from .codebook_qat import CodebookQATLinear
from .lora import LoRALinear, merged_result
from .qat import QATLinear

log = logging.getLogger(__name__)

TRAINABLE = ("all", "lora", "norms")


@dataclass
class Student:
    """The model being trained and what the optimizer may touch (see the module docstring).

    ``params``: every parameter with requires_grad True, in a fixed order. ``masks``: linear
    name -> bool (out, in) keep-mask of pruned layers. ``qat``/``lora``: the wrappers in the
    model, by linear name.
    """

    model: nn.Module
    params: list[nn.Parameter]
    masks: dict[str, Tensor]
    qat: dict[str, QATLinear | CodebookQATLinear]
    lora: dict[str, LoRALinear] = field(default_factory=dict)
    train: str = "all"
    layer_names: list[str] = field(default_factory=list)  # every block linear, for finalize's meta
    kv_cache: Callable[[], object] | None = None  # makes the training KV cache (kvcache.training_kv_cache)
    _masked: list[tuple[Tensor, Tensor]] = field(default_factory=list, repr=False)  # (weight, mask in its layout)
    _requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)  # to restore at finalize

    @torch.no_grad()
    def after_step(self) -> None:
        """Call after every optimizer step: re-zero pruned weights, keep QAT weights in their grid's range."""
        for i, (weight, mask) in enumerate(self._masked):
            if mask.device != weight.device:  # the model moved (trainer onto its device): move the mask once
                mask = mask.to(weight.device)
                self._masked[i] = (weight, mask)
            weight.mul_(mask)
        for module in self.qat.values():
            module.clamp_to_grid_()

    @torch.no_grad()
    def finalize(self, results: dict[str, Compressed] | None = None) -> dict[str, dict]:
        """Undo the training wrappers in place; returns per-layer meta updates ({"distilled": how}).

        QATLinear -> nn.Linear on the grid, and ``results[name]`` replaced by the trained codes
        (same scale/zero); LoRA merged (rounded on the grid and ``results`` updated for a QLoRA
        base). Parameters get back the requires_grad flags they had before prepare_student.
        """
        self.after_step()
        updates = {name: {"distilled": "norms" if self.train == "norms" else "full"} for name in self.layer_names}
        for name, module in self.qat.items():
            plain, result = module.finalize()
            self.model.set_submodule(name, replacing(module, plain))
            if results is not None:
                results[name] = result
            updates[name] = {"distilled": "qat"}
        for name, module in self.lora.items():
            quantized = isinstance(module.base, QuantizedLinear)
            if quantized and results is not None:
                old = results.get(name)
                results[name] = dataclasses.replace(merged_result(module, old.meta if old else None),
                                                    mask=old.mask if old else None)
            self.model.set_submodule(name, replacing(module, module.merged("dense")))
            updates[name] = {"distilled": "qlora" if quantized else "lora"}
        self.qat, self.lora, self._masked, self.params = {}, {}, [], []
        for pname, param in self.model.named_parameters():
            param.requires_grad_(self._requires_grad.get(pname, True))
        return updates


def _norms(block: nn.Module) -> list[nn.Module]:
    """The block's normalisation layers (RMSNorm, LayerNorm, QK-norms), found by class name."""
    return [m for m in block.modules()
            if "norm" in type(m).__name__.lower() and next(m.parameters(recurse=False), None) is not None]


def _mask_of(name: str, module: nn.Module, result: Compressed | None) -> Tensor:
    """(out, in) keep-mask of a pruned layer: the method's own mask, else the nonzero weights."""
    if result is not None and result.mask is not None:
        return result.mask.to(module.weight.device, torch.bool)
    weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
    return weight.detach() != 0


def _quantized(name: str, meta: dict, results: dict[str, Compressed] | None) -> Compressed | None:
    """The layer's engine result when the layer is weight-quantized, else None."""
    grid = Grid.of(meta)
    if grid is None or grid.act_bits:
        return None
    result = (results or {}).get(name)
    if result is None or result.qweight is None:
        raise LlmpressError(f"layer {name} is quantized but no integer codes were given for it: pass the "
                            "engine's results (compress_blocks(..., results=...)) to prepare_student")
    return result


def prepare_student(model: nn.Module, arch: Arch, layers: dict[str, dict],
                    results: dict[str, Compressed] | None, train: str = "all", *, lora_rank: int = 16,
                    lora_alpha: float = 32.0, qlora_cache: bool = True) -> Student:
    """Freeze ``model`` except what ``train`` names, wrapping layers in place (see the module docstring).

    ``layers``: per-layer meta from compress ("sparsity" => pruned, "bits" => quantized, with the
    codes in ``results[name]``). ``qlora_cache``: QLoRA bases keep their dequantized weight after
    the first forward (faster; as much memory as a dense layer). Returns the :class:`Student`.
    """
    if train not in TRAINABLE:
        raise LlmpressError(f"unknown trainable set '{train}': use one of {', '.join(TRAINABLE)}")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    blocks = get_blocks(model, arch)
    prefix = block_prefix(model, blocks)
    student = Student(model, [], {}, {}, train=train, _requires_grad=flags)
    for i, block in enumerate(blocks):
        for rel, module in block_linears(block, arch).items():
            name = f"{prefix}{i}.{rel}"
            if isinstance(module, W4A4Linear):
                student.layer_names.append(name)
                _prepare_w4a4(student, name, module, (results or {}).get(name))
                continue
            if not isinstance(module, (nn.Linear, Conv1D)):
                log.warning("layer %s is a %s: left frozen", name, type(module).__name__)
                continue
            student.layer_names.append(name)
            _prepare_linear(student, name, module, layers.get(name, {}), results, lora_rank, lora_alpha,
                            qlora_cache)
        if train in ("all", "norms"):
            for norm in _norms(block):
                norm.requires_grad_(True)
    seen: set[int] = set()
    for param in model.parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            student.params.append(param)
    log.info("student '%s': %d trainable tensors, %d parameters (%d QAT layers, %d LoRA, %d masked)", train,
             len(student.params), sum(p.numel() for p in student.params), len(student.qat), len(student.lora),
             len(student.masks))
    return student


def _prepare_w4a4(student: Student, name: str, module: W4A4Linear, result: Compressed | None) -> None:
    """Set up one W4A4 layer: "all" trains its weight on its grid with its inputs fake-quantized (QAT), "norms"
    only its bias; LoRA is refused (an update merged into integer codes and int4 activations is not LoRA's)."""
    if student.train == "lora":
        raise LlmpressError(f"layer {name} is W{module.bits}A{module.act_bits}: distill it with train=all "
                            "(quantization-aware training of weights and activations) or train=norms")
    if student.train == "norms":
        if module.bias is not None:
            module.bias.requires_grad_(True)
        return
    _train_qat(student, name, module, QATLinear.from_w4a4(module, result))


def _train_qat(student: Student, name: str, old: nn.Module, wrapped: nn.Module) -> nn.Module:
    """Put the QAT layer ``wrapped`` in ``old``'s place (its online Hadamard kept) and train its latent parameter
    and bias; returns it."""
    wrapped = replacing(old, wrapped)
    student.model.set_submodule(name, wrapped)
    student.qat[name] = wrapped
    wrapped.latent.requires_grad_(True)
    if wrapped.bias is not None:
        wrapped.bias.requires_grad_(True)
    return wrapped


def _prepare_linear(student: Student, name: str, module: nn.Module, meta: dict,
                    results: dict[str, Compressed] | None, rank: int, alpha: float, qlora_cache: bool) -> None:
    """Set up one block linear for ``student.train``."""
    result = _quantized(name, meta, results)
    mask = _mask_of(name, module, (results or {}).get(name)) if Sparsity.of(meta) else None
    if mask is not None:
        student.masks[name] = mask
    if student.train == "norms":
        if module.bias is not None:
            module.bias.requires_grad_(True)
        return
    grid = Grid.of(meta) if result is not None else None
    codebook = grid is not None and grid.codebook
    if student.train == "lora":
        if codebook:
            raise LlmpressError(f"layer {name} is on a lookup-table grid, which LoRA cannot be merged back into: "
                                "use distill train=all (trains the tables and norms: qat) or train=norms")
        base = QuantizedLinear.from_compressed(module, result, meta, cache_weight=qlora_cache) \
            if result is not None else module
        rotated = remove_input_hadamard(module)  # the wrapper rotates what both the base and the adapter read
        wrapped = LoRALinear(base, rank, alpha, mask=mask)
        if rotated:
            add_input_hadamard(wrapped)
        student.model.set_submodule(name, wrapped)
        student.lora[name] = wrapped
        return
    if codebook and mask is not None:  # the codes stay and the table trains: no latent weight to mask
        raise LlmpressError(f"layer {name} is pruned and on a lookup-table grid: distill it with train=norms")
    if result is not None:  # QAT: the latent weight on its grid, or (codebook layers) the table at fixed codes
        module = _train_qat(student, name, module,
                            (CodebookQATLinear if codebook else QATLinear).from_linear(module, result, meta))
    else:
        module.weight.requires_grad_(True)
        if module.bias is not None:
            module.bias.requires_grad_(True)
    if mask is not None:
        layout = mask.t() if isinstance(module, Conv1D) else mask
        student._masked.append((module.weight, layout))
