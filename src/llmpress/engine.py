"""The sequential engine: compress a model one decoder block at a time.

Following GPTQ's and SparseGPT's layer-wise procedure (and llm-compressor's
sequential pipeline): capture the inputs of every block once, then for each
block in turn onload it to the compute device, let each recipe stage
collect the calibration statistics its method needs (forward hooks on the
block's linears), rewrite the weights with the method's pure function,
re-run the compressed block to produce the next block's inputs, and
offload it. Only one block's weights are ever on the compute device, so
device memory scales with one block plus the calibration activations.

Every rewritten linear gets its error against the weight it replaced
(``llmpress.measure.attribution``): with calibration inputs the relative
output error on the block's inputs, from one pass of the block before its
first stage (on all tokens when a Hessian-only first stage reuses its Grams,
else on the first ``ATTRIBUTION_TOKENS``), and each block the relative
change of its output; without inputs the relative weight error.

Capturing inputs, running a block and collecting statistics live in
``llmpress.calib``; methods are looked up in ``llmpress.registry`` by name,
so this module imports no method.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from .calib import (
    BlockInputs,
    SpillList,
    StopForward,
    block_prefix,
    capture_inputs,
    collect_stats,
    float_dtype,
    input_groups,
    move_to,
    tensor_spec,
)
from .compressed import Compressed
from .measure.attribution import RelativeError, relative_error, relative_output_error
from .models.archs import Arch, block_linears, get_blocks, linear_weight, set_linear_weight
from .progress import bar as progress_bar
from .recipe import Stage
from .registry import BlockPlan, get_method
from .settled import SettledOutputs

log = logging.getLogger(__name__)

# Calibration tokens the error attribution runs a block's reference pass on (whole batches, the first ones;
# all of them when the first stage reuses that pass's Grams, see _Attribution); None = every token.
ATTRIBUTION_TOKENS = 4096


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
                    compute_dtype: torch.dtype | None = None, block_records: dict[str, dict] | None = None,
                    attribute: bool = True, attribution_tokens: int | None = ATTRIBUTION_TOKENS,
                    start: int = 0, hidden: list[torch.Tensor] | None = None,
                    after_block: Callable[[int, nn.Module, list[torch.Tensor] | None], None] | None = None,
                    layers: dict[str, dict] | None = None,
                    originals: Callable[[int, str], torch.Tensor] | None = None,
                    spill: Path | None = None) -> dict[str, dict]:
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
    ``attribute``: record in each rewritten linear's meta its error against the weight it replaced
    (``output_error`` on the calibration inputs when there are ``samples``, even for a method that
    needs none, else ``weight_error``; see :class:`_Attribution`), measured on the first
    ``attribution_tokens`` calibration tokens (or all, see there); ``block_records``, when given,
    receives per block ("model.layers.0") ``{"output_error": ...}``, the relative change of its output.
    Resuming (``llmpress.stream``): blocks before ``start`` are skipped (never onloaded), ``hidden`` are the
    calibration activations entering block ``start`` (in place of the captured ones) and ``layers`` the records
    of the blocks done; ``after_block(i, block, hidden)`` is called once block i is final and ``hidden`` (the
    activations entering block i + 1, None without calibration) computed, while the block is still onloaded.
    ``originals(i, name)``, when given, reads linear ``name`` of block i as it was before any stage (float32,
    (out, in)) for its error, instead of a copy of every linear kept from the block's start (a streamed
    model re-reads it from the checkpoint: no second copy of the block in memory). ``spill``: a folder where
    each block's reference outputs (kept only for its output error) wait on disk instead of in memory, and on
    a CPU the calibration activations between passes (a 1B model's 128 x 512 in bfloat16: 268 MB); its files stay
    there, each block's written over the block before's (``calib.SpillList``), until the caller removes the folder.
    """
    device = torch.device(device)
    blocks = get_blocks(model, arch)
    home = next(blocks[0].parameters()).device
    placement = placement or Placement(device, home)
    methods = [get_method(s.method) for s in stages]
    calibrated = any(m.needs_inputs for m in methods)
    if calibrated and samples is None:
        raise ValueError("this recipe needs calibration samples")
    measured = attribute and samples is not None  # output errors on calibration inputs, wanted or not by a method
    if measured and not calibrated and attribution_tokens is not None:  # the inputs serve the errors alone
        samples = samples[:max(1, -(-attribution_tokens // samples.shape[1]))]
    inputs = (capture_inputs(model, blocks, samples, batch_size, device, compute_dtype) if calibrated or measured
              else None)
    if inputs is not None:
        inputs.kwargs = [{b: move_to(kw, device) for b, kw in per.items()} for per in inputs.kwargs]
        if hidden is not None:
            inputs.hidden = [h.to(device) for h in hidden]
        if spill is not None and device.type == "cpu":  # between passes the activations wait on disk too
            inputs.hidden = SpillList(spill / "hidden", inputs.hidden)

    prefix = block_prefix(model, blocks)
    layers = {} if layers is None else layers
    bar = progress_bar(total=len(blocks), enabled=progress, desc="blocks", unit="block", initial=start)
    for i, block in enumerate(blocks):
        if i < start:
            continue
        began = time.perf_counter()
        placement.onload(block)
        modules = block_linears(block, arch)
        settled = SettledOutputs(list(modules), len(inputs.hidden) if inputs is not None else 0,
                                 None if spill is None else _spill_lists(spill / "settled"))
        shadow = _Shadow(block, arch, compute_dtype, settled)
        attribution = None
        if attribute:
            attribution = _attribution(arch, modules, shadow, inputs, i, attribution_tokens, block_records is not None,
                                       [(s, m) for s, m in zip(stages, methods) if m.kind != "runtime"
                                        and any(s.applies_to(f"{prefix}{i}.{n}") for n in modules)],
                                       None if originals is None else (lambda name, i=i: originals(i, name)), spill)
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
                if attribution is not None:
                    attribution.smoothed = True
                for name, meta in done.items():
                    layers[f"{prefix}{i}.{name}"] = merge_meta(layers.get(f"{prefix}{i}.{name}"), meta)
                continue
            sequential = bool(method.stats) and getattr(stage.config, "true_sequential", False)
            parts = input_groups(arch, chosen) if sequential else [chosen]
            for j, part in enumerate(parts):
                stats = attribution.stats_for(method.stats, part) if attribution is not None else None
                if stats is None and not method.stats:
                    stats = {}
                elif stats is None:
                    calib, calib_modules = shadow.get()
                    later = {n for p in parts[j + 1:] for n in p}
                    recording = (settled.recording(calib, list(part), later, StopForward) if sequential
                                 else nullcontext())
                    with recording as child:
                        stats, _ = collect_stats(calib, arch, {n: calib_modules[n] for n in part}, method.stats,
                                                 inputs, i, stop_early=sequential, stop_after=child)
                for name, module in part.items():
                    full = f"{prefix}{i}.{name}"
                    W = linear_weight(module, arch).detach().float()
                    args = [stats[name][s] for s in method.stats]
                    result: Compressed = method.fn(W, *args, stage.config_for(full))
                    set_linear_weight(module, arch, result.weight)
                    meta = dict(result.record(), shape=list(W.shape))
                    if result.loss is not None:
                        meta["loss"] = result.loss
                    layers[full] = merge_meta(layers.get(full), meta)
                    if results is not None:
                        results[full] = _detached(result)
                    if attribution is not None:
                        attribution.rewritten.add(name)
                shadow.stale()
        if attribution is not None:
            for name, record in attribution.linear_errors(modules).items():
                layers[f"{prefix}{i}.{name}"].update(record)
        if on_block is not None:
            on_block(i, block, blocks)
        if inputs is not None and i + 1 < len(blocks):
            inputs.advance(shadow.get()[0], i)
        if attribution is not None and attribution.dense is not None and block_records is not None:
            outputs = inputs.hidden if i + 1 < len(blocks) else attribution.inputs.run(shadow.get()[0], i)
            block_records[f"{prefix}{i}"] = {"output_error": attribution.block_error(outputs)}
        log.debug("block %d: %d settled sub-module outputs reused", i, settled.hits)
        settled.clear()
        if after_block is not None:
            after_block(i, block, inputs.hidden if inputs is not None and i + 1 < len(blocks) else None)
        placement.offload(block)
        log.debug("block %d compressed in %.2fs", i, time.perf_counter() - began)
        bar.update(1)
    bar.close()
    return layers


def _spill_lists(folder: Path) -> Callable[[list], SpillList]:
    """A factory of :class:`~llmpress.calib.SpillList` in numbered sub-folders of ``folder``."""
    count = itertools.count()
    return lambda items: SpillList(folder / str(next(count)), items)


class _Shadow:
    """The block as calibration passes run it: itself, or a copy cast to ``compute_dtype``."""

    def __init__(self, block: nn.Module, arch: Arch, dtype: torch.dtype | None,
                 settled: SettledOutputs | None = None) -> None:
        self.block, self.arch, self.settled = block, arch, settled
        self.dtype = None if dtype == float_dtype(block) else dtype
        self.copy: tuple[nn.Module, dict[str, nn.Module]] | None = None
        self.version = 0  # how many times the real block's weights changed

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
        self.version += 1


def _attribution(arch: Arch, modules: dict[str, nn.Module], shadow: _Shadow, inputs: BlockInputs | None, index: int,
                 tokens: int | None, outputs: bool, applying: list[tuple[Stage, object]],
                 source: Callable[[str], torch.Tensor] | None = None, spill: Path | None = None) -> _Attribution | None:
    """Block ``index``'s :class:`_Attribution`, given the non-runtime stages ``applying`` to it (None without).

    Its reference pass runs on every calibration batch when the first stage collects only Hessians in one
    pass (and then reuses them: no extra cost), else on the first batches holding ``tokens`` tokens.
    """
    if not applying:
        return None
    stage, method = applying[0]
    reusable = (inputs is not None and method.kind in ("quantize", "prune") and tuple(method.stats) == ("hessian",)
                and not getattr(stage.config, "true_sequential", False))
    if inputs is not None and not reusable and tokens is not None:
        count, kept = 0, 0
        while kept < len(inputs.hidden) and count < tokens:
            count += math.prod(tensor_spec(inputs.hidden, kept)[0][:-1])
            kept += 1
        inputs = BlockInputs(inputs.hidden[:kept], inputs.kwargs)
    smoothing = any(m.kind == "block" for _, m in applying)
    return _Attribution(arch, modules, shadow, inputs, index, grams=not smoothing, outputs=outputs, reusable=reusable,
                        source=source, sink=None if spill is None or not outputs else SpillList(spill))


class _Attribution:
    """One block's reference before any stage, and each rewritten linear's error against it.

    Made before the block's first stage: a copy of its linear weights and, with calibration
    ``inputs``, one pass of the block as it is (the calibration copy) that keeps each linear's input
    Gram matrix (``hessian``: 2/n·XᵀX, its scale cancels in the ratio) and the block's outputs.
    A weight stage that needs only ``hessian`` while the block is still untouched gets these Grams
    (:meth:`stats_for`: the same accumulation on the same activations, so the weights come out
    identical) instead of a pass of its own (``reusable``): GPTQ and SparseGPT without true-sequential
    pay no extra pass. For any other first stage the reference pass costs one more forward of the
    block with Grams, so it runs on a sample: the first calibration batches holding
    ``ATTRIBUTION_TOKENS`` tokens (the windows are drawn at random), and the block error is taken on
    those batches too. A sampled pass keeps, per input, the rows themselves where they are fewer than the
    input's features, else their Gram (``llmpress.stats.ErrorInputStats``: the same error, in the smaller
    of the two).

    The error of a linear is of its final weight against its weight before the block's first stage,
    on the inputs of that block (the previous blocks already compressed). A block-level stage
    (AWQ, SmoothQuant) rescales linears' input channels and folds the inverse into the op feeding
    them: the final weight then works on other coordinates than the original, so such a block
    gets no per-linear errors (``smoothed``), only its block output error; its reference pass
    gathers no Grams (``grams=False``), and runs only when the block error is wanted (``outputs``).
    """

    def __init__(self, arch: Arch, modules: dict[str, nn.Module], shadow: _Shadow, inputs: BlockInputs | None,
                 index: int, grams: bool = True, outputs: bool = True, reusable: bool = False,
                 source: Callable[[str], torch.Tensor] | None = None, sink: SpillList | None = None) -> None:
        self.arch, self.shadow, self.inputs, self.reusable = arch, shadow, inputs, reusable
        self.calibrated = inputs is not None
        self.source = source
        self.originals = {} if source is not None else {n: linear_weight(m, arch).detach().float().clone()
                                                         for n, m in modules.items()}
        self.rewritten: set[str] = set()
        self.smoothed = False
        self.grams: dict[str, torch.Tensor] = {}
        self.dense: list[torch.Tensor] | SpillList | None = None
        if inputs is not None and (grams or outputs):
            calib, calib_modules = shadow.get()
            need = "hessian" if reusable else "error_inputs"  # a Hessian to hand over, else the cheaper of X, XᵀX
            stats, self.dense = collect_stats(calib, arch, calib_modules, (need,) if grams else (), inputs, index,
                                              sink=sink)
            self.grams = {n: s[need] for n, s in stats.items() if s.get(need) is not None}
            if sink is not None and not reusable:  # a streamed run: the rows or Grams wait on disk until the errors
                self.grams = _SpilledErrorInputs(self.grams, sink.folder / "grams")
        self.version = shadow.version

    def stats_for(self, needs: tuple[str, ...], part: dict[str, nn.Module]) -> dict[str, dict] | None:
        """The statistics ``needs`` of the linears in ``part`` from the reference pass, when that is what
        the stage's own pass would compute (only ``hessian``, block unchanged since); else None."""
        if not self.reusable or set(needs) != {"hessian"} or self.shadow.version != self.version:
            return None
        if not all(n in self.grams for n in part):
            return None
        return {n: {"hessian": self.grams[n]} for n in part}

    def linear_errors(self, modules: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
        """{relative name: {"output_error" | "weight_error": value}} for every rewritten linear."""
        if self.smoothed:
            return {}
        found = {}
        for name in sorted(self.rewritten):
            W = self.originals[name] if self.source is None else self.source(name)
            W_hat = linear_weight(modules[name], self.arch).detach()
            if W.shape != W_hat.shape:
                continue
            if self.calibrated:
                if name in self.grams:
                    found[name] = {"output_error": relative_output_error(W, W_hat, self.grams[name])}
            else:
                found[name] = {"weight_error": relative_error(W, W_hat)}
        return found

    def block_error(self, outputs: list[torch.Tensor]) -> float:
        """‖B̂(x) − B(x)‖² / ‖B(x)‖² over the calibration batches, B the block before its first stage."""
        total = RelativeError()
        for dense, compressed in zip(self.dense, outputs):
            total.add(dense, compressed)
        if isinstance(self.dense, SpillList):
            self.dense.clear()
        return total.result()


class _SpilledErrorInputs(dict):
    """{linear name: its error input} (``llmpress.stats.ErrorInputStats``: the input rows, or their Gram) with each
    distinct one (linears sharing an input share one) on disk, read back when looked up: a 8192-wide down_proj's
    rows are 64 MB, and a Gram of that width 268 MB, that need not sit in memory through the block's solves."""

    def __init__(self, grams: dict[str, torch.Tensor], folder: Path) -> None:
        distinct: dict[int, int] = {}
        self.kept = SpillList(folder)
        for name, gram in grams.items():
            if id(gram) not in distinct:
                distinct[id(gram)] = len(self.kept)
                self.kept.append(gram)
            super().__setitem__(name, distinct[id(gram)])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.kept[super().__getitem__(name)]

    def __del__(self) -> None:
        self.kept.clear()


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
