"""Distillation losses between a student's and a teacher's next-token distributions.

Forward KL ``KL(p_T || p_S)`` with a temperature (Hinton et al. 2015, "Distilling
the Knowledge in a Neural Network": the loss is multiplied by T² so that its
gradients keep their size as T changes), reverse KL ``KL(p_S || p_T)`` (MiniLLM,
Gu et al. 2023), the generalized Jensen-Shannon divergence of GKD (Agarwal et al.
2023, "On-Policy Distillation of Language Models"), shifted next-token
cross-entropy, and a scale-free MSE between per-block hidden states.

Shapes: logits (B, T, V) (or (T, V)); a ``mask`` (B, T) bool marks the positions
that count; every loss is a mean over those positions. The teacher's logits are
constants (no gradient flows to them).

Memory and speed: with a 49,152-token vocabulary one (4, 512, V) fp32 tensor is
400 MB. The logit losses therefore run chunk by chunk (at most
:data:`CHUNK_TOKENS` positions, upcast to fp32 inside the chunk) in one custom
autograd function that computes each chunk's gradient w.r.t. the student's
logits in closed form while it computes the loss (forward KL: T·(p_S - p_T);
the others below) and keeps only that gradient, in the logits' dtype, for the
backward pass. No full-size intermediate is stored and nothing is recomputed
(profiled on SmolLM2, 4x256 tokens, bf16 autocast, one thread: about half the
loss's CPU time of autograd with per-chunk checkpointing, ~1.1 s of a 3.3 s step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from ..config import Check, Config
from ..errors import LlmpressError
from .config import LossBeta, LossTemperature, LossWeight

LOSSES = ("forward_kl", "reverse_kl", "jsd", "ce")
LOSS_ADVICE = "use one of " + ", ".join(LOSSES)
CHUNK_TOKENS = 256  # positions per chunk: 256 x 49,152 fp32 = 50 MB per temporary


def _rows(x: Tensor) -> Tensor:
    """(T, V) -> (1, T, V); (B, T, V) unchanged."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"logits must be (B, T, V) or (T, V), got shape {tuple(x.shape)}")
    return x


def _upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    dtype = _upcast_dtype(logits.dtype)
    if temperature != 1.0:
        logits = logits.to(dtype) / temperature
    return torch.log_softmax(logits, dim=-1, dtype=dtype)


def _forward_kl_chunk(ls: Tensor, lt: Tensor, extra) -> tuple[Tensor, Tensor]:
    """KL(p_T || p_S) per row and its gradient w.r.t. the student's scaled logits: p_S - p_T."""
    pt = lt.exp()
    loss = (lt - ls).mul_(pt).sum(-1)
    return loss, ls.exp_().sub_(pt)


def _reverse_kl_chunk(ls: Tensor, lt: Tensor, extra) -> tuple[Tensor, Tensor]:
    """KL(p_S || p_T) per row; gradient p_S ⊙ (log p_S - log p_T - KL)."""
    ps = ls.exp()
    diff = ls.sub_(lt)
    loss = (ps * diff).sum(-1)
    return loss, diff.sub_(loss.unsqueeze(-1)).mul_(ps)


def _jsd_chunk(ls: Tensor, lt: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """β·KL(p_T || m) + (1-β)·KL(p_S || m) per row; gradient p_S ⊙ (g - <p_S, g>), g = (1-β)(log p_S - log m)."""
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    ps = ls.exp()
    teacher_part = (lt - lm).mul_(lt.exp()).sum(-1)
    g = ls.sub_(lm).mul_(1.0 - beta)  # (1-β)(log p_S - log m)
    student_part = (ps * g).sum(-1, keepdim=True)
    return beta * teacher_part + student_part.squeeze(-1), g.sub_(student_part).mul_(ps)


def _ce_chunk(ls: Tensor, target: Tensor, extra) -> tuple[Tensor, Tensor]:
    """-log p_S(target) per row; gradient p_S - onehot(target)."""
    index = target.unsqueeze(-1)
    loss = -ls.gather(-1, index).squeeze(-1)
    return loss, ls.exp_().scatter_add_(-1, index, torch.full_like(index, -1, dtype=ls.dtype))


_CHUNKS = {"forward_kl": _forward_kl_chunk, "reverse_kl": _reverse_kl_chunk, "jsd": _jsd_chunk, "ce": _ce_chunk}


class _LogitLoss(torch.autograd.Function):
    """Mean over kept positions of T²·loss(student, other); gradient computed chunk by chunk in the forward.

    ``other``: teacher logits (B, T, V) or, for "ce", target ids (B, T). ``keep``: (B, T) bool or None.
    """

    @staticmethod
    def forward(ctx, student: Tensor, other: Tensor, keep: Tensor | None, kind: str, temperature: float,
                extra) -> Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student) if want_grad else None
        B, T = student.shape[:2]
        total = torch.zeros((), dtype=_upcast_dtype(student.dtype), device=student.device)
        count = 0
        with torch.autocast(student.device.type, enabled=False):
            for b in range(B):
                for t0 in range(0, T, CHUNK_TOKENS):
                    rows = slice(t0, t0 + CHUNK_TOKENS)
                    w = None if keep is None else keep[b, rows]
                    n = student[b, rows].shape[0] if w is None else int(w.sum())
                    if n == 0:
                        continue
                    ls = _log_probs(student[b, rows], temperature)
                    second = other[b, rows] if kind == "ce" else _log_probs(other[b, rows], temperature)
                    loss, g = _CHUNKS[kind](ls, second, extra)
                    if w is not None:
                        loss, g = loss * w, g.mul_(w.unsqueeze(-1))
                    total += loss.sum()
                    count += n
                    if want_grad:
                        grad[b, rows] = g
        scale = temperature ** 2 / max(count, 1)
        if want_grad:  # d(T² · mean loss)/d logits = T²/n · dloss/dz · 1/T
            grad.mul_(temperature / max(count, 1))
            ctx.save_for_backward(grad)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None


def _logit_loss(kind: str, student_logits: Tensor, other: Tensor, temperature: float, mask: Tensor | None,
                extra=None) -> Tensor:
    student = _rows(student_logits)
    B, T = student.shape[:2]
    other = other.reshape(B, T) if kind == "ce" else _rows(other)
    if kind != "ce" and other.shape != student.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(other.shape)} differ")
    if mask is not None and mask.numel() != B * T:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the logits' positions {(B, T)}")
    keep = None if mask is None else mask.reshape(B, T).to(device=student.device, dtype=torch.bool)
    return _LogitLoss.apply(student, other.detach(), keep, kind, float(temperature), extra)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
               mask: Tensor | None = None) -> Tensor:
    """T² · mean over positions of KL(p_T || p_S), p = softmax(logits / T) (Hinton et al. 2015).

    Mode-covering: it is large wherever the teacher has mass the student misses.
    Logits (B, T, V), mask (B, T) bool; returns a scalar (fp32, or fp64 for fp64 logits).
    """
    return _logit_loss("forward_kl", student_logits, teacher_logits, temperature, mask)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
               mask: Tensor | None = None) -> Tensor:
    """T² · mean over positions of KL(p_S || p_T) (MiniLLM, Gu et al. 2023).

    Mode-seeking: a student concentrated on one of the teacher's modes pays little.
    """
    return _logit_loss("reverse_kl", student_logits, teacher_logits, temperature, mask)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5,
                    temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """GKD's generalized JSD (Agarwal et al. 2023, eq. 4), times T², mean over positions.

    JSD(β) = β·KL(p_T || m) + (1-β)·KL(p_S || m), with m = β·p_T + (1-β)·p_S, computed in
    log space (log m = logaddexp(log β + log p_T, log(1-β) + log p_S)). At β = 0.5 it is the
    symmetric Jensen-Shannon divergence, bounded by log 2. JSD(β) itself tends to 0 at both
    ends; the scaled values tend to the KLs: JSD(β)/β → KL(p_T || p_S) (forward) as β → 0 and
    JSD(β)/(1-β) → KL(p_S || p_T) (reverse) as β → 1. At exactly β = 0 and β = 1 this function
    returns those limits, forward and reverse KL, as TRL's GKDTrainer does.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must lie in [0, 1]")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature, mask)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature, mask)
    return _logit_loss("jsd", student_logits, teacher_logits, temperature, mask, float(beta))


def next_token_ce(logits: Tensor, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Shifted causal-LM cross-entropy: position t predicts token t+1, mean over predictions.

    logits (B, T, V), input_ids (B, T); ``mask`` (B, T) marks real tokens (like an attention
    mask): the prediction at t counts when tokens t and t+1 are both marked. Scores the
    positions 0..T-2, like :func:`distill_loss`'s logit losses.
    """
    logits = _rows(logits)
    input_ids = input_ids.reshape(logits.shape[:2])
    keep = None if mask is None else _shifted_mask(mask.reshape(input_ids.shape))
    return _logit_loss("ce", logits[:, :-1], input_ids[:, 1:], 1.0, keep)


def _shifted_mask(mask: Tensor) -> Tensor:
    """(B, T) real-token mask -> (B, T-1): predictions whose input and target are both real."""
    mask = mask.to(torch.bool)
    return mask[:, :-1] & mask[:, 1:]


def hidden_mse(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor],
               mask: Tensor | None = None) -> Tensor:
    """Mean over layers of ‖h_S - h_T‖² / ‖h_T‖² over the masked positions (scale-free MSE).

    Each pair is one block's output, (B, T, H); ``mask`` (B, T). Dividing by the teacher's
    mean square makes layers with large activations (late blocks, outlier channels) weigh
    no more than the others; 1.0 means "as far off as predicting zeros".
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"need matching non-empty lists of hidden states, got {len(student_hidden)} "
                         f"and {len(teacher_hidden)}")
    total = None
    for hs, ht in zip(student_hidden, teacher_hidden):
        dtype = _upcast_dtype(hs.dtype)
        hs, ht = hs.to(dtype), ht.to(dtype).detach()
        if mask is not None:
            keep = mask.to(torch.bool)
            hs, ht = hs[keep], ht[keep]
        ratio = (hs - ht).pow(2).mean() / ht.pow(2).mean().clamp_min(1e-12)
        total = ratio if total is None else total + ratio
    return total / len(student_hidden)


@dataclass(frozen=True)
class LossConfig(Config):
    """kind: one of LOSSES ("ce" = plain next-token training, e.g. on teacher-generated text);
    temperature: softmax temperature of the logit losses (T² scaling); beta: JSD mixing weight;
    hidden_weight: weight of the per-block hidden-state MSE; ce_weight: weight of a next-token CE
    term on the training tokens, added to a distillation loss."""

    label = "distillation loss"

    kind: Annotated[str, Check(advice=LOSS_ADVICE)] = "forward_kl"
    temperature: LossTemperature = 1.0
    beta: LossBeta = 0.5
    hidden_weight: LossWeight = 0.0
    ce_weight: LossWeight = 0.0

    def check(self) -> None:
        if self.kind not in LOSSES:
            raise LlmpressError(f"unknown distillation loss '{self.kind}': {LOSS_ADVICE}")
        if self.kind == "ce" and self.ce_weight > 0:
            raise LlmpressError("ce_weight adds cross-entropy to a distillation loss, but kind is already 'ce': "
                                "set ce_weight to 0 or pick a distillation kind")


def needs_hidden(cfg: LossConfig) -> bool:
    """Whether the forwards must return hidden states (output_hidden_states=True)."""
    return cfg.hidden_weight > 0


def needs_teacher(cfg: LossConfig) -> bool:
    """Whether the loss reads the teacher's outputs (not for plain CE without a hidden term)."""
    return cfg.kind != "ce" or cfg.hidden_weight > 0


def distill_loss(student_out, teacher_out, input_ids: Tensor, cfg: LossConfig,
                 mask: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The configured loss of one batch, and its unweighted parts as floats (plus the weighted "total").

    ``student_out``/``teacher_out``: HF CausalLMOutputs with ``logits`` (B, T, V) and, when
    ``cfg.hidden_weight > 0``, ``hidden_states`` (embeddings, then one per block: the block
    outputs ``hidden_states[1:]`` are compared). ``teacher_out`` may be None when the loss
    needs no teacher (see :func:`needs_teacher`). Logit losses and CE score positions 0..T-2.
    ``mask`` (B, T) marks real tokens, as in :func:`next_token_ce`.
    """
    if needs_teacher(cfg) and teacher_out is None:
        raise ValueError(f"loss '{cfg.kind}' (hidden_weight={cfg.hidden_weight}) needs the teacher's outputs")
    logits = student_out.logits
    keep = None if mask is None else _shifted_mask(mask)
    parts: dict[str, Tensor] = {}  # unweighted values
    weights = {cfg.kind: 1.0}
    if cfg.kind == "ce":
        parts["ce"] = next_token_ce(logits, input_ids, mask)
    else:
        s, t = logits[:, :-1], teacher_out.logits[:, :-1]
        if cfg.kind == "forward_kl":
            parts["forward_kl"] = forward_kl(s, t, cfg.temperature, keep)
        elif cfg.kind == "reverse_kl":
            parts["reverse_kl"] = reverse_kl(s, t, cfg.temperature, keep)
        else:
            parts["jsd"] = generalized_jsd(s, t, cfg.beta, cfg.temperature, keep)
        if cfg.ce_weight > 0:
            parts["ce"], weights["ce"] = next_token_ce(logits, input_ids, mask), cfg.ce_weight
    if cfg.hidden_weight > 0:
        if student_out.hidden_states is None or teacher_out.hidden_states is None:
            raise ValueError("hidden_weight > 0 needs hidden states: run both models with output_hidden_states=True")
        parts["hidden"] = hidden_mse(student_out.hidden_states[1:], teacher_out.hidden_states[1:], mask)
        weights["hidden"] = cfg.hidden_weight
    total = sum(weights[name] * value for name, value in parts.items())
    report = {name: float(value.detach()) for name, value in parts.items()}
    report["total"] = float(total.detach())
    return total, report
