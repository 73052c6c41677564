"""Structured width pruning: remove whole KV-head groups and MLP channels so the matrices shrink.

Scores, per decoder block:

* ``fluctuation`` — FLAP (An et al. 2023, arXiv:2312.11983): input channel j of an output projection
  (o_proj, down_proj) scores ``Var(X_j)·‖W_:,j‖²``, the variance its removal takes out of the block's
  output. Bias compensation adds ``W_:,removed · mean(X_removed)`` to the output bias.
* ``taylor`` — LLM-Pruner (Ma et al. 2023, arXiv:2305.11627): element-wise first-order importance
  ``|w·∂L/∂w|`` from the calibration LM loss, summed over every weight of a group.

Under grouped-query attention a KV head goes with its query heads: a *KV group* is one block of k and
v rows, the q rows of its ``heads/kv_heads`` query heads and the matching o_proj columns. An MLP channel
is one gate/up row and one down_proj column. The config holds one width for all layers, so every layer
loses the same number of KV groups and channels, each layer choosing which by its own scores. For
every feasible number of KV groups removed per layer, the MLP channels that complete the parameter
budget follow; ``split="score"`` keeps the candidate whose removed structures have the least summed
score, ``split="measure"`` the one with the least calibration loss.

Bias compensation needs a bias on o_proj/down_proj. Llama-style configs have none but can hold one
(``attention_bias``/``mlp_bias``): the flag is turned on and the other linears it governs get zero
biases, so the saved folder loads. Where the config cannot (Mistral, Qwen2's o_proj, Qwen3's MLP),
compensation is skipped with a warning.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from ..config import Check, Config, PositiveInt
from ..errors import LlmpressError
from ..measure.size import count_params
from ..models.archs import Arch, get_blocks
from ..registry import Method, register
from .passes import calibration_loss, input_moments, taylor_importance, width_linears

log = logging.getLogger(__name__)

METRICS = ("fluctuation", "taylor")
PRUNE = ("both", "heads", "mlp")
# model_type -> (config flag giving q/k/v/o biases, config flag giving gate/up/down biases)
BIAS_FLAGS: dict[str, tuple[str | None, str | None]] = {
    "llama": ("attention_bias", "mlp_bias"), "smollm3": ("attention_bias", "mlp_bias"),
    "granite": ("attention_bias", "mlp_bias"), "qwen3": ("attention_bias", None),
    "gemma3_text": ("attention_bias", None), "gemma3": ("attention_bias", None),
    "mistral": (None, None), "qwen2": (None, None),
}


@dataclass(frozen=True)
class WidthConfig(Config):
    """target: fraction of parameters removed; scope "model" (all unique parameters, tied embeddings
    once) or "blocks" (decoder-block parameters); prune "both" | "heads" | "mlp"; metric
    "fluctuation" (FLAP) | "taylor" (LLM-Pruner); bias: FLAP bias compensation where the config can
    hold biases; split "score" | "measure" (how heads vs channels are traded); grad_samples: calibration
    samples for Taylor gradients; measure_samples: samples for split="measure"; channel_multiple: the kept
    MLP width is a multiple of this."""

    label = "width"

    target: Annotated[float, Check(gt=0, lt=1, verdict="out of range",
                                   advice="use a fraction in (0, 1), e.g. 0.2")] = 0.2
    scope: Literal["model", "blocks"] = "model"
    prune: Annotated[str, Check(choices=PRUNE)] = "both"
    metric: Annotated[str, Check(choices=METRICS)] = "fluctuation"
    bias: bool = False
    split: Literal["score", "measure"] = "score"
    grad_samples: PositiveInt = 16
    measure_samples: PositiveInt = 8
    channel_multiple: PositiveInt = 1


@dataclass(frozen=True)
class WidthPlan:
    """Per layer, the KV groups and MLP channels kept (sorted indices), and what the plan removes."""

    groups_removed: int
    channels_removed: int
    keep_groups: tuple[tuple[int, ...], ...]
    keep_channels: tuple[tuple[int, ...], ...]
    removed_params: int
    score: float


def fluctuation(variance: Tensor, weight: Tensor) -> Tensor:
    """FLAP's fluctuation metric: variance (in,) of each input channel times ‖W_:,j‖² of weight (out, in) -> (in,)."""
    return variance.double() * weight.double().pow(2).sum(dim=0)


def group_sum(scores: Tensor, width: int) -> Tensor:
    """Sum consecutive runs of ``width`` entries: (n·width,) -> (n,) (channels -> heads -> KV groups)."""
    return scores.reshape(-1, width).sum(dim=1)


def compensation(weight: Tensor, mean: Tensor, removed: Tensor) -> Tensor:
    """FLAP bias compensation: W[:, removed] (out, r) @ mean[removed] (r,) -> (out,) to add to the bias."""
    return weight.double()[:, removed] @ mean.double()[removed]


def _kept(scores: Tensor, remove: int) -> tuple[int, ...]:
    order = torch.argsort(scores, stable=True)
    return tuple(sorted(order[remove:].tolist()))


def _channels_for(budget: float, groups: int, g_params: int, c_params: int, n_channels: int,
                  multiple: int) -> int | None:
    """MLP channels to remove per layer after ``groups`` KV groups, or None when infeasible."""
    rest = budget - groups * g_params
    if rest < -0.5 * g_params or max(0.0, rest) / c_params > n_channels - multiple + 0.5:
        return None
    kept = n_channels - max(0.0, rest) / c_params
    kept = max(multiple, round(kept / multiple) * multiple)
    return n_channels - kept if kept <= n_channels else 0


def width_candidates(group_scores: Tensor, channel_scores: Tensor, group_params: int, channel_params: int,
                     budget: int, prune: str, channel_multiple: int = 1,
                     heads_ok=lambda kept_groups: True) -> list[WidthPlan]:
    """Uniform-width pruning plans that remove about ``budget`` parameters (FLAP / LLM-Pruner scores).

    group_scores (L, G) and channel_scores (L, C): importance of each KV group and MLP channel per
    layer (higher = keep). group_params / channel_params: parameters one KV group / channel holds in
    one layer. For each number k of KV groups removed per layer (only k = 0 for prune="mlp"; for
    "heads" the k closest to the budget, with no channels), the channel count completing the budget;
    each layer removes its k lowest groups and c lowest channels. ``heads_ok(kept)`` vetoes KV-group
    counts the config cannot hold. Returns the feasible plans; their ``score`` is the summed score removed.
    """
    L, G = group_scores.shape
    C = channel_scores.shape[1]
    per_layer = budget / L
    options: list[tuple[int, int]] = []
    if prune == "heads":
        ks = [k for k in range(1, G) if heads_ok(G - k)]
        if ks:
            options.append((min(ks, key=lambda k: abs(k * group_params - per_layer)), 0))
    else:
        for k in (range(G) if prune == "both" else [0]):
            c = _channels_for(per_layer, k, group_params, channel_params, C, channel_multiple)
            if c is not None and heads_ok(G - k) and (k, c) != (0, 0):
                options.append((k, c))
    plans = []
    g_sorted = torch.sort(group_scores.double(), dim=1).values
    c_sorted = torch.sort(channel_scores.double(), dim=1).values
    for k, c in options:
        score = float(g_sorted[:, :k].sum() + c_sorted[:, :c].sum())
        plans.append(WidthPlan(k, c, tuple(_kept(s, k) for s in group_scores),
                               tuple(_kept(s, c) for s in channel_scores),
                               L * (k * group_params + c * channel_params), score))
    return plans


def _index(blocks: tuple[int, ...], width: int) -> Tensor:
    """Row/column indices of the listed blocks of ``width`` consecutive entries."""
    starts = torch.tensor(blocks, dtype=torch.long).unsqueeze(1) * width
    return (starts + torch.arange(width)).reshape(-1)


def shrink_linear(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding only ``rows`` (output features) and ``cols`` (input features) of ``linear``."""
    W = linear.weight.data
    W = W[rows] if rows is not None else W
    W = W[:, cols] if cols is not None else W
    has_bias = linear.bias is not None
    new = nn.Linear(W.shape[1], W.shape[0], bias=has_bias, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        new.weight.copy_(W)
        if has_bias:
            new.bias.copy_(linear.bias.data[rows] if rows is not None else linear.bias.data)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


@dataclass(frozen=True)
class _Dims:
    kv_groups: int
    per_group: int  # query heads per KV group
    head_dim: int
    channels: int
    hidden: int
    attn: tuple[str, ...]  # q, k, v, o (``width_linears``)
    mlp: tuple[str, ...]  # gate, up, down


def dims(model: nn.Module, arch: Arch) -> _Dims:
    """The width dimensions of a supported model; unsupported architectures raise LlmpressError."""
    model_type = getattr(model.config, "model_type", "")
    if model_type not in BIAS_FLAGS:
        raise LlmpressError(f"width pruning does not support '{model_type}': use one of "
                            f"{', '.join(sorted(BIAS_FLAGS))} (separate q/k/v projections and a gated MLP)")
    text = model.config.get_text_config()
    heads, kv = int(text.num_attention_heads), int(text.num_key_value_heads or text.num_attention_heads)
    attn, mlp = width_linears(arch)
    block = get_blocks(model, arch)[0]
    q = block.get_submodule(attn[0]).weight
    head_dim = q.shape[0] // heads
    return _Dims(kv, heads // kv, head_dim, block.get_submodule(mlp[0]).weight.shape[0], int(text.hidden_size),
                 attn, mlp)


def _part_params(block: nn.Module, names: tuple[str, ...], skip_bias: str) -> int:
    total = 0
    for name in names:
        module = block.get_submodule(name)
        total += module.weight.numel()
        if module.bias is not None and name != skip_bias:
            total += module.bias.numel()
    return total


def unit_params(model: nn.Module, arch: Arch, d: _Dims) -> tuple[int, int]:
    """Parameters one KV group and one MLP channel hold in one layer (output biases stay)."""
    block = get_blocks(model, arch)[0]
    return (_part_params(block, d.attn, d.attn[3]) // d.kv_groups, _part_params(block, d.mlp, d.mlp[2]) // d.channels)


def budget(model: nn.Module, arch: Arch, cfg: WidthConfig) -> int:
    """Parameters to remove: target × all unique parameters, or × the decoder blocks' parameters."""
    if cfg.scope == "model":
        return round(cfg.target * count_params(model)["total"])
    blocks = get_blocks(model, arch)
    return round(cfg.target * sum(p.numel() for p in blocks.parameters()))


def taylor_scores(imp: dict, d: _Dims) -> tuple[Tensor, Tensor]:
    """KV-group and channel scores of one block from element importances (rows for q/k/v/gate/up)."""
    def rows(name):
        w, b = imp[name]
        return w.double().sum(1) + (0 if b is None else b.double())

    qw = d.per_group * d.head_dim
    q, k, v, o = d.attn
    gate, up, down = d.mlp
    groups = (group_sum(rows(q), qw) + group_sum(rows(k), d.head_dim)
              + group_sum(rows(v), d.head_dim) + group_sum(imp[o][0].double().sum(0), qw))
    channels = rows(gate) + rows(up) + imp[down][0].double().sum(0)
    return groups, channels


def scores(model: nn.Module, arch: Arch, d: _Dims, cfg: WidthConfig, moments, samples: Tensor,
           device: torch.device, batch_size: int, progress: bool = False) -> tuple[Tensor, Tensor]:
    """(L, G) KV-group and (L, C) channel importances under ``cfg.metric``."""
    blocks = get_blocks(model, arch)
    if cfg.metric == "taylor":
        imps = taylor_importance(model, arch, samples[:cfg.grad_samples], device, batch_size, progress)
        pairs = [taylor_scores(imp, d) for imp in imps]
    else:
        qw = d.per_group * d.head_dim
        o, down = d.attn[3], d.mlp[2]
        pairs = [(group_sum(fluctuation(m[o][1], b.get_submodule(o).weight.data.cpu()), qw),
                  fluctuation(m[down][1], b.get_submodule(down).weight.data.cpu()))
                 for b, m in zip(blocks, moments)]
    return torch.stack([g for g, _ in pairs]), torch.stack([c for _, c in pairs])


def _zero_biases(blocks: nn.ModuleList, names: tuple[str, ...]) -> None:
    for block in blocks:
        for name in names:
            m = block.get_submodule(name)
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                      requires_grad=m.weight.requires_grad)


def enable_output_biases(model: nn.Module, arch: Arch) -> tuple[bool, bool]:
    """Give o_proj and down_proj biases where they have one or the config can hold one; (attention, mlp) done."""
    blocks = get_blocks(model, arch)
    text = model.config.get_text_config()
    done = []
    for names, flag in zip(width_linears(arch), BIAS_FLAGS[model.config.model_type]):
        if blocks[0].get_submodule(names[-1]).bias is not None:
            done.append(True)
        elif flag is not None:
            setattr(text, flag, True)
            _zero_biases(blocks, names)
            done.append(True)
        else:
            log.warning("width: no bias compensation for %s: %s's config cannot give it a bias",
                        names[-1], model.config.model_type)
            done.append(False)
    return done[0], done[1]


def apply_plan(model: nn.Module, arch: Arch, plan: WidthPlan, d: _Dims, moments=None) -> None:
    """Shrink every block to ``plan`` and update the config; with ``moments``, compensate the output biases."""
    blocks = get_blocks(model, arch)
    qw = d.per_group * d.head_dim
    for i, block in enumerate(blocks):
        q_rows = _index(plan.keep_groups[i], qw)
        kv_rows = _index(plan.keep_groups[i], d.head_dim)
        channels = torch.tensor(plan.keep_channels[i], dtype=torch.long)
        (q, k, v, o), (gate, up, down) = d.attn, d.mlp
        for out_name, kept, size in ((o, q_rows, d.kv_groups * qw), (down, channels, d.channels)):
            out = block.get_submodule(out_name)
            if moments is not None and out.bias is not None:
                removed = torch.ones(size, dtype=torch.bool)
                removed[kept] = False
                delta = compensation(out.weight.data.cpu(), moments[i][out_name][0], removed)
                out.bias.data += delta.to(out.bias.dtype).to(out.bias.device)
        for name, rows in zip((q, k, v), (q_rows, kv_rows, kv_rows)):
            block.set_submodule(name, shrink_linear(block.get_submodule(name), rows=rows))
        block.set_submodule(o, shrink_linear(block.get_submodule(o), cols=q_rows))
        for name in (gate, up):
            block.set_submodule(name, shrink_linear(block.get_submodule(name), rows=channels))
        block.set_submodule(down, shrink_linear(block.get_submodule(down), cols=channels))
        mlp = block.get_submodule(gate.rpartition(".")[0])
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(plan.keep_channels[i])
    text = model.config.get_text_config()
    kept_groups = d.kv_groups - plan.groups_removed
    text.head_dim = d.head_dim  # explicit: hidden_size / heads no longer gives it
    text.num_attention_heads = kept_groups * d.per_group
    text.num_key_value_heads = kept_groups
    text.intermediate_size = d.channels - plan.channels_removed


def _choose(model, arch, plans: list[WidthPlan], d: _Dims, cfg: WidthConfig, moments, samples, device, batch_size):
    if cfg.split == "score" or len(plans) == 1:
        return min(plans, key=lambda p: p.score)
    losses = []
    for plan in plans:
        trial = copy.deepcopy(model)
        if cfg.bias:
            enable_output_biases(trial, arch)
        apply_plan(trial, arch, plan, d, moments if cfg.bias else None)
        losses.append(calibration_loss(trial, samples[:cfg.measure_samples], device, batch_size))
        log.info("width: %d KV groups + %d channels per layer -> calibration loss %.4f",
                 plan.groups_removed, plan.channels_removed, losses[-1])
        del trial
    return plans[min(range(len(plans)), key=losses.__getitem__)]


def width_prune(model: nn.Module, arch: Arch, samples: Tensor | None, cfg: WidthConfig, *,
                device: torch.device | str = "cpu", batch_size: int = 8, progress: bool = False) -> dict[str, dict]:
    """Method kind "model": score, plan, shrink ``model`` in place; returns per-linear metadata."""
    device = torch.device(device)
    d = dims(model, arch)
    if samples is None:
        raise LlmpressError("width pruning needs calibration samples: give the recipe a calibration section")
    group_params, channel_params = unit_params(model, arch, d)
    total = count_params(model)["total"]
    goal = budget(model, arch, cfg)
    need_moments = cfg.metric == "fluctuation" or cfg.bias
    moments = input_moments(model, arch, samples, device, batch_size, progress) if need_moments else None
    group_scores, channel_scores = scores(model, arch, d, cfg, moments, samples, device, batch_size, progress)
    plans = width_candidates(group_scores, channel_scores, group_params, channel_params, goal, cfg.prune,
                             cfg.channel_multiple, heads_ok=lambda kept: d.hidden % (kept * d.per_group) == 0)
    if not plans:
        L = group_scores.shape[0]
        most = L * ((d.kv_groups - 1) * group_params * (cfg.prune != "mlp")
                    + (d.channels - cfg.channel_multiple) * channel_params * (cfg.prune != "heads"))
        raise LlmpressError(f"width target {cfg.target} ({goal:,} parameters) cannot be met with prune="
                            f"{cfg.prune}: at most {most / total:.1%} of the model can go; lower the target")
    plan = _choose(model, arch, plans, d, cfg, moments, samples, device, batch_size)
    if cfg.bias:
        enable_output_biases(model, arch)
    apply_plan(model, arch, plan, d, moments if cfg.bias else None)
    log.info("width: removed %d of %d KV groups and %d of %d MLP channels per layer: %.2f%% of %d parameters",
             plan.groups_removed, d.kv_groups, plan.channels_removed, d.channels,
             100 * (total - count_params(model)["total"]) / total, total)
    return _meta(model, arch, plan, d, cfg, total)


def _meta(model: nn.Module, arch: Arch, plan: WidthPlan, d: _Dims, cfg: WidthConfig, base: int) -> dict[str, dict]:
    prefix = arch.blocks + "."
    out: dict[str, dict] = {}
    for i, block in enumerate(get_blocks(model, arch)):
        for name in d.attn + d.mlp:
            m = block.get_submodule(name)
            meta = {"method": "width", "shape": [m.out_features, m.in_features], "metric": cfg.metric,
                    "base_params": base}
            if name in d.attn:
                meta["kv_groups_kept"] = list(plan.keep_groups[i])
            else:
                meta["channels_removed"] = plan.channels_removed
            out[f"{prefix}{i}.{name}"] = meta
    return out


# 20% of all parameters: shrunk matrices (FLAP fluctuation + bias compensation / LLM-Pruner Taylor)
register(Method("width", WidthConfig, width_prune, (), "model", calibrated=True), recipes={
    "width-20": {"stages": [{"method": "width", "args": {"target": 0.2, "bias": True}}]},
    "width-20-taylor": {"stages": [{"method": "width", "args": {"target": 0.2, "metric": "taylor"}}]},
})
