"""The ``spinquant`` stage: learn the residual rotation for int4 activations (SpinQuant, arXiv:2405.16406).

QuaRot rotates the residual stream by a random Hadamard matrix; SpinQuant (Liu et al. 2024) learns the
rotation R1 instead, minimizing the loss of the activation-quantized model on calibration text by gradient
descent on the orthogonal group (Cayley SGD, Li et al. 2020, arXiv:2002.01113). As SpinQuant does before
GPTQ, the weights stay float while it learns: only the activations are fake-quantized (per token, symmetric,
clipped at ``act_clip``·absmax, the straight-through estimator for the rounding), since GPTQ then fits the
weights to the rotated model.

This stage runs after ``rotate(online=true)`` (norms folded, stream rotated by the Hadamard Q₀, online
Hadamards in place) and learns R, starting at the identity, on top of it: the stream becomes h·Q₀·R. Only
the inputs of the linears that read the stream (q/k/v, gate/up) depend on R; the others (o_proj, down_proj,
after their online Hadamard) are fake-quantized too, so the loss is that of the W16A4 model. R acts on the
activations while it learns (each norm's output x → fq(x·R)·Rᵀ: 2·hidden² multiply-adds per token and norm,
cheaper than rotating the weights at every step); at the end :func:`llmpress.rotate.fold.rotate_residual`
writes it into the weights exactly, so the saved model is a rotated model like any other. Recipe::

    stages:
      - {method: rotate, args: {online: true}}
      - {method: spinquant, args: {steps: 48, samples: 16, seq_len: 256, lr: 0.05}}
      - {method: gptq, args: {bits: 4, group_size: 64, act_order: true, true_sequential: true, mse: true}}
      - {method: w4a4, args: {act_bits: 4, clip_search: true}}

Measured on SmolLM2-135M (austen:eval 16 x 1024, KV int4; the stage's defaults: 48 steps of one 256-token
window, 16 windows cycled, lr 0.05, objective kl): the 48 steps take 253 s on one CPU thread (5.3 s a step,
the KL's float forward included) and the KL falls from 0.479 to 0.433 (mean of the first / last 10 steps).
With near-exact weights (``rotate(online=true)+spinquant+w4a4(bits=8)``) int4 activations score 50.72
against 52.99 for the Hadamard alone; the recipe above 82.92, against 79.40 without the spinquant stage
(``rotate(online=true)+gptq-w4a4-g64``): with this little data the learned rotation does not carry over to the int4
weights. SpinQuant itself learns on 800 windows of 2048 tokens.

The update (:func:`cayley_step`) is a pure function: A = G·Rᵀ − R·Gᵀ (skew-symmetric, G = ∂L/∂R), then
R ← (I + η/2·A)⁻¹(I − η/2·A)·R, the Cayley transform of a skew matrix times R, so R stays orthogonal to
rounding; to first order R − η·A·R, a descent direction. The step is normalized (η = ``lr``·√n/‖A‖_F, cosine-decayed
to 0), so ``lr`` is the size of a step relative to a rotation's.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from ..config import Check, Config
from ..errors import LlmpressError
from ..models.archs import Arch, get_blocks
from ..quant.w4a4 import fake_quant_act_ste
from ..registry import Method, register
from .fold import norm_feeds, rotate_residual, writers

log = logging.getLogger(__name__)


def cayley_step(R: Tensor, G: Tensor, lr: float) -> Tensor:
    """One Cayley SGD step on the orthogonal group: R (n, n) orthogonal, G (n, n) the loss's gradient at R.

    A = G·Rᵀ − R·Gᵀ; returns (I + lr/2·A)⁻¹ (I − lr/2·A) R, orthogonal (the Cayley transform of the skew A is),
    equal to R − lr·A·R + O(lr²) and a descent direction (⟨G, A·R⟩ = ‖A‖²/2 ≥ 0). Same dtype as R."""
    A = G @ R.T - R @ G.T
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve(eye + lr / 2 * A, (eye - lr / 2 * A) @ R)


@dataclass(frozen=True)
class SpinQuantConfig(Config):
    """steps: Cayley SGD steps (each one window of ``seq_len`` tokens); samples: calibration windows used (the
    first ones of the recipe's calibration, cycled); seq_len: tokens of each (cut from the calibration windows);
    lr: the step size relative to a rotation's (cosine-decayed to 0); act_bits / act_clip: the activation grid
    fake-quantized while learning (``w4a4``'s); objective: "kl" (the divergence from the float model's
    next-token distribution, as the stage's default: the part of the loss the quantization causes) or "ce"
    (SpinQuant's next-token cross-entropy, which with few windows also fits the calibration text)."""

    label = "spinquant"

    steps: Annotated[int, Check(ge=1, advice="use a positive integer such as 48")] = 48
    samples: Annotated[int, Check(ge=1, advice="use a positive integer such as 16")] = 16
    seq_len: Annotated[int, Check(ge=2, advice="use an integer of at least 2, such as 256")] = 256
    lr: Annotated[float, Check(gt=0, advice="use a positive number such as 0.05")] = 0.05
    act_bits: Annotated[int, Check(ge=2, le=8, advice="use an integer from 2 to 8")] = 4
    act_clip: Annotated[float, Check(gt=0, le=1, advice="use a number in (0, 1], e.g. 0.9")] = 0.9
    objective: Literal["kl", "ce"] = "kl"


def _check_rotated(model: nn.Module, arch: Arch) -> None:
    for block in get_blocks(model, arch):
        for name, _ in norm_feeds(arch):
            weight = block.get_submodule(name).weight
            if not torch.all(weight == 1.0 - arch.norm_offset):
                raise LlmpressError("spinquant learns a rotation of a rotated model: put rotate(online=true) "
                                    "(without residual=false, which folds no norms) before spinquant in the recipe")


def _hooks(model: nn.Module, arch: Arch, rotation: list, cfg: SpinQuantConfig) -> list:
    """Fake-quantize every block linear's input: the norms' outputs in the basis ·R, the writers' as they are
    (``rotation`` = [R, on]: with on False the hooks pass everything through, for the float model's logits)."""
    def norm_out(module, args, out):
        R, on = rotation[0].to(out.dtype), rotation[1]  # (a half-precision model: R rounded, its gradient fp32)
        return fake_quant_act_ste(out @ R, cfg.act_bits, cfg.act_clip) @ R.T if on else out

    def writer_in(module, args):
        return (fake_quant_act_ste(args[0], cfg.act_bits, cfg.act_clip), *args[1:]) if rotation[1] else args

    handles = []
    for block in get_blocks(model, arch):
        handles += [block.get_submodule(name).register_forward_hook(norm_out) for name, _ in norm_feeds(arch)]
        handles += [block.get_submodule(name).register_forward_pre_hook(writer_in) for name in writers(arch)]
    return handles


def _loss(model: nn.Module, batch: Tensor, rotation: list, objective: str) -> Tensor:
    """The fake-quantized model's next-token cross-entropy ("ce"), or its KL divergence from the float model's
    next-token distribution ("kl": only what the quantization costs, not the fit to the calibration text)."""
    if objective == "ce":
        return model(input_ids=batch, labels=batch, use_cache=False).loss
    rotation[1] = False
    with torch.no_grad():
        target = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)
    rotation[1] = True
    logits = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)
    return torch.nn.functional.kl_div(logits.flatten(0, 1), target.flatten(0, 1), log_target=True,
                                      reduction="batchmean")


def learn_rotation(model: nn.Module, arch: Arch, ids: Tensor, cfg: SpinQuantConfig) -> tuple[Tensor, list[float]]:
    """R (hidden, hidden) float64 learned by :func:`cayley_step` on the fake-quantized model's loss (:func:`_loss`)
    over ``ids`` (N, L) windows; returns R and the loss at each step. The model is left as it was."""
    hidden = model.get_input_embeddings().weight.shape[1]
    device = model.get_input_embeddings().weight.device
    windows = ids[:cfg.samples, :cfg.seq_len].to(device)
    rotation = [torch.eye(hidden, dtype=torch.float32, device=device, requires_grad=True), True]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handles = _hooks(model, arch, rotation, cfg)
    losses = []
    try:
        for step in range(cfg.steps):
            batch = windows[step % len(windows)][None]
            loss = _loss(model, batch, rotation, cfg.objective)
            (G,) = torch.autograd.grad(loss, rotation[0])
            R, G = rotation[0].detach().double(), G.double()
            size = float((G @ R.T - R @ G.T).norm())  # ‖A‖_F of cayley_step: the step is normalized by it
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)) * math.sqrt(hidden) / max(size, 1e-30)
            R = cayley_step(R, G, lr)
            rotation[0] = R.float().requires_grad_(True)
            losses.append(loss.item())
            log.debug("spinquant step %d: loss %.4f", step, losses[-1])
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return rotation[0].detach().double(), losses


def spinquant_model(model: nn.Module, arch: Arch, samples: Tensor | None, cfg: SpinQuantConfig, *,
                    device=None, batch_size: int = 8, progress: bool = False) -> dict[str, dict]:
    """Method kind "model": learn R (:func:`learn_rotation`) and rotate the residual stream by it in place."""
    if samples is None:
        raise LlmpressError("spinquant needs calibration data: give the recipe a calibration section")
    _check_rotated(model, arch)
    if samples.shape[1] < cfg.seq_len:
        raise LlmpressError(f"spinquant(seq_len={cfg.seq_len}) is longer than the calibration windows "
                            f"({samples.shape[1]} tokens): lower seq_len or raise the calibration seq_len")
    start = time.perf_counter()
    R, losses = learn_rotation(model, arch, samples, cfg)
    with torch.no_grad():
        rotate_residual(model, arch, R)
    log.info("spinquant: %d steps in %.0f s, loss %.3f -> %.3f (mean of the first / last 10)", cfg.steps,
             time.perf_counter() - start, sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:]))
    return {}


register(Method("spinquant", SpinQuantConfig, spinquant_model, (), "model", calibrated=True), recipes={})
