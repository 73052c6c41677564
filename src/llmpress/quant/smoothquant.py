"""SmoothQuant W8A8 (Xiao et al. 2022, arXiv:2211.10438): move activation outliers into the weights.

LLM activations have a few input channels with outliers 10-100x larger
than the rest, which ruin per-token int8 activation quantization, while
weights are easy to quantize. SmoothQuant rewrites ``Y = X W`` as
``Y = (X diag(s)⁻¹)(diag(s) W)`` with per-input-channel

    s_j = max|X_j|^α / max|W_j|^(1-α)            (paper eq. 4)

(α = 0.5 by default) so that both factors have moderate ranges. The
division by ``s`` is folded into the op that feeds the linears (a norm, or
a linear feeding only them: ``llmpress.quant.smoothing.fold_scales``), so
the smoothed model computes the same function in full precision. Then
every selected linear becomes a :class:`~llmpress.quant.w8a8.W8A8Linear`:
int8 per-output-channel weights, int8 dynamic per-token activations, an
int8 GEMM with int32 accumulation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor, nn

from ..compressed import Grid
from ..config import Check, Config
from ..errors import LlmpressError
from ..models.archs import Arch, linear_weight
from ..registry import Method, register
from ..rotate.online import replacing
from ..stats import AbsMaxStats
from .smoothing import fold_scales, foldable_feeds
from .w8a8 import PATHS, W8A8Linear

log = logging.getLogger(__name__)

MIN_VALUE = 1e-5  # absmax values and scales are clamped to at least this (as the paper's code)


@dataclass(frozen=True)
class SmoothQuantConfig(Config):
    """alpha: migration strength in [0, 1] (0.5 in the paper; 0.8-0.9 for very outlier-heavy
    models); smooth: fold the scales (False: plain W8A8, the paper's baseline); quantize:
    replace the linears by W8A8Linear (False: smooth only, leaving float weights for a
    later weight-quantization stage); path: the int8 GEMM ("auto", "int_mm" or "fp32")."""

    label = "smoothquant"

    alpha: Annotated[float, Check(ge=0.0, le=1.0, verdict="out of range",
                                  advice="use a number from 0 to 1 (0.5 is typical)")] = 0.5
    smooth: bool = True
    quantize: bool = True
    path: Annotated[str, Check(choices=PATHS, verdict="unknown")] = "auto"

    def check(self) -> None:
        if not (self.smooth or self.quantize):
            raise LlmpressError("smoothquant with smooth=false and quantize=false does nothing: enable one of them")


def smoothquant_scales(act_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """SmoothQuant's per-input-channel smoothing factors (arXiv:2211.10438, eq. 4).

    act_absmax: (in,) max |X_j| over the calibration tokens of the linears' shared input.
    weights: the (out_i, in) weights of every linear reading that input.
    Returns s (in,) fp32 = max|X_j|^α / (max_i max_k |W_i[k, j]|)^(1-α), both maxima and the
    result clamped to at least 1e-5; a channel whose activation or weight maximum is 0
    (never used) gets s = 1. Divide the input by s and multiply the weight columns by s.
    """
    if not weights:
        raise ValueError("smoothquant_scales needs at least one weight")
    a = act_absmax.detach().float().reshape(-1)
    w = torch.stack([W.detach().float().abs().amax(dim=0).to(a.device) for W in weights]).amax(dim=0)
    if w.shape != a.shape:
        raise ValueError(f"activation absmax has {a.numel()} channels but the weights have {w.numel()} columns")
    s = (a.clamp(min=MIN_VALUE).pow(alpha) / w.clamp(min=MIN_VALUE).pow(1.0 - alpha)).clamp(min=MIN_VALUE)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s))


def _capture_absmax(modules: dict[str, nn.Module], feeds: list[tuple[str, tuple[str, ...]]],
                    run: Callable[[], object]) -> dict[str, Tensor]:
    """Source name -> max |x_j| of its consumers' (shared) input over one ``run()``."""
    stats = {source: AbsMaxStats() for source, _ in feeds}

    def hook(source: str):
        return lambda _module, args, _output: stats[source].add_batch(args[0])

    handles = [modules[consumers[0]].register_forward_hook(hook(source)) for source, consumers in feeds]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    missing = [source for source, acc in stats.items() if acc.absmax is None]
    if missing:
        raise RuntimeError(f"no calibration batch reached the linears fed by {missing}: did run() execute the block?")
    return {source: acc.result() for source, acc in stats.items()}


def _to_w8a8(module: nn.Module, arch: Arch, path: str) -> W8A8Linear:
    weight = linear_weight(module, arch).detach().float()
    bias = module.bias.detach() if isinstance(getattr(module, "bias", None), Tensor) else None
    return W8A8Linear.from_float(weight, bias, path)


@torch.no_grad()
def smoothquant_block(block: nn.Module, arch: Arch, modules: dict[str, nn.Module],
                      run: Callable[[], object], cfg: SmoothQuantConfig) -> dict[str, dict]:
    """Engine adapter (kind "block"): smooth every foldable feed of ``block``, then W8A8 ``modules``.

    One ``run()`` records the per-channel absmax of each feed's input; scales from
    :func:`smoothquant_scales` are folded with ``fold_scales``; each selected linear is
    replaced in ``block`` by a :class:`W8A8Linear`. Returns {relative name: meta}.
    Must be a recipe's last stage when ``quantize`` is true: later stages cannot rewrite int8 weights.
    """
    already = [name for name, m in modules.items() if isinstance(m, W8A8Linear)]
    if already:
        raise LlmpressError(f"{already[0]} is already W8A8: put smoothquant once, as the recipe's last stage")
    feeds = foldable_feeds(arch, modules) if cfg.smooth else []
    if feeds:
        absmax = _capture_absmax(modules, feeds, run)
        for source, consumers in feeds:
            weights = [linear_weight(modules[name], arch) for name in consumers]
            fold_scales(block, arch, source, consumers, smoothquant_scales(absmax[source], weights, cfg.alpha))
    smoothed = {name for _, consumers in feeds for name in consumers}
    meta = {"method": "smoothquant", "alpha": cfg.alpha}
    if cfg.quantize:
        meta.update(Grid(8, -1, sym=True, act_bits=8).to_record())
    done = {}
    for name, module in modules.items():
        shape = list(linear_weight(module, arch).shape)
        if cfg.quantize:
            block.set_submodule(name, replacing(module, _to_w8a8(module, arch, cfg.path)))
        done[name] = dict(meta, smoothed=name in smoothed, shape=shape)
    log.debug("smoothquant: folded %d feeds, %s %d linears", len(feeds),
              "quantized" if cfg.quantize else "kept", len(modules))
    return done


# fold activation outliers into the weights, then int8 weights x int8 per-token activations
register(Method("smoothquant", SmoothQuantConfig, smoothquant_block, (), "block"), recipes={
    "smoothquant-w8a8": {"stages": [{"method": "smoothquant", "args": {"alpha": 0.5}}]},
})
