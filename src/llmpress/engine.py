"""The sequential engine: compress a model one decoder block at a time.

Following GPTQ's and SparseGPT's layer-wise procedure (and llm-compressor's
sequential pipeline): capture the inputs of every block once, then for each
block in turn onload it to the compute device, let each recipe stage
collect the calibration statistics its method needs (forward hooks on the
block's linears), rewrite the weights with the method's pure function,
re-run the compressed block to produce the next block's inputs, and
offload it. Only one block's weights are ever on the compute device, so
device memory scales with one block plus the calibration activations.

Per-block keyword arguments (attention masks, rotary embeddings) are
captured for every block, not just the first: Gemma 3 alternates sliding
and global attention, with different masks and rotary tables per layer.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .compressed import Compressed
from .models.archs import Arch, block_linears, get_blocks, input_representatives, linear_weight, set_linear_weight
from .recipe import Stage
from .registry import get_method
from .settled import SettledOutputs
from .stats import STATS

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised inside a block's forward to end input capture early."""


class Placement:
    """Moves a block onto the compute device and back; subclass to offload elsewhere."""

    def __init__(self, device: torch.device, offload_device: torch.device) -> None:
        self.device = device
        self.offload_device = offload_device

    def onload(self, block: nn.Module) -> None:
        block.to(self.device)

    def offload(self, block: nn.Module) -> None:
        block.to(self.offload_device)


@dataclass
class BlockInputs:
    """Calibration activations entering one block: hidden states per batch and the block's kwargs per batch size."""

    hidden: list[torch.Tensor]
    # per block: batch size -> (extra positional args, keyword args)
    kwargs: list[dict[int, tuple[tuple, dict[str, Any]]]] = field(default_factory=list)

    def batches(self, block_index: int, dtype: torch.dtype | None = None):
        """(hidden, (extra args, kwargs)) per batch, floating tensors cast to ``dtype`` when given."""
        cast: dict[int, tuple] = {}
        for h in self.hidden:
            size = h.shape[0]
            if size not in cast:
                extra, kw = self.kwargs[block_index][size]
                cast[size] = (extra, kw) if dtype is None else (_cast(extra, dtype), _cast(kw, dtype))
            yield (h if dtype is None else h.to(dtype)), cast[size]

    def run(self, block: nn.Module, block_index: int, stop: type[Exception] | None = None) -> list[torch.Tensor]:
        """The block's output for every batch, computed in the block's own dtype.

        ``stop``: an exception a hook raises to end a batch's forward early (no output then).
        """
        dtype = _float_dtype(block)
        outputs = []
        with torch.inference_mode():
            for h, (extra, kw) in self.batches(block_index, dtype):
                try:
                    outputs.append(_hidden(block(h, *extra, **kw)))
                except stop or ():
                    pass
        return outputs


def _float_dtype(block: nn.Module) -> torch.dtype:
    """The block's compute dtype: its first floating parameter's (W8A8 layers hold int8 weights)."""
    return next(p.dtype for p in block.parameters() if p.is_floating_point())


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _outside_leaves(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    inside = {id(m) for m in blocks.modules()}
    return [m for m in model.modules() if id(m) not in inside and not list(m.children())]


def capture_inputs(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor,
                   batch_size: int, device: torch.device) -> BlockInputs:
    """Run the model's embedding part on every calibration batch and record each block's inputs.

    Blocks are replaced by recorders that pass hidden states through unchanged,
    so the real blocks are never run (nor onloaded) here; the forward stops at
    the last block, before the final norm and lm_head.
    """
    leaves = _outside_leaves(model, blocks)
    homes = [next(iter(m.parameters(recurse=False)), next(iter(m.buffers(recurse=False)), None)) for m in leaves]
    homes = [t.device if t is not None else None for t in homes]
    for m in leaves:
        m.to(device)
    inputs = BlockInputs(hidden=[], kwargs=[{} for _ in blocks])
    state = {"need_kwargs": False}

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                inputs.hidden.append(hidden.detach())
            if state["need_kwargs"]:
                inputs.kwargs[index][hidden.shape[0]] = (tuple(args[1:]), dict(kwargs))
            if index == len(blocks) - 1 or not state["need_kwargs"]:
                raise _StopForward
            return hidden
        return forward

    try:
        for i, b in enumerate(blocks):
            b.forward = recorder(i)
        with torch.inference_mode():
            for start in range(0, samples.shape[0], batch_size):
                batch = samples[start:start + batch_size].to(device)
                state["need_kwargs"] = batch.shape[0] not in inputs.kwargs[0]
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)
        for m, home in zip(leaves, homes):
            if home is not None:
                m.to(home)
    return inputs


def _input_groups(arch: Arch, modules: dict[str, nn.Module]) -> list[dict[str, nn.Module]]:
    """``modules`` split into groups sharing one input, in forward order (true-sequential calibration)."""
    shared = input_representatives(arch, modules)
    groups: dict[str, dict[str, nn.Module]] = {}
    for name, module in modules.items():
        groups.setdefault(shared[name], {})[name] = module
    return list(groups.values())


def collect_stats(block: nn.Module, arch: Arch, modules: dict[str, nn.Module], needs: tuple[str, ...],
                  inputs: BlockInputs, index: int, stop_early: bool = False,
                  stop_after: nn.Module | None = None) -> tuple[dict[str, dict[str, Any]], list[torch.Tensor]]:
    """Run all calibration batches through ``block``; each module's input statistics, and the block's outputs.

    ``needs`` names entries of ``llmpress.stats.STATS``. Linears of one group share their input, so
    one hook per group feeds them all. With ``stop_early`` (one input group) each batch's forward
    ends as soon as the group's input is seen (and no outputs come back); with ``stop_after``, as
    soon as that sub-module has returned instead.
    """
    shared = input_representatives(arch, modules)
    stats = {rep: {s: STATS[s]() for s in needs} for rep in set(shared.values())}

    def hook(name: str):
        def fn(_module, args):
            for acc in stats[name].values():
                acc.add_batch(args[0])
            if stop_early and stop_after is None:
                raise _StopForward
        return fn

    def stop(*_):
        raise _StopForward

    handles = [modules[rep].register_forward_pre_hook(hook(rep)) for rep in stats]
    if stop_early and stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        outputs = inputs.run(block, index, stop=_StopForward if stop_early else None)
    finally:
        for h in handles:
            h.remove()
    results = {rep: {s: acc.result() for s, acc in per.items()} for rep, per in stats.items()}
    return {n: results[rep] for n, rep in shared.items()}, outputs


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
        inputs.kwargs = [{b: _move(kw, device) for b, kw in per.items()} for per in inputs.kwargs]
        if compute_dtype is not None:
            inputs.hidden = [h.to(compute_dtype) for h in inputs.hidden]

    prefix = _prefix(model, blocks)
    layers: dict[str, dict] = {}
    bar = _progress(len(blocks), progress)
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
                done = method.fn(block, arch, chosen, lambda: inputs.run(block, i), stage.config)
                shadow.stale()
                for name, meta in done.items():
                    layers[f"{prefix}{i}.{name}"] = merge_meta(layers.get(f"{prefix}{i}.{name}"), meta)
                continue
            sequential = bool(method.stats) and getattr(stage.config, "true_sequential", False)
            parts = _input_groups(arch, chosen) if sequential else [chosen]
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
                    meta = dict(result.meta, shape=list(W.shape))
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
        self.dtype = None if dtype == _float_dtype(block) else dtype
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


def _prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is blocks:
            return f"{name}."
    raise RuntimeError("block list not found in model")


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="blocks", unit="block", disable=not enabled, leave=False)
