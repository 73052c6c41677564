"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv:2306.00978).

A few input channels carry much larger activations than the rest; their
weights matter most. AWQ scales those weight columns up before rounding
(``W diag(s)``, with ``x / s`` folded into the op that feeds the layer, so
the float model is unchanged) and searches the per-group clipping range of
each weight. Both searches minimise the output error of the RTN-quantized
weight on calibration activations. AWQ itself does not round: a following
``rtn`` or ``gptq`` stage with the same grid does (as in torchao, where AWQ
sits on top of any weight quantizer).

Both errors are quadratic forms in the weight error ``D``:
``sum_t ||D x_t||^2 = trace(D XᵀX Dᵀ)``, so the searches cost one (in, in)
or per-group (g, g) Gram matrix instead of a pass over the tokens per grid
point.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor, nn

from ..config import Check, Config
from ..models.archs import Arch, linear_weight, set_linear_weight
from ..primitives import expand_groups, qparams_from_range, qrange
from ..registry import Method, register
from .rtn import Bits, GroupSize, rtn_recipe
from .smoothing import fold_scales, foldable_feeds, sample_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQConfig(Config):
    """bits/group_size/sym: the grid the next stage rounds to (use the same there).

    n_grid: α steps in [0, 1) for the scale search; duo_scaling: s = mean|x|^α / mean|ŵ|^(1-α)
    (AutoAWQ's default) instead of mean|x|^α; clip: search per-group clipping ranges;
    clip_grid: steps from the group absmax down to max_shrink·absmax; max_tokens: random
    calibration tokens kept per input for the searches (bounds memory and time).
    """

    label = "awq"

    bits: Bits = 4
    group_size: GroupSize = 64
    sym: bool = False
    n_grid: Annotated[int, Check(ge=1)] = 20
    duo_scaling: bool = False
    clip: bool = True
    clip_grid: Annotated[int, Check(ge=1)] = 20
    max_shrink: Annotated[float, Check(gt=0, le=1, advice="use a number in (0, 1], e.g. 0.5")] = 0.5
    max_tokens: Annotated[int, Check(ge=16)] = 4096

    @property
    def group(self) -> int | None:
        """The group size as the primitives take it (None: one group per row)."""
        return None if self.group_size == -1 else self.group_size


@dataclass(frozen=True)
class AWQSearch:
    """Result of the scale search: scales (in,), the chosen α (None: the identity under
    duo_scaling), its output MSE and the MSE of plain RTN (s = 1) on the same sample."""

    scales: Tensor
    alpha: float | None
    loss: float
    rtn_loss: float


def _rows(x: Tensor, columns: int) -> Tensor:
    X = x.reshape(-1, x.shape[-1]).float()
    if X.shape[1] != columns:
        raise ValueError(f"activations have {X.shape[1]} channels, weights {columns} input columns")
    return X


def _grouped(W: Tensor, group: int | None) -> Tensor:
    """(rows, in) -> (rows, groups, g), zero-padding a partial last group."""
    g = W.shape[1] if group is None else group
    groups = math.ceil(W.shape[1] / g)
    return nn.functional.pad(W, (0, groups * g - W.shape[1])).reshape(W.shape[0], groups, g)


def _fake_quantize(Wg: Tensor, cfg: AWQConfig, lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
    """RTN of grouped weights Wg (..., g) and back: ``primitives.fake_quantize`` without regrouping.

    lo/hi (...): the groups' ranges when already known (clipping), else min/max widened to 0.
    """
    lo = Wg.amin(dim=-1).clamp(max=0) if lo is None else lo
    hi = Wg.amax(dim=-1).clamp(min=0) if hi is None else hi
    scale, zero = qparams_from_range(lo, hi, cfg.bits, cfg.sym)
    qmin, qmax = qrange(cfg.bits)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return torch.round(Wg / s).add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


def _weight_mean(W: Tensor, group: int | None) -> Tensor:
    """AutoAWQ's w_mean: |W| normalised by its group's absmax, averaged over rows; (in,)."""
    absmax = _grouped(W.abs(), group).amax(dim=-1)
    scale = expand_groups(absmax, W.shape[1], group)
    return (W.abs() / (scale + 1e-6)).mean(dim=0)


def _candidates(x_mean: Tensor, w_mean: Tensor | None, n_grid: int):
    """(α, s) pairs; the identity s = 1 is always first."""
    yield (0.0 if w_mean is None else None), torch.ones_like(x_mean)
    for i in range(0 if w_mean is not None else 1, n_grid):
        alpha = i / n_grid
        s = x_mean.pow(alpha)
        if w_mean is not None:
            s = s / (w_mean.pow(1 - alpha) + 1e-4)
        s = s.clamp(min=1e-4)
        yield alpha, s / (s.max() * s.min()).sqrt()


def _sq_error(D: Tensor, X: Tensor, gram: Tensor | None) -> float:
    """sum_t ||D x_t||² through the Gram matrix when it is the cheaper way."""
    if gram is not None:
        return float(((D @ gram) * D).sum())
    return float((X @ D.T).pow(2).sum())


def awq_search(weights: list[Tensor], x: Tensor, cfg: AWQConfig) -> AWQSearch:
    """AWQ's scale search (arXiv:2306.00978, §3.2; AutoAWQ's grid).

    weights: the linears fed by one op, each (out_i, in); x: (n, in) (or (..., in)) their
    shared input. For α on a grid in [0, 1), s = mean_t|x|^α (normalised by sqrt(max·min)),
    the loss is the output MSE ||concat_i(W_i x) - concat_i(Q(W_i diag s)(x / s))||² / (n·Σout_i)
    with Q the RTN fake-quantizer of ``cfg``. s = 1 (plain RTN) is always a candidate.
    """
    W = torch.cat([w.detach().float() for w in weights])
    X = _rows(x, W.shape[1])
    w_mean = _weight_mean(W, cfg.group) if cfg.duo_scaling else None
    x_mean = X.abs().mean(dim=0)
    _, groups, g = _grouped(W[:1], cfg.group).shape
    pad = groups * g - W.shape[1]  # zero columns: a partial last group, quantized exactly to 0
    W, X = nn.functional.pad(W, (0, pad)), nn.functional.pad(X, (0, pad))
    gram = X.T @ X if X.shape[0] > X.shape[1] else None
    norm = X.shape[0] * W.shape[0]
    best: tuple[Tensor, float | None, float] | None = None
    rtn_loss: float | None = None
    for alpha, s in _candidates(x_mean, w_mean, cfg.n_grid):
        sp = nn.functional.pad(s, (0, pad), value=1.0)
        Wq = _fake_quantize((W * sp).reshape(-1, groups, g), cfg).reshape(W.shape) / sp
        loss = _sq_error(W - Wq, X, gram) / norm
        rtn_loss = loss if rtn_loss is None else rtn_loss  # the first candidate is s = 1
        if best is None or loss < best[2]:
            best = (s, alpha, loss)
    return AWQSearch(*best, rtn_loss=rtn_loss)


def awq_scales(weights: list[Tensor], x: Tensor, cfg: AWQConfig) -> tuple[Tensor, float]:
    """AWQ scales (in,) for linears sharing input x (n, in), and their output MSE; see :func:`awq_search`."""
    found = awq_search(weights, x, cfg)
    return found.scales, found.loss


def awq_clip(weight: Tensor, x: Tensor, cfg: AWQConfig) -> Tensor:
    """AWQ's clipping search (AutoAWQ's auto_clip): max_val (out, groups).

    weight: (out, in); x: (n, in) its input. For each (row, group), the threshold
    shrink·absmax with shrink stepping from 1 down to ``cfg.max_shrink`` in
    ``cfg.clip_grid`` steps that minimises the group's own output error
    sum_t (x_t,g · (Q(clamp(w_g, ±m)) - w_g))², Q being RTN with ``cfg``'s grid.
    Shrink 1 (no clipping) is a candidate, so no group's error grows.
    """
    W = weight.detach().float()
    X = _rows(x, W.shape[1])
    Xg = _grouped(X, cfg.group).transpose(0, 1)  # (groups, n, g)
    gram = Xg.transpose(1, 2) @ Xg  # (groups, g, g)
    Wg = _grouped(W, cfg.group).transpose(0, 1).contiguous()  # (groups, out, g)
    lo, hi = Wg.amin(dim=-1).clamp(max=0), Wg.amax(dim=-1).clamp(min=0)
    absmax = torch.maximum(-lo, hi)
    best_err = torch.full_like(absmax, math.inf)
    best = absmax.clone()
    for shrink in torch.linspace(1.0, cfg.max_shrink, cfg.clip_grid + 1).tolist():
        limit = absmax * shrink  # clamping to ±limit moves the range to [max(lo, -limit), min(hi, limit)]
        clipped = torch.maximum(torch.minimum(Wg, limit.unsqueeze(-1)), -limit.unsqueeze(-1))
        D = _fake_quantize(clipped, cfg, torch.maximum(lo, -limit), torch.minimum(hi, limit)).sub_(Wg)
        err = ((D @ gram) * D).sum(dim=-1)  # (groups, out)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, limit, best)
    return best.T.contiguous()


def apply_clip(weight: Tensor, max_val: Tensor, group_size: int | None) -> Tensor:
    """weight (out, in) clamped to ±max_val (out, groups) group by group."""
    limit = expand_groups(max_val, weight.shape[1], group_size)
    return torch.maximum(torch.minimum(weight.float(), limit), -limit)


def awq_block(block: nn.Module, arch: Arch, modules: dict[str, nn.Module], run: Callable[[], object],
              cfg: AWQConfig) -> dict[str, dict]:
    """The engine's block adapter: fold AWQ scales for each feed whose consumers are all in
    ``modules``, then clip every linear in ``modules``; weights stay unrounded.

    Inputs are sampled once (one ``run()``, at most ``cfg.max_tokens`` tokens each). Folding a
    feed changes only its consumers' input (to x / s; the source's output reaches nobody else),
    so the samples of those consumers are divided by s, which equals re-capturing them.
    """
    inputs = sample_inputs(arch, modules, run, cfg.max_tokens)
    meta: dict[str, dict] = {}
    for source, consumers in foldable_feeds(arch, modules):
        weights = [linear_weight(modules[name], arch) for name in consumers]
        found = awq_search(weights, inputs[consumers[0]], cfg)
        fold_scales(block, arch, source, consumers, found.scales)
        scaled_input = inputs[consumers[0]] / found.scales
        for name in consumers:
            inputs[name] = scaled_input
            meta[name] = {"method": "awq", "awq_alpha": found.alpha}
        log.debug("awq %s -> %s: alpha %s, mse %.3g (rtn %.3g)", source, consumers, found.alpha,
                  found.loss, found.rtn_loss)
    if cfg.clip:
        for name, module in modules.items():
            W = linear_weight(module, arch).float()
            set_linear_weight(module, arch, apply_clip(W, awq_clip(W, inputs[name], cfg), cfg.group))
            meta.setdefault(name, {"method": "awq"})
    return meta


# AWQ scales and clips, then the next stage rounds on the same grid.
register(Method("awq", AWQConfig, awq_block, (), "block"), recipes={
    "awq-w4-g64": {"stages": [{"method": "awq", "args": {"bits": 4, "group_size": 64, "sym": False}},
                              *rtn_recipe(4, 64, sym=False)["stages"]]},
    "awq-w4-g64-sym": {"stages": [{"method": "awq", "args": {"bits": 4, "group_size": 64, "sym": True}},
                                  *rtn_recipe(4, 64, sym=True)["stages"]]},
})
