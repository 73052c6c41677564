"""The ``rotate`` stage: QuaRot's offline rotations, before a weight quantizer (``rotate+gptq-w3-g64``).

A model-level method (``llmpress.registry``, kind "model"): folds the RMSNorm scales into the linears,
unties the head, rotates the residual stream by a randomized Hadamard matrix (or a random orthogonal
one) and, with ``heads``, each attention head's values and outputs (``llmpress.rotate.fold``). The
model computes the same function in float arithmetic and stays a plain transformers model (no online
rotations), so every later stage and every save format works on it unchanged. The rotated linears have
fewer outlier weights, which a following quantizer may gain from (see the figures below). Recipe::

    stages:
      - {method: rotate, args: {kind: hadamard, seed: 0}}
      - {method: gptq, args: {bits: 3, group_size: 64, act_order: true, true_sequential: true}}

Measured on SmolLM2-135M (austen:eval 16×1024): the rotated dense model 33.53, as the base; ``rotate+rtn-w4-g64``
63.79 against 45.00 without rotation. RTN loses on the MLP inputs: on 256 calibration tokens, up_proj's
relative output error under RTN int4 g64 goes from 0.11 to 0.19-0.20 after rotation in layers 2, 5 and 15
(q_proj's barely moves, 0.08-0.09 either way). Those inputs hold over half their energy in five channels;
unrotated, their rounding error is that of their own columns' groups, scaled by the (folded) RMSNorm gain;
rotated, every output channel meets all columns' rounding error at one level. Quantizers that see the
activations (GPTQ's Hessian) are the ones to pair with a rotation.

``online=true`` adds QuaRot's online Hadamard transforms (:mod:`.online`), which int4 activations and an int4
KV cache need: before each ``down_proj`` and each ``o_proj`` (its weight absorbs the inverse offline; a forward
pre-hook rotates its input) and on each head's keys and values where the KV cache is quantized. ``heads`` rotates
each head's values offline but not across heads, so without the one before ``o_proj`` its input keeps the heads'
different scales (QuaRot applies H_heads ⊗ H_head_dim there; here one Hadamard of order heads·head_dim, 576 =
36·16 for SmolLM2, ``online_o_proj=false`` leaves it out). On SmolLM2-135M (austen:eval 16 x 1024, KV int4)
it takes ``rotate+gptq-w4a4`` from 146.61 to 126.78; with near-lossless weights
(``rotate(online=true)+w4a4(bits=8)``) it is neutral: 49.22 with it and 49.44 without (KV16), 52.99 and 52.15
with the int4 KV cache. The model then computes something plain
transformers does not: it is saved in llmpress's own folder (``llmpress.export.rotated``),
which records the transforms in ``config.json`` and puts them back on load.

``residual=false`` (with ``online``) folds nothing and leaves the residual stream as it is: every linear gets an
online Hadamard on its input instead (q/k/v and gate/up too, W ← W·H/√n, x ← x·H/√n), so each norm's gain stays
on the activations. Folding a gain into the linears that read it hands them its spread (SmolLM2-135M's first
input norm has a median gain of 0.002 and a largest of 0.31), and the int4 activations then enter without it:
their per-token scale is set by channels that the gain would have silenced. On SmolLM2-135M (austen:eval
16 x 1024) int4 activations with near-exact weights (``rotate(online=true, residual=false)+w4a4(bits=8)``) score
43.02 (KV16) against 49.22 folded, and the GPTQ W4A4 model with KV int4 (``rotate+gptq-w4a4-g64``, now this mode)
64.55 against 79.40 (``rotate(online=true)+gptq-w4a4-g64``). Its price is a Hadamard transform per linear input
at run time (q, k and v each transform the same input here; an engine would do it once per norm); the head stays
tied to the embedding. SpinQuant's learned rotation is a residual one and needs the default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import nn

from ..config import Check, Config
from ..errors import LlmpressError
from ..models.archs import Arch, get_blocks, linear_weight, set_linear_weight
from ..registry import Method, register
from .fold import fold_norms, head_layout, rotate_heads, rotate_residual, untie_head, why_not
from .hadamard import has_hadamard, rotation
from .online import absorb_input_hadamard, add_input_hadamard, has_input_hadamard, record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotateConfig(Config):
    """``kind``: "hadamard" (QuaRot: a Hadamard matrix times a random ±1 diagonal; needs a Hadamard order for the
    hidden size, and for the head dim when ``heads``) or "random" (a random orthogonal matrix, any size).
    ``seed``: the random signs / matrix. ``heads``: also rotate each attention head's values and outputs.
    ``verify``: compare the logits on a few random tokens before and after, and fail if they moved.
    ``online``: also QuaRot's online Hadamard before each MLP output linear (``down_proj``) and on the keys and
    values of a quantized KV cache (needs Hadamard orders for the MLP width and the head dim). ``online_o_proj``
    (with ``online``): also an online Hadamard across all heads before the attention output linear (``o_proj``),
    QuaRot's H_heads part, whose per-head part ``heads`` folds into W_v / W_o (needs an order for its width).
    ``residual``: fold the norms and rotate the residual stream (QuaRot). ``residual=false`` (needs ``online``)
    leaves the norms and the residual stream as they are and gives every linear an online Hadamard on its input
    instead, so the norms' gains stay on the activations (see the module docstring)."""

    label = "rotate"

    kind: Literal["hadamard", "random"] = "hadamard"
    seed: Annotated[int, Check(ge=0, lt=2**63, advice="use an integer from 0 to 2**63 - 1")] = 0
    heads: bool = True
    verify: bool = True
    online: bool = False
    online_o_proj: bool = True
    residual: bool = True

    def check(self) -> None:
        if not self.residual and not self.online:
            raise LlmpressError("rotate(residual=false) rotates nothing but the heads' values: add online=true, "
                                "or drop residual=false")


# relative change of the logits allowed by verify: float rounding of the rotated weights, by parameter dtype
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
_LOOSE = 3e-2  # bfloat16 / float16


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.to(torch.float64)


def _probe(model: nn.Module) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    return ids.to(model.get_input_embeddings().weight.device)


def rotate_model(model: nn.Module, arch: Arch, samples: torch.Tensor | None, cfg: RotateConfig, *,
                 device: torch.device | str = "cpu", batch_size: int = 8, progress: bool = False) -> dict[str, dict]:
    """Method kind "model": rotate ``model`` in place (see the module docstring); returns no per-layer records
    (the linears keep their shapes and their function; the recipe in ``llmpress.json`` records the stage)."""
    reason = why_not(model, arch)
    if reason is not None:
        raise LlmpressError(f"rotate cannot rotate a '{arch.name}' model: {reason}; remove the rotate stage")
    hidden = model.get_input_embeddings().weight.shape[1]
    head_dim = head_layout(model)[2]
    sizes = [("hidden size", hidden)] + ([("head dim", head_dim)] if cfg.heads else [])
    for what, n in sizes:
        if cfg.kind == "hadamard" and not has_hadamard(n):
            raise LlmpressError(f"rotate: no Hadamard matrix of order {n} (the {what}) is built here: "
                                "use rotate(kind=random)")
    if cfg.online:
        _check_online(model, arch, head_dim, cfg.online_o_proj, inputs=not cfg.residual)
    ids = _probe(model) if cfg.verify else None
    before = _logits(model, ids) if cfg.verify else None
    tied = False
    if cfg.residual:
        tied = untie_head(model)
        fold_norms(model, arch)
        rotate_residual(model, arch, rotation(hidden, cfg.kind, cfg.seed))
    if cfg.heads:
        rotate_heads(model, arch, rotation(head_dim, cfg.kind, cfg.seed + 1))
    if cfg.online:
        add_online_hadamard(model, arch, o_proj=cfg.online_o_proj, inputs=not cfg.residual)
    if cfg.verify:
        after = _logits(model, ids)
        change = float((after - before).norm() / before.norm())
        dtype = model.get_input_embeddings().weight.dtype
        if change > _TOLERANCE.get(dtype, _LOOSE):
            raise LlmpressError(f"rotate changed the '{arch.name}' model's logits by {change:.2e} (relative): "
                                "this architecture does not rotate exactly; remove the rotate stage")
        log.info("rotate: logits changed by %.2e (relative) on a probe of 16 tokens", change)
    if cfg.residual:
        log.info("rotate: residual stream (%d) rotated by a %s matrix%s%s%s", hidden, cfg.kind,
                 f", heads ({head_dim})" if cfg.heads else "", "; head untied from the embedding" if tied else "",
                 "; online Hadamard before the MLP output linears and on the quantized KV cache" if cfg.online else "")
    else:
        log.info("rotate: online Hadamard on every linear's input and on the quantized KV cache%s (norms and "
                 "residual stream left as they are)", f", heads ({head_dim}) rotated" if cfg.heads else "")
    return {}


def _online_linears(arch: Arch, o_proj: bool, inputs: bool = False) -> tuple[str, ...]:
    """The linears given an online Hadamard: the MLP's output linear (its input is the MLP's inner activation)
    and, with ``o_proj``, the attention's output linear (its input is the concatenated heads); with ``inputs``
    (no residual rotation) also the linears reading the norms (q/k/v, gate/up)."""
    readers = (*arch.groups[0], *arch.groups[2]) if inputs else ()
    return (*readers, *(arch.groups[1] if o_proj else ()), *arch.groups[3])


def _check_online(model: nn.Module, arch: Arch, head_dim: int, o_proj: bool = True, inputs: bool = False) -> None:
    block = get_blocks(model, arch)[0]
    for name in _online_linears(arch, o_proj, inputs):
        width = linear_weight(block.get_submodule(name), arch).shape[1]
        if not has_hadamard(width):
            raise LlmpressError(f"rotate(online=true): no Hadamard matrix of order {width} (the input of {name}) "
                                "is built here; remove online=true")
    if not has_hadamard(head_dim):
        raise LlmpressError(f"rotate(online=true): no Hadamard matrix of order {head_dim} (the head dim) is built "
                            "here; remove online=true")


@torch.no_grad()
def add_online_hadamard(model: nn.Module, arch: Arch, o_proj: bool = True, inputs: bool = False) -> list[str]:
    """QuaRot's online Hadamard before every MLP output linear and, with ``o_proj``, every attention output linear
    (W ← W·H/√n offline, x ← x·H/√n at run time by a pre-hook), with ``inputs`` also before every linear that
    reads a norm, and the KV-cache rotation, recorded in ``model.config``; returns the linears' full names."""
    blocks = get_blocks(model, arch)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    names = []
    for i, block in enumerate(blocks):
        for name in _online_linears(arch, o_proj, inputs):
            linear = block.get_submodule(name)
            if has_input_hadamard(linear):  # a second rotate(online=true): the first one's transform stays
                continue
            weight = linear_weight(linear, arch)
            set_linear_weight(linear, arch, absorb_input_hadamard(weight).to(weight.dtype))
            add_input_hadamard(linear)
            names.append(f"{prefix}.{i}.{name}")
    record(model, names, kv=True)
    return names


register(Method("rotate", RotateConfig, rotate_model, (), "model", calibrated=False), recipes={
    "rotate": {"stages": [{"method": "rotate"}]},
})
