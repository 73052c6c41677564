"""Calibration: capture the inputs of every decoder block, run blocks on them, collect named statistics.

The bottom layer of everything that runs calibration data through a model (GPTQ's and SparseGPT's
layer-wise procedure, llm-compressor's sequential pipeline): the engine's compression loop, OWL's
outlier pass, low-rank statistics and the structured-pruning passes all use :func:`capture_inputs`,
:class:`BlockInputs` and :func:`collect_stats` here, and read-only passes walk the blocks with the one
iterator :func:`run_blocks`. The statistics themselves are the accumulators of ``llmpress.stats``,
by name (``STATS``). Imports only models, stats and primitives-level modules, never a method.

Per-block keyword arguments (attention masks, rotary embeddings) are captured for every block, not
just the first: Gemma 3 alternates sliding and global attention, with different masks and rotary
tables per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models.archs import Arch, block_linears, get_blocks, input_representatives
from .progress import bar
from .stats import STATS


def calibration_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of calibration forward passes; "auto" picks bfloat16 where the hardware has it natively."""
    if name == "auto":
        if device.type == "cuda":
            fast = torch.cuda.is_bf16_supported()
        else:  # oneDNN's check for native bf16 (AVX512-BF16 / AMX)
            fast = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if fast else torch.float32
    return getattr(torch, name)


def block_prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    """The dotted name of the block list inside ``model``, with a trailing dot ("model.layers.")."""
    for name, module in model.named_modules():
        if module is blocks:
            return f"{name}."
    raise RuntimeError("block list not found in model")


class StopForward(Exception):
    """Raised inside a block's forward to end input capture early."""


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

    def run(self, block: nn.Module, block_index: int, stop: type[Exception] | None = None,
            sink: list | SpillList | None = None) -> list[torch.Tensor] | SpillList:
        """The block's output for every batch, computed in the block's own dtype.

        ``stop``: an exception a hook raises to end a batch's forward early (no output then).
        ``sink``: where the outputs go (e.g. a :class:`SpillList`, to keep them out of memory); a new list by default.
        """
        dtype = float_dtype(block)
        outputs = [] if sink is None else sink
        caught: tuple[type[Exception], ...] = () if stop is None else (stop,)  # () catches nothing
        with torch.inference_mode():
            for h, (extra, kw) in self.batches(block_index, dtype):
                try:
                    outputs.append(hidden_of(block(h, *extra, **kw)))
                except caught:
                    pass
        return outputs


    def advance(self, block: nn.Module, block_index: int) -> None:
        """Replace every batch's hidden states by the block's output, batch by batch (one batch of extra memory,
        not a second copy of all of them, as ``self.hidden = self.run(...)`` holds)."""
        dtype = float_dtype(block)
        with torch.inference_mode():
            for j, (h, (extra, kw)) in enumerate(self.batches(block_index, dtype)):
                output = hidden_of(block(h, *extra, **kw))
                del h
                self.hidden[j] = output


class SpillList:
    """A list whose tensor items wait on disk (raw bytes, one file each, read back on every access); other items
    (None, tuples) stay in memory. What a streamed run's block passes keep for later goes here (``llmpress.engine``):
    a block's reference outputs, kept only to compare with the compressed block's; the settled sub-module records;
    the reference Grams: an 8192-wide MLP input over 128 windows of 512 tokens is 1 GB, which then sits in the
    kernel's page cache (reclaimable, not the process's memory) instead of the heap. Files are read into a fresh
    tensor with ``readinto`` (no memory map, so no file pages held by the process; only bytes, nothing that runs).

    :meth:`clear` forgets the items but keeps their files, and a list made again on the same folder (the next
    block's) writes over them in place: rewriting pages the page cache holds already is about 5 times faster here
    than filling fresh ones (3.4 GB a block for a 1B model's true-sequential GPTQ: 1.5 s instead of 9 s).
    :meth:`discard` removes the files."""

    def __init__(self, folder: Path, items: list | None = None) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.items: list = []
        for item in items or []:
            self.append(item)

    def _path(self, k: int) -> Path:
        return self.folder / f"{k}.bin"

    def _put(self, k: int, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            path = self._path(k)
            with open(path, "r+b" if path.exists() else "wb") as f:  # in place: see the class docstring
                f.write(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
                f.truncate()
            return _Spilled(tuple(value.shape), value.dtype, value.device)
        return value  # kept in memory; a file left from an earlier item stays, to be written over

    def append(self, value: Any) -> None:
        self.items.append(None)
        self.items[-1] = self._put(len(self.items) - 1, value)

    def __setitem__(self, k: int, value: Any) -> None:
        self.items[k] = self._put(k, value)

    def __getitem__(self, k: int | slice) -> Any:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self.items)))]
        item = self.items[k]
        if not isinstance(item, _Spilled):
            return item
        t = torch.empty(item.shape, dtype=item.dtype)
        if t.numel():
            with open(self._path(k), "rb") as f:
                f.readinto(t.reshape(-1).view(torch.uint8).numpy())
        return t.to(item.device)

    def __len__(self) -> int:
        return len(self.items)

    def spec(self, k: int) -> tuple[tuple[int, ...], torch.dtype]:
        """Item k's (shape, dtype), without reading it back."""
        item = self.items[k]
        return (item.shape, item.dtype) if isinstance(item, _Spilled) else (tuple(item.shape), item.dtype)

    def __iter__(self) -> Iterator[Any]:
        return (self[k] for k in range(len(self.items)))

    def __bool__(self) -> bool:
        return bool(self.items)

    def clear(self) -> None:
        """Forget every item; their files stay, for a list on this folder to write over."""
        self.items.clear()

    def discard(self) -> None:
        """Forget every item and remove the files."""
        for path in self.folder.glob("*.bin"):
            path.unlink(missing_ok=True)
        self.items.clear()


@dataclass(frozen=True)
class _Spilled:
    """Where a :class:`SpillList` item's tensor went: its shape, dtype and device (the bytes are in its file)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def tensor_spec(tensors: list[torch.Tensor] | SpillList, k: int) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of ``tensors[k]``, read back from disk for neither a list nor a :class:`SpillList`."""
    if isinstance(tensors, SpillList):
        return tensors.spec(k)
    return tuple(tensors[k].shape), tensors[k].dtype


def float_dtype(block: nn.Module) -> torch.dtype:
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


def move_to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move_to(v, device) for v in value)
    if isinstance(value, list):
        return [move_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


def hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _outside_leaves(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    inside = {id(m) for m in blocks.modules()}
    return [m for m in model.modules() if id(m) not in inside and not list(m.children())]


def capture_inputs(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor,
                   batch_size: int, device: torch.device, dtype: torch.dtype | None = None) -> BlockInputs:
    """Run the model's embedding part on every calibration batch and record each block's inputs.

    Blocks are replaced by recorders that pass hidden states through unchanged,
    so the real blocks are never run (nor onloaded) here; the forward stops at
    the last block, before the final norm and lm_head. ``dtype``: the hidden states are kept in it, cast batch
    by batch (never all of them in the model's dtype first: a 1B model's 128 x 512 in float32 is 537 MB).
    """
    leaves = [m for m in _outside_leaves(model, blocks)  # a streamed model's head, norm: on meta, never run here
              if not any(t.is_meta for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])]
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
                inputs.hidden.append(hidden.detach() if dtype is None else hidden.detach().to(dtype))
            if state["need_kwargs"]:
                inputs.kwargs[index][hidden.shape[0]] = (tuple(args[1:]), dict(kwargs))
            if index == len(blocks) - 1 or not state["need_kwargs"]:
                raise StopForward
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
                except StopForward:
                    pass
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)
        for m, home in zip(leaves, homes):
            if home is not None:
                m.to(home)
    return inputs


def input_groups(arch: Arch, modules: dict[str, nn.Module]) -> list[dict[str, nn.Module]]:
    """``modules`` split into groups sharing one input, in forward order (true-sequential calibration)."""
    shared = input_representatives(arch, modules)
    groups: dict[str, dict[str, nn.Module]] = {}
    for name, module in modules.items():
        groups.setdefault(shared[name], {})[name] = module
    return list(groups.values())


def collect_stats(block: nn.Module, arch: Arch, modules: dict[str, nn.Module], needs: tuple[str, ...],
                  inputs: BlockInputs, index: int, stop_early: bool = False,
                  stop_after: nn.Module | None = None,
                  sink: SpillList | None = None) -> tuple[dict[str, dict[str, Any]], list[torch.Tensor] | SpillList]:
    """Run all calibration batches through ``block``; each module's input statistics, and the block's outputs.

    ``needs`` names entries of ``llmpress.stats.STATS``. Linears of one group share their input, so
    one hook per group feeds them all. With ``stop_early`` (one input group) each batch's forward
    ends as soon as the group's input is seen (and no outputs come back); with ``stop_after``, as
    soon as that sub-module has returned instead. ``sink``: where the block's outputs go (``BlockInputs.run``).
    """
    shared = input_representatives(arch, modules)
    stats = {rep: {s: STATS[s]() for s in needs} for rep in set(shared.values())}

    def hook(name: str):
        def fn(_module, args):
            for acc in stats[name].values():
                acc.add_batch(args[0])
            if stop_early and stop_after is None:
                raise StopForward
        return fn

    def stop(*_):
        raise StopForward

    handles = [modules[rep].register_forward_pre_hook(hook(rep)) for rep in stats]
    if stop_early and stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        outputs = inputs.run(block, index, stop=StopForward if stop_early else None, sink=sink)
    finally:
        for h in handles:
            h.remove()
    results = {rep: {s: acc.result() for s, acc in per.items()} for rep, per in stats.items()}
    return {n: results[rep] for n, rep in shared.items()}, outputs


def captured_inputs(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor, batch_size: int,
                    device: torch.device) -> BlockInputs:
    """:func:`capture_inputs` with every block's keyword arguments already on ``device``."""
    inputs = capture_inputs(model, blocks, samples, batch_size, device)
    inputs.kwargs = [{b: move_to(kw, device) for b, kw in per.items()} for per in inputs.kwargs]
    return inputs


def run_blocks(model: nn.Module, arch: Arch, samples: torch.Tensor, device: torch.device, batch_size: int,
               progress: bool = False, desc: str = "blocks",
               hook: Callable[[int, nn.Module], list] | None = None) -> Iterator[tuple[int, list, list]]:
    """Run ``samples`` through the blocks one at a time on ``device``; yields (i, inputs, outputs) per block.

    Each block's inputs are the previous block's outputs (of the block as it is when the caller resumes
    the iteration); a block visits ``device`` only for its own forward. ``hook(i, block)`` registers hooks
    for block i's forward and returns their handles, removed after it.
    """
    blocks = get_blocks(model, arch)
    inputs = captured_inputs(model, blocks, samples, batch_size, device)
    for i, block in enumerate(bar(blocks, progress, desc)):
        home = next(block.parameters()).device
        block.to(device)
        handles = hook(i, block) if hook is not None else []
        try:
            outputs = inputs.run(block, i)
        finally:
            for h in handles:
                h.remove()
            block.to(home)
        yield i, inputs.hidden, outputs
        inputs.hidden = outputs


def block_stats(model: nn.Module, arch: Arch, samples: torch.Tensor, needs: tuple[str, ...], device: torch.device,
                batch_size: int, progress: bool = False,
                desc: str = "statistics") -> Iterator[tuple[int, nn.Module, dict[str, dict[str, Any]]]]:
    """(i, block, {linear name: {statistic: result}}) per block, the ``needs`` (names in ``STATS``) of each
    block linear's input, from the model as it is (a read-only pass: :func:`run_blocks`). Linears that
    share an input share one accumulation (the same tensors)."""
    current: dict[str, Any] = {}

    def hook(_i: int, block: nn.Module) -> list:
        modules = block_linears(block, arch)
        shared = input_representatives(arch, modules)
        accs = {rep: {s: STATS[s]() for s in needs} for rep in set(shared.values())}
        current.update(block=block, shared=shared, accs=accs)
        return [modules[rep].register_forward_pre_hook(lambda _m, args, per=per: _add(per, args[0]))
                for rep, per in accs.items()]

    for i, _inputs, _outputs in run_blocks(model, arch, samples, device, batch_size, progress, desc, hook):
        results = {rep: {s: acc.result() for s, acc in per.items()} for rep, per in current["accs"].items()}
        yield i, current["block"], {n: results[rep] for n, rep in current["shared"].items()}


def _add(accumulators: dict, x: torch.Tensor) -> None:
    for acc in accumulators.values():
        acc.add_batch(x)
