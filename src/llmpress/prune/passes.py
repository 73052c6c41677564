"""Calibration passes shared by width and depth pruning: channel moments, Taylor gradients, loss.

Each function runs calibration token ids through a model and returns plain tensors or floats; the
pruning decisions are made from these by the pure functions in ``structured`` and ``depth``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..calib import run_blocks
from ..errors import LlmpressError
from ..models.archs import Arch, attention_mlp, get_blocks
from ..progress import bar
from ..stats import MeanVarStats


def width_linears(arch: Arch) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(q, k, v, o) and (gate, up, down) of ``arch`` (``models.archs.attention_mlp``); other layouts raise."""
    names = attention_mlp(arch)
    if names is None:
        raise LlmpressError(f"width pruning needs separate q/k/v projections and a gated MLP, which "
                            f"'{arch.name}' does not have: use depth pruning or an unstructured method")
    return names


def input_moments(model: nn.Module, arch: Arch, samples: Tensor, device: torch.device,
                  batch_size: int, progress: bool = False) -> list[dict[str, tuple[Tensor, Tensor]]]:
    """Per block, (mean, variance) of the inputs of o_proj and down_proj over the calibration tokens."""
    attn, mlp = width_linears(arch)
    acc: dict[int, dict[str, MeanVarStats]] = {}

    def hook(i: int, block: nn.Module) -> list:
        acc[i] = {attn[3]: MeanVarStats(), mlp[2]: MeanVarStats()}
        return [block.get_submodule(n).register_forward_pre_hook(lambda _m, a, s=s: s.add_batch(a[0]))
                for n, s in acc[i].items()]

    return [{n: s.result() for n, s in acc.pop(i).items()}
            for i, _x, _y in run_blocks(model, arch, samples, device, batch_size, progress, "channel moments", hook)]


def taylor_importance(model: nn.Module, arch: Arch, samples: Tensor, device: torch.device,
                      batch_size: int, progress: bool = False) -> list[dict[str, tuple[Tensor, Tensor | None]]]:
    """Per block and linear, |W ⊙ ∂L/∂W| and |b ⊙ ∂L/∂b|, L = mean LM loss over ``samples`` (LLM-Pruner)."""
    blocks = get_blocks(model, arch)
    names = sum(width_linears(arch), ())
    linears = [[b.get_submodule(n) for n in names] for b in blocks]
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
                 for n, m in zip(names, row)} for row in linears]
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
