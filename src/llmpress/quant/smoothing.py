"""Fold per-input-channel scales through the op that feeds a group of linears.

AWQ (Lin et al. 2023, arXiv:2306.00978) and SmoothQuant (Xiao et al. 2022,
arXiv:2211.10438) both rewrite ``y = W x`` as ``y = (W diag(s)) (x / s)``:
the consumers' input columns are multiplied by ``s`` and the op that makes
``x`` (a norm, or a linear whose output feeds the consumers only) divides
its output channels by ``s``, so the block computes the same function.
``arch.feeds`` lists where this is exact. This module holds the block-level
plumbing shared by those methods: the fold itself, the choice of feeds a
stage may fold, and a bounded random token sample of each group's input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..models.archs import Arch, input_representatives, linear_weight, set_linear_weight
from ..rotate.online import has_input_hadamard

Feed = tuple[str, tuple[str, ...]]


def foldable_feeds(arch: Arch, selected: dict[str, nn.Module] | set[str]) -> list[Feed]:
    """The feeds of ``arch`` (in block order) whose consumers are all among ``selected``; given modules, not those
    into a linear that rotates its input online (``rotate(online=true)``): no per-channel scale passes a Hadamard."""
    def rotated(consumers) -> bool:
        return isinstance(selected, dict) and any(has_input_hadamard(selected[name]) for name in consumers)

    return [(source, tuple(consumers)) for source, consumers in arch.feeds
            if all(name in selected for name in consumers) and not rotated(consumers)]


def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 for half-precision parameters, their own dtype for fp32/fp64."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_scales(scales: Tensor, channels: int, where: str) -> Tensor:
    s = scales.detach().reshape(-1)
    if s.numel() != channels:
        raise ValueError(f"{where}: {s.numel()} scales for {channels} channels")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"{where}: scales must be finite and positive")
    return s


@torch.no_grad()
def _divide_norm(norm: nn.Module, scales: Tensor, offset: float, name: str) -> None:
    """A norm computing ``normed * (offset + w) + b``: w' = (offset + w) / s - offset, b' = b / s."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"source '{name}' ({type(norm).__name__}) has no weight to fold scales into")
    dtype = _compute_dtype(weight)
    s = _check_scales(scales, weight.numel(), f"source '{name}'").to(weight.device, dtype)
    weight.copy_((offset + weight.to(dtype)) / s - offset)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, Tensor):
        bias.copy_(bias.to(dtype) / s)


@torch.no_grad()
def _divide_linear_rows(linear: nn.Module, arch: Arch, scales: Tensor, name: str) -> None:
    """A linear source: output row j (and bias j) divided by s_j."""
    W = linear_weight(linear, arch)
    dtype = _compute_dtype(W)
    s = _check_scales(scales, W.shape[0], f"source '{name}'").to(W.device, dtype)
    set_linear_weight(linear, arch, W.to(dtype) / s[:, None])
    if isinstance(linear.bias, Tensor):
        linear.bias.copy_(linear.bias.to(dtype) / s)


@torch.no_grad()
def fold_scales(block: nn.Module, arch: Arch, source_name: str, consumer_names: tuple[str, ...] | list[str],
                scales: Tensor) -> None:
    """Divide ``source_name``'s output channels by ``scales`` and multiply the consumers' input columns by them.

    block: one decoder block; names are relative to it (``arch.feeds`` entries).
    scales: (in,) positive, in = the consumers' input width = the source's output width.
    The source is a norm (RMSNorm/LayerNorm weight and bias; Gemma-style ``(offset + w)``
    norms via ``arch.norm_offset``) or a linear (rows and bias; GPT-2 Conv1D handled).
    In place; the block's output is unchanged up to rounding when the feed is exact.
    """
    source = block.get_submodule(source_name)
    if isinstance(source, (nn.Linear, Conv1D)):
        _divide_linear_rows(source, arch, scales, source_name)
    else:
        _divide_norm(source, scales, arch.norm_offset, source_name)
    for name in consumer_names:
        consumer = block.get_submodule(name)
        W = linear_weight(consumer, arch)
        dtype = _compute_dtype(W)
        s = _check_scales(scales, W.shape[1], f"consumer '{name}'").to(W.device, dtype)
        set_linear_weight(consumer, arch, W.to(dtype) * s[None, :])


class TokenSample:
    """A uniform random sample, without replacement, of at most ``limit`` rows from a stream of batches.

    Each row gets a random key from a seeded generator and the ``limit`` largest keys are kept
    (priority sampling), so memory stays bounded by ``limit`` plus one batch. Samplers with the
    same seed fed batches of the same sizes pick the same token positions.
    """

    def __init__(self, limit: int, seed: int = 0) -> None:
        self.limit = limit
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: Tensor | None = None
        self.keys: Tensor | None = None

    def add(self, x: Tensor) -> None:
        X = x.detach().reshape(-1, x.shape[-1]).float()
        keys = torch.rand(X.shape[0], generator=self.generator)
        if self.rows is not None:
            X, keys = torch.cat([self.rows, X]), torch.cat([self.keys, keys])
        if X.shape[0] > self.limit:
            keep = keys.topk(self.limit).indices.sort().values
            X, keys = X[keep.to(X.device)], keys[keep]
        self.rows, self.keys = X.clone(), keys

    def result(self) -> Tensor:
        if self.rows is None:
            raise RuntimeError("no calibration batch reached this linear: did run() execute the block?")
        return self.rows


def sample_inputs(arch: Arch, modules: dict[str, nn.Module], run: Callable[[], object],
                  max_tokens: int, seed: int = 0) -> dict[str, Tensor]:
    """Name -> (n, in) fp32 sample of at most ``max_tokens`` input rows of each linear in ``modules``.

    One hook per shared-input group (``arch.groups``) during one ``run()``; linears of a
    group map to the same tensor.
    """
    shared = input_representatives(arch, modules)
    samplers = {rep: TokenSample(max_tokens, seed) for rep in dict.fromkeys(shared.values())}

    def hook(rep: str):
        return lambda _module, args, _output: samplers[rep].add(args[0])

    handles = [modules[rep].register_forward_hook(hook(rep)) for rep in samplers]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    results = {rep: sampler.result() for rep, sampler in samplers.items()}
    return {name: results[rep] for name, rep in shared.items()}
