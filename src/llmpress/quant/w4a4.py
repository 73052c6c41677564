"""W4A4: int4 weights and int4 per-token activations, executed as an integer GEMM (QuaRot's setting).

QuaRot (Ashkboos et al. 2024, arXiv:2404.00456) runs every linear of a block with 4-bit weights (GPTQ,
per output channel, symmetric) and 4-bit activations quantized on the fly per token (symmetric, the
range clipped to ``act_clip`` = 0.9 of the token's absmax), after rotations that spread activation
outliers over all channels (``rotate(online=true)``: the residual stream and heads offline, the MLP's
inner activation by an online Hadamard before ``down_proj``). Without the rotations, a few outlier
channels set each token's scale and the other channels round to zero.

:class:`W4A4Linear` holds int4 codes in int8 and computes ``y = s_x ⊙ (X_q W_qᵀ) ⊙ s_wᵀ`` with the exact
int32 GEMM of ``llmpress.quant.w8a8.int8_matmul`` (``torch._int_mm`` where fast, else an exact fp32
emulation): int4 values through the int8 path, so it runs wherever W8A8 runs, at W8A8's speed (no int4
GEMM on CPU) and with int4's accuracy. Grouped weights (``group_size`` > 0) are one GEMM per group, each
int32 result scaled by its group's weight scales; asymmetric weights subtract ``z·Σ X_q`` per group.

The ``w4a4`` method (kind "model", after a weight quantizer) turns every block linear into a
:class:`W4A4Linear`, taking the codes the previous stage chose (``gptq``, ``rtn``, ``awq``+``rtn``; the
engine's results) or rounding to nearest when there are none; an online Hadamard on a linear's input stays.
The KV cache is a runtime setting (``kv-cache``, ``llmpress eval --kv-bits 4``). Saved in llmpress's own
folder (``llmpress.export.rotated``): no other tool computes int4 activations with a clip ratio.

Measured on SmolLM2-135M (base 33.53 on austen:eval 16 x 1024): ``llmpress compress smollm2-135m --recipe
rotate+gptq-w4a4 --out R && llmpress eval R --kv-bits 4`` gives 126.78 (146.61 before the online Hadamard
before ``o_proj``), far above QuaRot's figures for 7B models. ``python benchmarks/w4a4_parts.py R --windows 2 --layers``
split it (first 2 windows): int4 weights per channel alone (A16) 66.0, + int8 activations 70.5, + int4
activations 145.7, + KV int4 176.0. ``rotate(online=true)+gptq-w4a4-g64`` (GPTQ in groups of 64, each linear's
activation clip searched, ``clip_search``: mostly 0.8 for q/k/v/gate/up, 0.75 for down_proj, 0.7 for o_proj) gives
79.40 with KV int4; ``benchmarks/w4a4_parts.py`` on it (16 windows): KV16 73.82, W4A8 + KV int4 54.22, its int4
weights alone (A16) 49.67. With near-exact weights (``rotate(online=true)+w4a4(bits=8)``) int4 activations score
49.22 (KV16), 1.47x the base: QuaRot's norm folding leaves the activations without their norm's gain, and their
per-token scale is set by channels the gain would silence. ``rotate(online=true, residual=false)`` folds nothing
and rotates every linear's input online instead (``llmpress.rotate.stage``): int4 activations then score 43.02
(KV16) and 46.47 (KV int4), the int4 weights alone 45.91, and ``rotate+gptq-w4a4-g64`` (which uses it) 64.55
with KV int4. SpinQuant's learned rotation (``llmpress.rotate.spin``, folded models only) did not help the
folded GPTQ model (82.92 with it). Without any rotation the same W8A4 model scores 2,325 (each linear's
activation rounding costs 22-70% of its output instead of 8-19%).

Training closes the rest: ``rotate+gptq-w4a4-g64+qat`` trains the W4A4 model with its int4 inputs and its 4-bit
KV cache fake-quantized (``llmpress.distill.qat``, :func:`fake_quant_act_ste`; LLM-QAT), the codes moving on
GPTQ's scales (README, "Training for W4A4").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor, nn

from ..compressed import Compressed, Grid
from ..config import Check, Config
from ..errors import LlmpressError
from ..models.archs import Arch, block_linears, get_blocks, linear_weight
from ..primitives import compute_qparams, dequantize, group_count, qrange, quantize
from ..registry import Method, register
from ..rotate.online import replacing
from .gptq import gptq_recipe
from .rtn import Bits, GroupSize
from .w8a8 import PATHS, int8_matmul

log = logging.getLogger(__name__)

ActBits = Annotated[int, Check(ge=2, le=8, advice="use an integer from 2 to 8")]
Clip = Annotated[float, Check(gt=0, le=1, advice="use a number in (0, 1], e.g. 0.9")]


def quantize_act_per_token(x: Tensor, bits: int, clip: float = 1.0) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token activation quantization with a clip ratio.

    x: (tokens, in) float. Returns codes (tokens, in) int8 in ``qrange(bits)`` and scale (tokens, 1) fp32 =
    clip · the token's absmax / ((2^bits − 1)/2) (1 for an all-zero token), so that ``x ≈ codes * scale``
    (values beyond clip · absmax saturate). bits=8, clip=1 is ``w8a8.quantize_a8_per_token``.
    """
    qmin, qmax = qrange(bits)
    X = x.float()
    scale = X.abs().amax(dim=-1, keepdim=True).div_((2 ** bits - 1) / 2).mul_(clip)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.div(X, scale).round_().clamp_(qmin, qmax).to(torch.int8), scale


def fake_quant_act_ste(x: Tensor, bits: int, clip: float) -> Tensor:
    """Per-token symmetric fake quantization as :class:`W4A4Linear` does it (:func:`quantize_act_per_token`),
    with the straight-through gradient: the value of the dequantized x, the gradient of the identity. What
    quantization-aware training (``llmpress.distill.qat``) and SpinQuant (``llmpress.rotate.spin``) see."""
    codes, scale = quantize_act_per_token(x.detach(), bits, clip)
    return x + ((codes * scale).to(x.dtype) - x.detach())


CLIP_GRID = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)  # the ratios act_clip_search tries


def act_clip_errors(x: Tensor, weight: Tensor, bits: int, clips: tuple[float, ...] = CLIP_GRID) -> Tensor:
    """The output error each activation clip ratio costs a linear: for each c in ``clips``,
    Σ ‖(x̂_c − x)·Wᵀ‖² over the tokens, x̂_c the dequantized :func:`quantize_act_per_token` (x, bits, c).

    x: (tokens, in) the linear's inputs; weight: (out, in) float. Returns (len(clips),) float64, to be summed
    over calibration batches; its argmin is the layer's clip (QuaRot uses 0.9 everywhere)."""
    X, W = x.reshape(-1, weight.shape[1]).float(), weight.float()
    errors = []
    for clip in clips:
        codes, scale = quantize_act_per_token(X, bits, clip)
        errors.append(((codes.float() * scale - X) @ W.T).double().pow(2).sum())
    return torch.stack(errors)


def _group_slices(columns: int, group_size: int) -> list[slice]:
    size = columns if group_size <= 0 else group_size
    return [slice(start, min(start + size, columns)) for start in range(0, columns, size)]


def int_linear(codes: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor, weight_zero: Tensor | None,
               group_size: int, path: str = "auto") -> Tensor:
    """``(codes·s_x) @ ((W_q − z)·s_w)ᵀ`` in fp32 from integer products: one exact int32 GEMM per weight group.

    codes (T, in) int8, x_scale (T, 1); weight (out, in) int8; weight_scale / weight_zero (out, groups)
    (zero None: symmetric); group_size -1: one group per row. Returns (T, out) fp32.
    """
    out, slices = None, _group_slices(weight.shape[1], group_size)
    for g, cols in enumerate(slices):
        acc = int8_matmul(codes[:, cols], weight[:, cols], path)
        if weight_zero is not None:
            acc = acc - codes[:, cols].sum(dim=1, keepdim=True, dtype=torch.int32) * weight_zero[:, g].to(torch.int32)
        if len(slices) == 1:  # per channel: W8A8Linear's arithmetic, in its order
            return acc.to(torch.float32).mul_(x_scale).mul_(weight_scale[:, 0])
        part = acc.to(torch.float32).mul_(weight_scale[:, g])
        out = part if out is None else out.add_(part)
    return out.mul_(x_scale)


class W4A4Linear(nn.Module):
    """``y = x Wᵀ + b`` with ``bits``-bit W (per channel or per group) and ``act_bits``-bit x (dynamic, per token).

    State: ``weight`` int8 (out, in) holding the codes, ``weight_scale`` fp32 (out, groups),
    ``weight_zero_point`` int8 (out, groups) when asymmetric, ``bias`` (out,) or None. Forward:
    codes, s_x = :func:`quantize_act_per_token` (x, act_bits, act_clip), then :func:`int_linear`, in fp32,
    cast back to x's dtype. ``path`` picks the GEMM (``w8a8.int8_matmul``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4, act_bits: int = 4,
                 act_clip: float = 1.0, group_size: int = -1, sym: bool = True, path: str = "auto",
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if path not in PATHS:
            raise LlmpressError(f"W4A4Linear path '{path}' is unknown: use one of {', '.join(PATHS)}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.act_bits, self.act_clip = bits, act_bits, act_clip
        self.group_size, self.sym, self.path = group_size, sym, path
        groups = group_count(in_features, None if group_size <= 0 else group_size)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        if sym:
            self.weight_zero_point = None
        else:
            self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.int8,
                                                                  device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None, *, bits: int,
                   group_size: int, act_bits: int, act_clip: float, path: str = "auto") -> W4A4Linear:
        """A W4A4Linear holding integer ``codes`` (out, in), ``scale``/``zero`` (out, groups; zero None or all
        zero: symmetric) and ``bias`` as they are."""
        qmin, qmax = qrange(bits)
        if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
            raise LlmpressError(f"codes outside the {bits}-bit range [{qmin}, {qmax}]: give the grid's bits")
        sym = zero is None or not bool(zero.any())
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bias is not None, bits=bits, act_bits=act_bits, act_clip=act_clip,
                    group_size=group_size, sym=sym, path=path, device=codes.device,
                    bias_dtype=bias.dtype if bias is not None else torch.float32)
        if tuple(scale.shape) != tuple(layer.weight_scale.shape):
            raise LlmpressError(f"scale shape {tuple(scale.shape)} does not fit a ({out_features}, {in_features}) "
                                f"weight with group_size {group_size}")
        layer.weight.data.copy_(codes.to(torch.int8))
        layer.weight_scale.copy_(scale.float())
        if not sym:
            layer.weight_zero_point.copy_(zero.round().to(torch.int8))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None, *, bits: int = 4, group_size: int = -1,
                   act_bits: int = 4, act_clip: float = 1.0, path: str = "auto") -> W4A4Linear:
        """``weight`` (out, in) rounded to nearest on a symmetric ``bits``-bit grid (``llmpress.primitives``)."""
        group = None if group_size <= 0 else group_size
        scale, zero = compute_qparams(weight.detach(), bits, group, True)
        codes = quantize(weight.detach(), scale, zero, bits, group)
        return cls.from_codes(codes, scale, None, bias, bits=bits, group_size=group_size, act_bits=act_bits,
                              act_clip=act_clip, path=path)

    def zero_points(self) -> Tensor:
        """The weight grid's zero points, fp32 (out, groups): zeros when symmetric."""
        return torch.zeros_like(self.weight_scale) if self.sym else self.weight_zero_point.float()

    def dequantized_weight(self) -> Tensor:
        """The weight the integer codes stand for, fp32 (out, in)."""
        return dequantize(self.weight, self.weight_scale, self.zero_points(),
                          None if self.group_size <= 0 else self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        X = x.reshape(-1, self.in_features)
        codes, x_scale = quantize_act_per_token(X, self.act_bits, self.act_clip)
        Y = int_linear(codes, x_scale, self.weight, self.weight_scale, self.weight_zero_point, self.group_size,
                       self.path)
        if self.bias is not None:
            Y.add_(self.bias.float())
        return Y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def spec(self) -> dict:
        """What a folder records to rebuild this layer (``llmpress.export.rotated``)."""
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "act_bits": self.act_bits,
                "act_clip": self.act_clip, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, spec: dict, path: str = "auto") -> W4A4Linear:
        """An empty layer of the shape and grid :meth:`spec` recorded (its tensors are loaded afterwards)."""
        fields = dict(spec)  # this layer's own spec (JSON types), not a Compressed record
        return cls(in_features, out_features, bool(fields.pop("bias")), path=path, **fields)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"W{self.bits}A{self.act_bits}, group_size={self.group_size}, act_clip={self.act_clip}, "
                f"path={self.path}")


@dataclass(frozen=True)
class W4A4Config(Config):
    """act_bits: activation bits (per token, symmetric, dynamic); act_clip: the fraction of each token's absmax
    the grid spans (QuaRot: 0.9); bits / group_size: the symmetric weight grid of layers the previous stages
    left unquantized (rounded to nearest; a previous quantizer's own grid is kept); path: the integer GEMM;
    clip_search: choose each linear's clip ratio from ``CLIP_GRID`` by :func:`act_clip_errors` on
    ``clip_tokens`` calibration tokens (the recipe's calibration data; act_clip is then unused)."""

    label = "w4a4"

    act_bits: ActBits = 4
    act_clip: Clip = 0.9
    bits: Bits = 4
    group_size: GroupSize = -1
    path: Annotated[str, Check(choices=PATHS, verdict="unknown")] = "auto"
    clip_search: bool = False
    clip_tokens: Annotated[int, Check(ge=1, advice="use a positive integer such as 2048")] = 2048


def _codes_of(result: Compressed | None, weight: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Grid] | None:
    """The previous quantizer's codes, scales, zero points and grid when they still make ``weight``, else None."""
    grid = result.grid if result is not None else None
    if grid is None or result.qweight is None or result.scale is None or grid.act_bits is not None \
            or grid.float_zero or grid.kquant is not None:
        return None
    zero = result.zero if result.zero is not None else torch.zeros_like(result.scale)
    if not torch.equal(dequantize(result.qweight, result.scale, zero, grid.group).to(weight.device), weight.float()):
        return None  # a later stage changed the weight
    return result.qweight, result.scale, None if grid.sym else zero, grid


@torch.no_grad()
def w4a4_model(model: nn.Module, arch: Arch, samples: Tensor | None, cfg: W4A4Config, *, device=None,
               batch_size: int = 8, progress: bool = False, results: dict[str, Compressed]) -> dict[str, dict]:
    """Method kind "model": every block linear becomes a :class:`W4A4Linear` (codes from ``results`` where a
    previous stage quantized the layer, else round to nearest); returns {full name: record}."""
    blocks = get_blocks(model, arch)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    clips = _searched_clips(model, arch, samples, cfg, batch_size) if cfg.clip_search else {}
    done: dict[str, dict] = {}
    for i, block in enumerate(blocks):
        for name, module in block_linears(block, arch).items():
            full = f"{prefix}.{i}.{name}"
            if isinstance(module, W4A4Linear):
                raise LlmpressError(f"{full} is already W{module.bits}A{module.act_bits}: put w4a4 once in the recipe")
            if not isinstance(module, nn.Linear):
                raise LlmpressError(f"w4a4 converts nn.Linear layers; {full} is a {type(module).__name__}")
            weight = linear_weight(module, arch).detach().float()
            bias = module.bias.detach() if isinstance(module.bias, Tensor) else None
            act_clip = clips.get(full, cfg.act_clip)
            found = _codes_of(results.get(full), weight)
            if found is None:
                new = W4A4Linear.from_float(weight, bias, bits=cfg.bits, group_size=cfg.group_size,
                                            act_bits=cfg.act_bits, act_clip=act_clip, path=cfg.path)
                method = "w4a4-rtn"
            else:
                codes, scale, zero, grid = found
                new = W4A4Linear.from_codes(codes, scale, zero, bias, bits=grid.bits, group_size=grid.group_size,
                                            act_bits=cfg.act_bits, act_clip=act_clip, path=cfg.path)
                method = "w4a4"
            block.set_submodule(name, replacing(module, new).to(weight.device))
            grid = Grid(new.bits, new.group_size, new.sym, act_bits=cfg.act_bits)
            zero = None if new.sym else new.weight_zero_point.clone()
            results[full] = Compressed(None, new.weight.detach().clone(), new.weight_scale.clone(), zero,
                                       meta=dict((results.get(full) or Compressed(None)).meta), grid=grid)
            done[full] = {"method": method, "act_clip": act_clip, **grid.to_record()}
    log.info("w4a4: %d linears with %d-bit per-token activations (clip %s)", len(done), cfg.act_bits,
             "searched per linear" if clips else f"{cfg.act_clip:.2f}")
    return done


@torch.no_grad()
def _searched_clips(model: nn.Module, arch: Arch, samples: Tensor | None, cfg: W4A4Config,
                    batch_size: int) -> dict[str, float]:
    """{full linear name: the clip of ``CLIP_GRID`` with the least :func:`act_clip_errors`} on the first
    ``clip_tokens`` calibration tokens, the float-activation model run whole (each linear's input after its
    online Hadamard: a pre-hook registered after it)."""
    if samples is None:
        raise LlmpressError("w4a4(clip_search=true) needs calibration data: give --data (or a calibrated stage "
                            "such as gptq before it), or remove clip_search")
    blocks = get_blocks(model, arch)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    errors: dict[str, Tensor] = {}

    def hook(full: str):
        def fn(module, args):
            weight = linear_weight(module, arch).detach()
            found = act_clip_errors(args[0].to(weight.dtype), weight, cfg.act_bits)
            errors[full] = found if full not in errors else errors[full] + found
        return fn

    handles = [module.register_forward_pre_hook(hook(f"{prefix}.{i}.{name}"))
               for i, block in enumerate(blocks) for name, module in block_linears(block, arch).items()]
    rows = max(1, -(-cfg.clip_tokens // samples.shape[1]))
    device = model.get_input_embeddings().weight.device
    try:
        for start in range(0, min(rows, samples.shape[0]), batch_size):
            model(input_ids=samples[start:min(start + batch_size, rows)].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {full: CLIP_GRID[int(e.argmin())] for full, e in errors.items()}


def _gptq_w4a4() -> dict:
    """GPTQ int4 per output channel, symmetric, act-order, MSE clip search (QuaRot's weights), then W4A4."""
    recipe = gptq_recipe(4, -1, mse=True)
    return {**recipe, "stages": [*recipe["stages"], {"method": "w4a4", "args": {"act_bits": 4, "act_clip": 0.9}}]}


_GPTQ_W4A4 = _gptq_w4a4()


def _gptq_w4a4_g64() -> dict:
    """GPTQ int4 in groups of 64 (act-order, MSE clip search), then W4A4 with each linear's activation clip searched
    on the calibration data; composed after a ``rotate`` stage (see the module docstring)."""
    recipe = gptq_recipe(4, 64, mse=True)
    return {**recipe, "stages": [*recipe["stages"], {"method": "w4a4", "args": {"act_bits": 4, "clip_search": True}}]}


_GPTQ_W4A4_G64 = _gptq_w4a4_g64()
# every linear's input Hadamard-rotated online, the norms' gains left on the activations (residual=false): the
# best W4A4 measured here (see the module docstring)
_ROTATE_INPUTS = {"method": "rotate", "args": {"online": True, "residual": False}}

# int4 weights x int4 per-token activations through the int8 GEMM; QuaRot's with the online rotations
register(Method("w4a4", W4A4Config, w4a4_model, (), "model", calibrated=False, inputs=("results",)), recipes={
    "w4a4": {"stages": [{"method": "w4a4"}]},
    "gptq-w4a4": _GPTQ_W4A4,
    "rotate+gptq-w4a4": {**_GPTQ_W4A4, "stages": [{"method": "rotate", "args": {"online": True}},
                                                  *_GPTQ_W4A4["stages"]]},
    "gptq-w4a4-g64": _GPTQ_W4A4_G64,
    "rotate+gptq-w4a4-g64": {**_GPTQ_W4A4_G64, "stages": [_ROTATE_INPUTS, *_GPTQ_W4A4_G64["stages"]]},
})
