"""The model-level low-rank stages ``svd``, ``asvd`` and ``svd-llm``: statistics, global rank allocation, factorization.

Each is a Method of kind "model" (see ``llmpress.api._segments``): it needs every
layer's loss curve before choosing any rank, so it

1. runs the calibration windows through the *uncompressed* model block by block
   (``llmpress.calib.block_stats``), with hooks that accumulate each
   linear's input statistics (XᵀX for SVD-LLM; mean |X_j| and XᵀX for ASVD, whose
   factorization uses mean |X_j| only but whose loss curve is the exact output error;
   plain SVD needs none, and its curve is the weight error); the statistics of every
   block come from unfactorized activations, in one pass;
2. computes each linear's loss curve (``llmpress.lowrank.factorize``) and the parameter
   budget (:class:`SVDConfig`), and allocates ranks globally (``llmpress.lowrank.allocate``);
3. replaces each linear that got a rank by a ``LowRankLinear``; the others stay dense.

The per-layer metadata reports the rank chosen (None: left dense), the parameters and
the relative loss of the truncation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor, nn

from ..calib import block_prefix, block_stats
from ..config import Check, Config, PositiveInt
from ..errors import LlmpressError
from ..linalg import single_threaded
from ..measure import count_params, flops_per_token
from ..models.archs import Arch, block_linears, get_blocks, linear_weight
from ..registry import Method, register
from .allocate import allocate_ranks, layer_params
from .factorize import asvd_curve, asvd_factorize, svd_curve, svd_factorize, svd_llm_curve, svd_llm_factorize
from .module import LowRankLinear, replace_with_factors

log = logging.getLogger(__name__)

SCOPES = ("model", "linears")


@dataclass(frozen=True)
class SVDConfig(Config):
    """Budget of a low-rank stage.

    keep: the fraction to keep, 0 < keep < 1 (0.8 = "keep 80% of the parameters").
    scope: "model" (default): the whole model's parameter count *and* its FLOPs per token
    (at ``flops_seq_len`` tokens of context) end at ≤ keep × the original's. Embeddings,
    norms, the LM head and attention products are not factorized, so the block linears
    shrink by more than 1 − keep (SmolLM2-135M: its tied 28M-parameter embedding stays).
    "linears": only the factorized linears' own parameters are held to keep × their dense count.
    min_rank: the smallest rank a factorized layer may get.
    """

    keep: Annotated[float, Check(gt=0, lt=1, verdict="out of range",
                                 advice="use a fraction between 0 and 1, e.g. 0.8")] = 0.8
    scope: Annotated[str, Check(choices=SCOPES)] = "model"
    min_rank: PositiveInt = 1
    flops_seq_len: PositiveInt = 1024


@dataclass(frozen=True)
class ASVDConfig(SVDConfig):
    """SVDConfig plus alpha: the exponent of the activation scale S_jj = mean|X_j|^alpha (ASVD: 0.5)."""

    alpha: Annotated[float, Check(ge=0, le=2, verdict="out of range",
                                  advice="use a number from 0 to 2 (ASVD uses 0.5)")] = 0.5


@dataclass(frozen=True)
class SVDLLMConfig(SVDConfig):
    """SVDConfig plus update_u: re-solve U by least squares given V after truncation."""

    update_u: bool = False


def collect_input_stats(model: nn.Module, arch: Arch, samples: Tensor, *, xtx: bool, absmean: bool,
                        device: torch.device | str = "cpu", batch_size: int = 8,
                        progress: bool = False) -> dict[str, dict[str, Tensor]]:
    """Full layer name -> {"xtx": mean xxᵀ (n×n), "absmean": mean |x_j| (n,)} of every block linear's input.

    One pass, block by block (``llmpress.calib.block_stats``), propagating the *unfactorized* blocks'
    outputs; linears that share an input (q/k/v, gate/up) share one accumulation (the same tensors).
    """
    needs = {"covariance": "xtx"} if xtx else {}
    if absmean:
        needs["abs_mean"] = "absmean"
    blocks = get_blocks(model, arch)
    prefix = block_prefix(model, blocks)
    stats: dict[str, dict[str, Tensor]] = {}
    for i, _block, per in block_stats(model, arch, samples, tuple(needs), torch.device(device), batch_size,
                                      progress, "low-rank statistics"):
        stats.update({f"{prefix}{i}.{n}": {needs[k]: v for k, v in found.items()} for n, found in per.items()})
    return stats


def _layers(model: nn.Module, arch: Arch) -> dict[str, nn.Module]:
    blocks = get_blocks(model, arch)
    prefix = block_prefix(model, blocks)
    found = {f"{prefix}{i}.{n}": m for i, b in enumerate(blocks) for n, m in block_linears(b, arch).items()}
    if any(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), LowRankLinear) for n in found):
        raise LlmpressError("the model is already factorized: use one low-rank stage (svd, asvd or svd-llm) per recipe")
    return found


def linear_budget(model: nn.Module, shapes: list[tuple[int, int]], cfg: SVDConfig) -> int:
    """How many parameters the factorizable linears may keep in total under ``cfg`` (see :class:`SVDConfig`)."""
    dense = sum(m * n for m, n in shapes)
    if cfg.scope == "linears":
        return math.floor(cfg.keep * dense)
    total = count_params(model)["total"]
    flops = flops_per_token(model.config, cfg.flops_seq_len, model=model)["flops_per_token"]
    by_params = cfg.keep * total - (total - dense)
    by_flops = (cfg.keep * flops - (flops - 2 * dense)) / 2  # 2 FLOPs per weight per token
    return math.floor(min(by_params, by_flops))


def _curve(method: str, W: Tensor, stats: dict, cfg) -> tuple[Tensor, dict]:
    if method == "svd":
        return svd_curve(W), {}
    if method == "asvd":
        return asvd_curve(W, stats["absmean"], cfg.alpha, stats.get("xtx")), {}
    curve, damp = svd_llm_curve(W, stats["xtx"])
    return curve, {"damp": damp}


def _factorize(method: str, W: Tensor, stats: dict, rank: int, cfg):
    if method == "svd":
        return svd_factorize(W, rank)
    if method == "asvd":
        return asvd_factorize(W, stats["absmean"], rank, cfg.alpha)
    return svd_llm_factorize(W, stats["xtx"], rank, cfg.update_u)


def _saved_stats(resume, names) -> dict[str, dict[str, Tensor]] | None:
    """The input statistics a killed run kept, shared tensors shared again, or None."""
    index, tensors = resume.json("stats_index"), resume.tensors("stats")
    if index is None or tensors is None or set(index) != set(names):
        return None
    return {n: {k: tensors[key] for k, key in kinds.items()} for n, kinds in index.items()}


def _keep_stats(resume, stats: dict[str, dict[str, Tensor]]) -> None:
    """Keep the input statistics, each tensor once (linears that read one input share its Gram)."""
    keys: dict[int, str] = {}
    index = {n: {k: keys.setdefault(id(t), f"{n}.{k}") for k, t in kinds.items()} for n, kinds in stats.items()}
    unique = {key: t for kinds in stats.values() for k, t in kinds.items() for key in [keys[id(t)]]}
    resume.put_tensors("stats", unique)
    resume.put_json("stats_index", index)


def lowrank_model(method: str, model: nn.Module, arch: Arch, samples: Tensor | None, cfg: SVDConfig, *,
                  device: torch.device | str = "cpu", batch_size: int = 8, progress: bool = False,
                  stats: dict[str, dict] | None = None, resume=None) -> dict[str, dict]:
    """Factorize every block linear of ``model`` in place with ``method`` ("svd" | "asvd" | "svd-llm").

    Returns {full layer name: meta} with the rank chosen (None = left dense). ``stats``: the
    output of :func:`collect_input_stats` (xtx and absmean) to reuse, e.g. across budgets;
    by default they are collected here. ASVD factorizes with mean |X_j| only, but allocates
    ranks by its exact output error, which needs XᵀX too (see ``asvd_curve``).
    ``resume`` (a :class:`llmpress.resume.Resume`, from ``compress`` with an output path) keeps the statistics once
    collected, each linear's error curve and each factorisation as they are computed; the same command run again
    after a kill reads them instead of computing them again (and writes the same bytes).
    """
    layers = _layers(model, arch)
    before = count_params(model)["total"]
    if stats is None and method == "svd":
        stats = {n: {} for n in layers}
    if stats is None and resume is not None:
        stats = _saved_stats(resume, layers)
    if stats is None:
        if samples is None:
            raise LlmpressError(f"{method} needs calibration samples: give the recipe calibration data")
        stats = collect_input_stats(model, arch, samples, xtx=True, absmean=method == "asvd",
                                    device=device, batch_size=batch_size, progress=progress)
        if resume is not None:
            _keep_stats(resume, stats)
    weights = {n: linear_weight(m, arch).detach().float().cpu() for n, m in layers.items()}
    curves, extra = {}, {}
    with single_threaded():  # small dense factorizations: one thread stalls less on shared cores
        for n, W in weights.items():
            kept = resume.tensors(f"curve.{n}") if resume is not None else None
            if kept is not None:
                curves[n], extra[n] = kept["curve"], resume.json(f"curve.{n}")
                continue
            curves[n], extra[n] = _curve(method, W, stats[n], cfg)
            if resume is not None:  # the JSON first: a curve file is only there with its extras
                resume.put_json(f"curve.{n}", extra[n])
                resume.put_tensors(f"curve.{n}", {"curve": curves[n]})
    shapes = [tuple(W.shape) for W in weights.values()]
    budget = linear_budget(model, shapes, cfg)
    ranks = dict(zip(weights, allocate_ranks(shapes, list(curves.values()), budget, cfg.min_rank)))
    meta: dict[str, dict] = {}
    for n, W in weights.items():
        rank, curve = ranks[n], curves[n]
        rel = 0.0 if rank is None or float(curve[0]) == 0 else float(curve[rank] / curve[0])
        meta[n] = {"method": method, "rank": rank, "shape": list(W.shape), "params": layer_params(W.shape, rank),
                   "dense_params": W.numel(), "relative_loss": rel, **extra[n]}
        if rank is not None:
            kept = resume.tensors(f"factors.{n}") if resume is not None else None
            if kept is None:
                with single_threaded():
                    done = _factorize(method, W, stats[n], rank, cfg)
                kept = {"U": done.U, "V": done.V}
                if resume is not None:
                    resume.put_tensors(f"factors.{n}", kept)
            replace_with_factors(model, n, kept["U"], kept["V"])
    _log_summary(method, meta, budget, before, count_params(model)["total"])
    return meta


def _log_summary(method: str, meta: dict[str, dict], budget: int, before: int, after: int) -> None:
    kept = sum(m["params"] for m in meta.values())
    dense = sum(m["dense_params"] for m in meta.values())
    factorized = sum(m["rank"] is not None for m in meta.values())
    log.info("%s: %d of %d linears factorized; linears keep %d of %d parameters (%.1f%%; budget %d); "
             "the model keeps %d of %d (%.1f%%)", method, factorized, len(meta), kept, dense,
             100 * kept / max(dense, 1), budget, after, before, 100 * after / max(before, 1))


def svd_stage(model, arch, samples, cfg: SVDConfig, **kw) -> dict[str, dict]:
    """Plain truncated SVD with globally allocated ranks (no calibration)."""
    return lowrank_model("svd", model, arch, samples, cfg, **kw)


def asvd_stage(model, arch, samples, cfg: ASVDConfig, **kw) -> dict[str, dict]:
    """ASVD (arXiv:2312.05821) with globally allocated ranks."""
    return lowrank_model("asvd", model, arch, samples, cfg, **kw)


def svd_llm_stage(model, arch, samples, cfg: SVDLLMConfig, **kw) -> dict[str, dict]:
    """SVD-LLM (arXiv:2403.07378) with globally allocated ranks."""
    return lowrank_model("svd-llm", model, arch, samples, cfg, **kw)


# ranks allocated globally; NN = % of the whole model's parameters and FLOPs kept
_LOWRANK = {"svd": (SVDConfig, svd_stage, False), "asvd": (ASVDConfig, asvd_stage, True),
            "svd-llm": (SVDLLMConfig, svd_llm_stage, True)}
for _name, (_config, _fn, _calibrated) in _LOWRANK.items():
    register(Method(_name, _config, _fn, (), "model", calibrated=_calibrated, inputs=("resume",)),
             recipes={f"{_name}-{k}": {"stages": [{"method": _name, "args": {"keep": k / 100}}]} for k in (90, 80, 70)})
