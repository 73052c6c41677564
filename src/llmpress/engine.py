"""The sequential engine: compress a model one decoder block at a time.

Following GPTQ's and SparseGPT's layer-wise procedure (and llm-compressor's
sequential pipeline): capture the inputs of every block once, then for each
block in turn onload it to the compute device, let each recipe stage
collect the calibration statistics its method needs (forward hooks on the
block's linears), rewrite the weights with the method's pure function,
re-run the compressed block to produce the next block's inputs, and
offload it. Only one block's weights are ever on the compute device, so
device memory scales with one block plus the calibration activations.

Capturing inputs, running a block and collecting statistics live in
``llmpress.calib``; methods are looked up in ``llmpress.registry`` by name,
so this module imports no method.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from .calib import block_prefix, capture_inputs, collect_stats, float_dtype, input_groups, move_to
from .compressed import Compressed
from .models.archs import Arch, block_linears, get_blocks, linear_weight, set_linear_weight
from .progress import bar as progress_bar
from .recipe import Stage
from .registry import BlockPlan, get_method
from .settled import SettledOutputs

log = logging.getLogger(__name__)


class Placement:
    """Moves a block onto the compute device and back; subclass to offload elsewhere."""

    def __init__(self, device: torch.device, offload_device: torch.device) -> None:
        self.device = device
        self.offload_device = offload_device

    def onload(self, block: nn.Module) -> None:
        block.to(self.device)

    def offload(self, block: nn.Module) -> None:
        block.to(self.offload_device)


def merge_meta(old: dict | None, new: dict) -> dict:
    """One layer's record after a further stage: fields updated, methods chained ("sparsegpt+gptq"),
    an earlier sparsity kept."""
    if not old:
        return dict(new)
    merged = {**old, **new}
    if old.get("method") and new.get("method"):
        merged["method"] = f"{old['method']}+{new['method']}"
    if "sparsity" in old:
        merged["sparsity"] = old["sparsity"]
    return merged


def compress_blocks(model: nn.Module, arch: Arch, stages: list[Stage], samples: torch.Tensor | None,
                    device: torch.device | str = "cpu", batch_size: int = 8,
                    placement: Placement | None = None, progress: bool = False,
                    on_block: Callable[[int, nn.Module, nn.ModuleList], None] | None = None,
                    results: dict[str, Compressed] | None = None,
                    compute_dtype: torch.dtype | None = None) -> dict[str, dict]:
    """Apply ``stages`` to every linear in every block, block by block; returns per-layer metadata.

    ``samples`` (n, L) token ids are needed when a stage's method uses calibration inputs.
    ``on_block(i, block, blocks)`` is called after block i is compressed, while it is onloaded.
    ``results``, when given, receives each layer's last :class:`Compressed` (codes, scales, mask;
    on CPU, without the dense weight) for export.
    A method of kind "block" (smoothing: AWQ, SmoothQuant) is called as
    ``fn(block, arch, modules, run, config) -> {name: meta}``, where ``run()`` passes the
    calibration inputs through the block so that its own hooks can observe them.
    ``compute_dtype`` (e.g. bfloat16, several times faster on CPUs with AMX): calibration
    activations are kept, and statistics passes and the propagation to the next block are
    run, in this dtype on a copy of the block; the weights themselves are always rewritten in
    their own dtype (fp32) and block-level methods see the block in that dtype.
    """
    device = torch.device(device)
    blocks = get_blocks(model, arch)
    home = next(blocks[0].parameters()).device
    placement = placement or Placement(device, home)
    methods = [get_method(s.method) for s in stages]
    calibrated = any(m.needs_inputs for m in methods)
    if calibrated and samples is None:
        raise ValueError("this recipe needs calibration samples")
    inputs = capture_inputs(model, blocks, samples, batch_size, device) if calibrated else None
    if inputs is not None:
        inputs.kwargs = [{b: move_to(kw, device) for b, kw in per.items()} for per in inputs.kwargs]
        if compute_dtype is not None:
            inputs.hidden = [h.to(compute_dtype) for h in inputs.hidden]

    prefix = block_prefix(model, blocks)
    layers: dict[str, dict] = {}
    bar = progress_bar(total=len(blocks), enabled=progress, desc="blocks", unit="block")
    for i, block in enumerate(blocks):
        start = time.perf_counter()
        placement.onload(block)
        modules = block_linears(block, arch)
        settled = SettledOutputs(list(modules), len(inputs.hidden) if inputs is not None else 0)
        shadow = _Shadow(block, arch, compute_dtype, settled)
        for stage, method in zip(stages, methods):
            settled.clear()
            chosen = {n: m for n, m in modules.items() if stage.applies_to(f"{prefix}{i}.{n}")}
            if not chosen:
                continue
            if method.kind == "runtime":  # e.g. KV-cache quantization: applied at inference, not to weights
                continue
            if method.kind == "block":
                done = method.fn(block, arch, chosen, lambda block=block, i=i: inputs.run(block, i), stage.config)
                shadow.stale()
                for name, meta in done.items():
                    layers[f"{prefix}{i}.{name}"] = merge_meta(layers.get(f"{prefix}{i}.{name}"), meta)
                continue
            sequential = bool(method.stats) and getattr(stage.config, "true_sequential", False)
            parts = input_groups(arch, chosen) if sequential else [chosen]
            for j, part in enumerate(parts):
                stats = {}
                if method.stats:
                    calib, calib_modules = shadow.get()
                    later = {n for p in parts[j + 1:] for n in p}
                    recording = settled.recording(calib, list(part), later) if sequential else nullcontext()
                    with recording as child:
                        stats, _ = collect_stats(calib, arch, {n: calib_modules[n] for n in part}, method.stats,
                                                 inputs, i, stop_early=sequential, stop_after=child)
                for name, module in part.items():
                    full = f"{prefix}{i}.{name}"
                    W = linear_weight(module, arch).detach().float()
                    args = [stats[name][s] for s in method.stats]
                    result: Compressed = method.fn(W, *args, stage.config)
                    set_linear_weight(module, arch, result.weight)
                    meta = dict(result.record(), shape=list(W.shape))
                    if result.loss is not None:
                        meta["loss"] = result.loss
                    layers[full] = merge_meta(layers.get(full), meta)
                    if results is not None:
                        results[full] = _detached(result)
                shadow.stale()
        if on_block is not None:
            on_block(i, block, blocks)
        if inputs is not None and i + 1 < len(blocks):
            inputs.hidden = inputs.run(shadow.get()[0], i)
        log.debug("block %d: %d settled sub-module outputs reused", i, settled.hits)
        settled.clear()
        placement.offload(block)
        log.debug("block %d compressed in %.2fs", i, time.perf_counter() - start)
        bar.update(1)
    bar.close()
    return layers


class _Shadow:
    """The block as calibration passes run it: itself, or a copy cast to ``compute_dtype``."""

    def __init__(self, block: nn.Module, arch: Arch, dtype: torch.dtype | None,
                 settled: SettledOutputs | None = None) -> None:
        self.block, self.arch, self.settled = block, arch, settled
        self.dtype = None if dtype == float_dtype(block) else dtype
        self.copy: tuple[nn.Module, dict[str, nn.Module]] | None = None

    def get(self) -> tuple[nn.Module, dict[str, nn.Module]]:
        if self.dtype is None:
            self.copy = (self.block, block_linears(self.block, self.arch))
        elif self.copy is None:
            clone = copy.deepcopy(self.block).to(self.dtype)
            self.copy = (clone, block_linears(clone, self.arch))
        if self.settled is not None:
            self.settled.install(self.copy[0])
        return self.copy

    def stale(self) -> None:
        """The real block's weights changed: the next get() makes a fresh copy."""
        self.copy = None


def _detached(result: Compressed) -> Compressed:
    def cpu(t):
        return None if t is None else t.detach().cpu()

    return dataclasses.replace(result, weight=None, qweight=cpu(result.qweight), scale=cpu(result.scale),
                               zero=cpu(result.zero), mask=cpu(result.mask))


def run_plan(model: nn.Module, arch: Arch, plan: BlockPlan, samples: torch.Tensor | None, **kw) -> dict[str, dict]:
    """Execute a "plan" method's :class:`~llmpress.registry.BlockPlan`: block i gets its own steps (weight
    methods with their configs) through :func:`compress_blocks`; ``kw`` as there. Returns per-layer meta,
    each with the plan's per-block meta merged in and its method name prefixed."""
    blocks = get_blocks(model, arch)
    prefix = block_prefix(model, blocks)
    stages = [Stage(method, config, targets=(f"{prefix}{i}.*",))
              for i, steps in enumerate(plan.steps) for method, config in steps]
    layers = compress_blocks(model, arch, stages, samples, **kw)
    for name, meta in layers.items():
        block = int(name[len(prefix):].split(".")[0])
        meta.update(plan.meta[block] if plan.meta else {}, method=f"{plan.prefix}{meta['method']}")
    return layers
