"""Depth pruning: remove whole decoder blocks.

Blocks are chosen by

* ``bi`` — Block Influence (ShortGPT, Men et al. 2024, arXiv:2403.03853):
  ``BI_i = 1 − mean_t cos(x_t, y_t)`` between block i's input and output hidden state over all
  calibration tokens t, measured in one pass of the unpruned model; the blocks that change their
  input least go;
* ``ppl`` — measured impact: drop each remaining block alone, measure the LM loss on calibration
  windows, remove the least harmful, repeat (greedy; one full forward per candidate, so it uses
  ``ppl_samples`` windows only).

The blocks leave the ModuleList; the config's ``num_hidden_layers`` and every per-layer list of that
length (``layer_types``, SmolLM3's ``no_rope_layers``) shrink with them, and the ``layer_idx`` of the
remaining attention modules is renumbered so that KV caches index them correctly. The saved folder
is a plain transformers model with fewer layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from ..calib import run_blocks
from ..config import Check, Config, PositiveInt
from ..errors import LlmpressError
from ..measure.size import count_params
from ..models.archs import Arch, block_linears, get_blocks
from ..registry import Method, register
from .passes import calibration_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DepthConfig(Config):
    """target: fraction of all (unique) parameters to remove, rounded to whole blocks; blocks: remove
    exactly this many blocks instead (0 = use target); metric: "bi" (ShortGPT block influence) or "ppl"
    (greedy measured loss); ppl_samples: calibration windows used by "ppl"."""

    label = "depth"

    target: Annotated[float, Check(gt=0, lt=1, verdict="out of range",
                                   advice="use a fraction in (0, 1), e.g. 0.2")] = 0.2
    blocks: Annotated[int, Check(ge=0, advice="use a block count >= 1, or 0 to use target")] = 0
    metric: Annotated[Literal["bi", "ppl"], Check(advice="use 'bi' or 'ppl'")] = "bi"
    ppl_samples: PositiveInt = 8


def block_influence(inputs: Tensor, outputs: Tensor) -> float:
    """ShortGPT's BI = 1 − mean cos(x, y) over tokens; inputs, outputs (..., hidden) -> float."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    y = outputs.reshape(-1, outputs.shape[-1]).double()
    return 1.0 - float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())


def lowest(scores: list[float], count: int) -> list[int]:
    """Indices of the ``count`` lowest scores (ties by position), sorted."""
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:count])


def block_influences(model: nn.Module, arch: Arch, samples: Tensor, device: torch.device,
                     batch_size: int, progress: bool = False) -> list[float]:
    """BI of every block, from one pass of ``samples`` (n, L) through the unpruned model."""
    result = []
    for _i, inputs, outputs in run_blocks(model, arch, samples, device, batch_size, progress, "block influence"):
        tokens = [h.shape[0] * h.shape[1] for h in outputs]
        parts = [block_influence(x, y) for x, y in zip(inputs, outputs)]
        result.append(sum(t * p for t, p in zip(tokens, parts)) / sum(tokens))
    return result


def _passthrough(tuple_output: bool):
    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if tuple_output else hidden
    return forward


def _loss_without(model, blocks, skipped: list[int], samples, device, batch_size, tuple_output: bool) -> float:
    for i in skipped:
        blocks[i].forward = _passthrough(tuple_output)
    try:
        return calibration_loss(model, samples, device, batch_size)
    finally:
        for i in skipped:
            blocks[i].__dict__.pop("forward", None)


def greedy_by_loss(model: nn.Module, arch: Arch, samples: Tensor, count: int, device: torch.device,
                   batch_size: int, resume=None) -> list[int]:
    """Remove ``count`` blocks one at a time, each time the one whose absence costs least calibration loss.

    ``resume`` (a :class:`llmpress.resume.Resume`): the blocks chosen so far are kept after every round, and a
    rerun continues after the last round kept."""
    blocks = get_blocks(model, arch)
    seen = {}

    def probe(_module, _args, out) -> None:
        seen["tuple"] = isinstance(out, tuple)

    handle = blocks[0].register_forward_hook(probe)
    try:
        base = calibration_loss(model, samples[:1], device, batch_size)
    finally:
        handle.remove()
    log.debug("depth: loss of one window with every block %.4f", base)
    removed: list[int] = list(resume.json("greedy") or []) if resume is not None else []
    for _ in range(len(removed), count):
        trials = {j: _loss_without(model, blocks, removed + [j], samples, device, batch_size, seen["tuple"])
                  for j in range(len(blocks)) if j not in removed}
        best = min(trials, key=lambda j: (trials[j], j))
        log.info("depth: dropping block %d (calibration loss %.4f)", best, trials[best])
        removed.append(best)
        if resume is not None:
            resume.put_json("greedy", removed)
    return sorted(removed)


def remove_blocks(model: nn.Module, arch: Arch, indices: list[int]) -> None:
    """Delete blocks ``indices`` from ``model`` in place; update the config and renumber ``layer_idx``."""
    blocks = get_blocks(model, arch)
    drop = set(indices)
    if not drop or min(drop) < 0 or max(drop) >= len(blocks) or len(drop) >= len(blocks):
        raise LlmpressError(f"cannot remove blocks {sorted(drop)} of {len(blocks)}: keep at least one, "
                            "indices in range")
    old = len(blocks)
    kept = [b for i, b in enumerate(blocks) if i not in drop]
    model.set_submodule(arch.blocks, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    text = model.config.get_text_config()
    for key, value in list(vars(text).items()):
        if isinstance(value, list) and len(value) == old:
            setattr(text, key, [v for i, v in enumerate(value) if i not in drop])
    text.num_hidden_layers = len(kept)


def blocks_for(model: nn.Module, arch: Arch, cfg: DepthConfig) -> int:
    """Blocks to remove: ``cfg.blocks``, else target × all parameters over one block's, rounded."""
    blocks = get_blocks(model, arch)
    count = cfg.blocks or round(cfg.target * count_params(model)["total"]
                                / (sum(p.numel() for p in blocks.parameters()) / len(blocks)))
    if not 1 <= count < len(blocks):
        raise LlmpressError(f"depth pruning would remove {count} of {len(blocks)} blocks: "
                            "choose a target or block count that leaves at least one and removes one")
    return count


def depth_prune(model: nn.Module, arch: Arch, samples: Tensor | None, cfg: DepthConfig, *,
                device: torch.device | str = "cpu", batch_size: int = 8, progress: bool = False,
                resume=None) -> dict[str, dict]:
    """Method kind "model": choose and remove whole blocks; returns metadata for the remaining linears.

    ``resume`` (a :class:`llmpress.resume.Resume`, from ``compress`` with an output path): the block scores are
    kept once measured (the greedy search's choices after every round), and the same command run again after a
    kill reads them instead of measuring again."""
    device = torch.device(device)
    if samples is None:
        raise LlmpressError("depth pruning needs calibration samples: give the recipe a calibration section")
    count = blocks_for(model, arch, cfg)
    if cfg.metric == "bi":
        influence = resume.json("influence") if resume is not None else None
        if influence is None:
            influence = block_influences(model, arch, samples, device, batch_size, progress)
            if resume is not None:
                resume.put_json("influence", influence)
        log.info("depth: block influence %s", [round(b, 4) for b in influence])
        removed = lowest(influence, count)
    else:
        removed = greedy_by_loss(model, arch, samples[:cfg.ppl_samples], count, device, batch_size, resume)
    total = count_params(model)["total"]
    survivors = [i for i in range(len(get_blocks(model, arch))) if i not in removed]
    remove_blocks(model, arch, removed)
    log.info("depth: removed blocks %s: %.2f%% of %d parameters", removed,
             100 * (total - count_params(model)["total"]) / total, total)
    out = {}
    for new_index, block in enumerate(get_blocks(model, arch)):
        for name in block_linears(block, arch):
            out[f"{arch.blocks}.{new_index}.{name}"] = {"method": "depth", "original_block": survivors[new_index],
                                                         "removed_blocks": removed, "metric": cfg.metric,
                                                         "base_params": total}
    return out


# 20% of all parameters as whole blocks (ShortGPT block influence)
register(Method("depth", DepthConfig, depth_prune, (), "model", calibrated=True, inputs=("resume",)), recipes={
    "depth-20": {"stages": [{"method": "depth", "args": {"target": 0.2}}]},
})
