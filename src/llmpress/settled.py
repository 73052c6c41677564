"""Skip recomputing settled sub-modules across true-sequential calibration passes.

True-sequential GPTQ (``llmpress.engine``) runs a block's calibration batches once per
input group: q/k/v, then o, then gate/up, then down, then once more to make the next
block's inputs. Without help the attention is computed four times per block. But once
the last linear ``L`` of a child ``S`` of the block has been quantized (``self_attn.o_proj``,
``mlp.down_proj``), and no linear of ``S`` changes afterwards, ``S``'s output for a batch
is just ``L(X_L)``: ``L``'s input ``X_L`` is fixed, because everything in ``S`` before ``L``
is settled and ``S``'s own input does not change. So the pass that gathers ``L``'s
statistics also records, per batch, ``S``'s input, ``X_L`` and the rest of ``S``'s output;
the first later pass calls ``L`` on ``X_L`` instead of running ``S`` and keeps that output, which the
passes after it reuse (``L`` is quantized by then and does not change again in the stage).

Checked, not assumed: the recording pass verifies on its first batch that ``S`` returns exactly
``L``'s output (first element of a tuple output, the rest None); its later batches then end at
``L``'s input (``L`` is about to be quantized: its output there would be thrown away). Every reuse
verifies that ``S``'s input equals the recorded one (bitwise), falling back to the real forward
otherwise. The block's children
without linears (its norms) are memoized the same way: a batch's output is reused while its
input is bitwise unchanged. The weights come out bit-identical to recomputing (tested on
every tiny architecture). Memory: the recorded tensors (and ``L``'s kept outputs) for every
calibration batch, while one block is processed; a streamed run keeps them on disk (``calib.SpillList``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class _Record:
    child: str  # S, a direct child of the block
    last: str  # L, relative to the block
    inputs: list[torch.Tensor] = field(default_factory=list)
    last_inputs: list[torch.Tensor] = field(default_factory=list)
    rest: list[Any] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)  # L's output per batch, once computed with L settled
    valid: bool = True
    calls: int = 0
    hits: int = 0


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality; on CPU through numpy, many times faster than ``torch.equal`` there."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device.type != "cpu" or b.device.type != "cpu" or not (a.is_contiguous() and b.is_contiguous()):
        return torch.equal(a, b)
    as_int = _INT_OF_SIZE[a.element_size()]
    return bool(np.array_equal(a.view(as_int).numpy(), b.view(as_int).numpy()))


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


class SettledOutputs:
    """Per block: which children are settled, their recorded inputs, and forward overrides.

    ``linears``: every linear name of the block (relative to it). ``later``: for each name,
    whether a later group of the current stage will still change it.
    """

    def __init__(self, linears: list[str], batches: int = 0,
                 new_list: Callable[[list], Any] | None = None) -> None:
        self.linears = linears
        self.batches = batches  # calibration batches per pass; 0 = no memoized norms
        # where recorded tensors are kept: a plain list, or e.g. ``calib.SpillList`` (on disk) for a streamed run
        self.new_list = new_list or list
        self.records: list[_Record] = []
        self.memos: dict[str, _Record] = {}
        self.installed: list[nn.Module] = []

    def candidate(self, part: list[str], later: set[str]) -> tuple[str, str] | None:
        """(S, L) when ``part`` is one linear L, the last of its child S to change in this stage."""
        if len(part) != 1 or "." not in part[0]:
            return None
        child = part[0].split(".", 1)[0]
        inside = [n for n in self.linears if n.startswith(child + ".")]
        if any(n in later for n in inside):
            return None
        return child, part[0]

    @contextmanager
    def recording(self, block: nn.Module, part: list[str], later: set[str],
                  stop: type[Exception] | None = None) -> Iterator[nn.Module | None]:
        """Record S during the statistics pass of ``part``; yields S (the pass may stop after it) or None.

        ``stop``: the exception that ends a batch's forward early (``llmpress.calib.StopForward``). With it, once
        the first batch has shown S's output to be L's (and nothing else but Nones), later batches end at L's
        input, after the pass's own hooks on L have seen it: L (not yet quantized) is not computed for nothing.
        """
        pair = self.candidate(part, later)
        if pair is None:
            yield None
            return
        record = _Record(*pair, inputs=self.new_list([]), last_inputs=self.new_list([]))
        child, last = block.get_submodule(record.child), block.get_submodule(record.last)
        seen: dict[str, Any] = {}
        handles = []

        def on_child_input(_m, args, kwargs):
            x = _first_tensor(args, kwargs)
            record.valid &= x is not None
            record.inputs.append(x)
            if len(handles) == 3:  # registered now, so it runs after the statistics pass's own hooks on L
                handles.append(last.register_forward_pre_hook(on_last_input))

        def on_last_input(_m, args):
            record.last_inputs.append(args[0])
            if "rest" in seen and len(record.last_inputs) == len(record.inputs):  # a later batch, structure known
                record.rest.append(seen["rest"])
                raise stop

        def on_last(_m, args, output):
            seen["out"] = output

        def on_child_output(_m, _args, output):
            first = output[0] if isinstance(output, tuple) else output
            out = seen.pop("out", None)
            record.valid &= out is not None and (first is out or same(first, out))
            rest = output[1:] if isinstance(output, tuple) else None
            record.rest.append(rest)
            if stop is not None and len(record.inputs) == 1 and record.valid and (
                    rest is None or all(r is None for r in rest)):
                seen["rest"] = rest

        handles += [child.register_forward_pre_hook(on_child_input, with_kwargs=True),
                    last.register_forward_hook(on_last), child.register_forward_hook(on_child_output)]
        try:
            yield child
        finally:
            for h in handles:
                h.remove()
        if record.valid and record.inputs and len(record.inputs) == len(record.last_inputs) == len(record.rest):
            record.outputs = self.new_list([None] * len(record.inputs))
            self.records.append(record)

    def install(self, block: nn.Module) -> None:
        """Override the forward of every recorded child of ``block`` (a fresh calibration copy, or the block)."""
        for record in self.records:
            child = block.get_submodule(record.child)
            relative = record.last.split(".", 1)[1]
            child.forward = self._override(record, child, relative)
            self.installed.append(child)
        if not self.batches:
            return
        for name, child in block.named_children():
            if "forward" in child.__dict__ or any(n.startswith(name + ".") for n in self.linears):
                continue
            if name not in self.memos:
                self.memos[name] = _Record(name, "", inputs=self.new_list([None] * self.batches),
                                           rest=self.new_list([None] * self.batches))
            memo = self.memos[name]
            child.forward = self._memoized(memo, child)
            self.installed.append(child)

    @staticmethod
    def _memoized(memo: _Record, child: nn.Module):
        original = type(child).forward

        def forward(*args, **kwargs):
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                return original(child, *args, **kwargs)
            k = memo.calls % len(memo.inputs)
            memo.calls += 1
            x, seen = args[0], memo.inputs[k]
            if seen is not None and (seen is x or same(seen, x)):
                memo.hits += 1
                return memo.rest[k]
            memo.inputs[k], memo.rest[k] = x, original(child, x)
            return memo.rest[k]

        return forward

    @staticmethod
    def _override(record: _Record, child: nn.Module, relative: str):
        original = type(child).forward

        def forward(*args, **kwargs):
            k = record.calls % len(record.inputs)
            record.calls += 1
            x = _first_tensor(args, kwargs)
            want = record.inputs[k]
            if x is None or not (x is want or same(x, want)):
                return original(child, *args, **kwargs)
            record.hits += 1
            y = record.outputs[k]
            if y is None:  # L is settled (quantized, not to change in this stage): its output is computed once
                y = record.outputs[k] = child.get_submodule(relative)(record.last_inputs[k])
            return y if record.rest[k] is None else (y, *record.rest[k])

        return forward

    def clear(self) -> None:
        """Forget the records and remove the overrides (end of a stage or block)."""
        for child in self.installed:
            child.__dict__.pop("forward", None)
        self.installed.clear()
        for record in [*self.records, *self.memos.values()]:
            for kept in (record.inputs, record.last_inputs, record.rest, record.outputs):
                kept.clear()  # a SpillList keeps its files for the next list on its folder to write over
        self.records.clear()
        self.memos.clear()

    @property
    def hits(self) -> int:
        """How many child forwards were skipped (settled sub-modules and memoized norms)."""
        return sum(r.hits for r in self.records) + sum(m.hits for m in self.memos.values())
