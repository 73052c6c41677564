"""Calibration passes shared by width and depth pruning: block inputs, channel moments, Taylor gradients, loss.

Each function runs calibration token ids through a model and returns plain tensors or floats; the
pruning decisions are made from these by the pure functions in ``structured`` and ``depth``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..models.archs import Arch, get_blocks

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def bar(items, enabled: bool, desc: str):
    """``items`` with a tqdm progress bar when ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not enabled, leave=False)


class _MeanVar:
    """Running per-channel mean and variance of a linear's input (float64)."""

    def __init__(self) -> None:
        self.n, self.sum, self.sumsq = 0, None, None

    def add(self, x: Tensor) -> None:
        X = x.detach().reshape(-1, x.shape[-1]).double()
        s, ss = X.sum(0), (X * X).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = ss if self.sumsq is None else self.sumsq + ss
        self.n += X.shape[0]

    def result(self) -> tuple[Tensor, Tensor]:
        mean = self.sum / self.n
        var = (self.sumsq - self.n * mean * mean) / max(self.n - 1, 1)
        return mean.cpu(), var.clamp_min(0).cpu()


def captured_inputs(model: nn.Module, blocks: nn.ModuleList, samples: Tensor, batch_size: int, device: torch.device):
    """Every block's calibration inputs on ``device`` (:func:`llmpress.engine.capture_inputs`)."""
    from ..engine import _move, capture_inputs  # the engine imports the registry, which imports us

    inputs = capture_inputs(model, blocks, samples, batch_size, device)
    inputs.kwargs = [{b: _move(kw, device) for b, kw in per.items()} for per in inputs.kwargs]
    return inputs


def run_blocks(model: nn.Module, arch: Arch, samples: Tensor, device: torch.device, batch_size: int,
               progress: bool, desc: str, hook: Callable[[int, nn.Module], list] | None = None):
    """Run ``samples`` through the blocks one at a time on ``device``; yields (i, inputs, outputs) per block.

    Each block's inputs are the previous block's outputs; a block visits ``device`` only for its own
    forward. ``hook(i, block)`` registers hooks for block i's forward and returns their handles.
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


def input_moments(model: nn.Module, arch: Arch, samples: Tensor, device: torch.device,
                  batch_size: int, progress: bool = False) -> list[dict[str, tuple[Tensor, Tensor]]]:
    """Per block, (mean, variance) of the inputs of o_proj and down_proj over the calibration tokens."""
    acc: dict[int, dict[str, _MeanVar]] = {}

    def hook(i: int, block: nn.Module) -> list:
        acc[i] = {ATTN[3]: _MeanVar(), MLP[2]: _MeanVar()}
        return [block.get_submodule(n).register_forward_pre_hook(lambda _m, a, s=s: s.add(a[0]))
                for n, s in acc[i].items()]

    return [{n: s.result() for n, s in acc.pop(i).items()}
            for i, _x, _y in run_blocks(model, arch, samples, device, batch_size, progress, "channel moments", hook)]


def taylor_importance(model: nn.Module, arch: Arch, samples: Tensor, device: torch.device,
                      batch_size: int, progress: bool = False) -> list[dict[str, tuple[Tensor, Tensor | None]]]:
    """Per block and linear, |W ⊙ ∂L/∂W| and |b ⊙ ∂L/∂b|, L = mean LM loss over ``samples`` (LLM-Pruner)."""
    blocks = get_blocks(model, arch)
    linears = [[b.get_submodule(n) for n in ATTN + MLP] for b in blocks]
    wanted = {id(p) for row in linears for m in row for p in m.parameters()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    home = next(model.parameters()).device
    step = max(1, min(batch_size, 2))  # the logits of a large vocabulary dominate memory
    try:
        model.to(device)
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        with torch.enable_grad():
            for start in bar(range(0, samples.shape[0], step), progress, "gradients"):
                batch = samples[start:start + step].to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                (loss * batch.shape[0] / samples.shape[0]).backward()
        return [{n: ((m.weight * m.weight.grad).abs().detach().cpu(),
                     None if m.bias is None else (m.bias * m.bias.grad).abs().detach().cpu())
                 for n, m in zip(ATTN + MLP, row)} for row in linears]
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
        model.to(home)


def calibration_loss(model: nn.Module, samples: Tensor, device: torch.device, batch_size: int) -> float:
    """Mean LM loss of ``model`` over ``samples`` (n, L) token ids."""
    home = next(model.parameters()).device
    model.to(device)
    total = 0.0
    with torch.inference_mode():
        for start in range(0, samples.shape[0], batch_size):
            batch = samples[start:start + batch_size].to(device)
            total += float(model(input_ids=batch, labels=batch, use_cache=False).loss) * batch.shape[0]
    model.to(home)
    return total / samples.shape[0]
