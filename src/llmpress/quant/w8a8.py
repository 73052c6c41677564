"""A runtime W8A8 linear: int8 weights, int8 activations, an int8 GEMM with int32 accumulation.

SmoothQuant (Xiao et al. 2022, arXiv:2211.10438) makes activations easy to
quantize so that a linear can run as ``Y = (s_x s_w) ⊙ (X_q W_qᵀ)``: weights
quantized once per output channel, activations quantized on the fly per
token (the paper's "O1"/"O2" dynamic per-token setting), the product of
integer codes accumulated exactly in int32 and rescaled once.

Both grids follow llmpress.primitives (compressed-tensors' symmetric
convention at 8 bits): scale = absmax / 127.5, codes in [-128, 127].

The integer GEMM runs on ``torch._int_mm`` where it is available, correct
and fast (on CPU: oneDNN, when the CPU has AVX512-VNNI, AVX-VNNI or AMX; on
an AVX2-only CPU oneDNN's int8 fallback measured 20x slower than the fp32
emulation, 3.4 s vs 0.16 s for 2048x576x1536; on CUDA: M > 16 and K, N
multiples of 8), else on an exact fp32 emulation: |code| <= 128, so a dot
product over k <= 1024 columns is an integer of magnitude <= 128²·1024 =
2^24, which fp32 (and every partial sum of it) represents exactly; longer
rows are split into chunks of 1024 columns whose int32 results are summed.
Both paths give the same int32 accumulator, so a W8A8Linear computes the
same numbers whichever path runs.

Saved, a W8A8 model is a compressed-tensors "int-quantized" checkpoint:
``weight`` int8 and ``weight_scale`` (out, 1) per linear, and
:func:`w8a8_quantization_config` in ``config.json`` (int8 channel weights,
int8 dynamic per-token input activations), which vLLM serves with its int8
kernels. :func:`load_w8a8_folder` reads it back into W8A8Linear modules.

Read back by plain transformers (5.24, compressed-tensors 0.20), measured on SmolLM2-135M
(smoothquant-w8a8, 32 x 256 calibration, 256 tokens of text, eager attention):

* ``from_pretrained(folder)`` (the default) keeps the scheme: weights decompressed to
  ``codes * scale``, activations fake-quantized per token (the same absmax / 127.5 grid), then a
  float GEMM. With that arithmetic put into W8A8Linear, its logits equal transformers' bit for
  bit (max |Δ| 0): every code, scale, folded SmoothQuant norm and ignored layer is stored right.
  Against our exact int32 GEMM: max |Δlogit| 6.8, top-1 agreement 95.3%, perplexity 21.67 vs
  21.98. The sums differ in the last float bits, which moves an activation across an int8
  rounding boundary now and then (first in layer 0's gate_proj: input |Δ| 9e-7, output 9e-3),
  and 30 layers of int8 activations amplify that. Switching only our attention kernel (eager to
  sdpa) gives the same spread (max 5.8, top-1 93.4%): it is the model's sensitivity, not a
  storage error, and no tolerance tighter than that holds between two correct implementations.
* ``CompressedTensorsConfig(dequantize=True)`` (what pack-quantized folders need) drops the
  activation quantization: a W8A16 model, equal bit for bit to W8A8Linear without activation
  quantization (max |Δ| 7.5 and top-1 94.1% against ours; the 4.25 / 90.6% in issue 19 is this
  case, most likely). Load W8A8 folders without it.

``tests/test_plain_transformers.py`` checks all three relations on a tiny model.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..errors import LlmpressError
from ..primitives import compute_qparams, quantize

log = logging.getLogger(__name__)

INT8_MIN, INT8_MAX = -128, 127
SYM_LEVELS = (INT8_MAX - INT8_MIN) / 2  # 127.5: compressed-tensors' symmetric 8-bit divisor
FP32_EXACT_COLUMNS = 2 ** 24 // (128 * 128)  # 1024: longest exact fp32 dot product of int8 codes
PATHS = ("auto", "int_mm", "fp32")


def quantize_w8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 weight quantization (round to nearest).

    weight: (out, in) float. Returns codes (out, in) int8 in [-128, 127] and
    scale (out, 1) fp32 = row absmax / 127.5 (1 for an all-zero row), so that
    ``weight ≈ codes * scale``.
    """
    scale, zero = compute_qparams(weight.detach(), 8, None, True)
    return quantize(weight.detach(), scale, zero, 8, None), scale


def quantize_a8_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token int8 activation quantization.

    x: (tokens, in) float. Returns codes (tokens, in) int8 in [-128, 127] and
    scale (tokens, 1) fp32 = the token's absmax / 127.5 (1 for an all-zero
    token), so that ``x ≈ codes * scale``; codes = clamp(round(x / scale)).
    """
    X = x.float()
    scale = X.abs().amax(dim=-1, keepdim=True).div_(SYM_LEVELS)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.div(X, scale).round_().clamp_(INT8_MIN, INT8_MAX).to(torch.int8), scale


def int_mm_supported(tokens: int, in_features: int, out_features: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` computes this (tokens, in) x (in, out) product correctly here.

    CPU: every shape but in_features == 1 (torch 2.13 returns uninitialised memory for
    K == 1 with N > 1; checked). CUDA: cuBLASLt needs M > 16 and K, N multiples of 8.
    """
    if not hasattr(torch, "_int_mm"):
        return False
    if device.type == "cpu":
        return in_features > 1
    if device.type == "cuda":
        return tokens > 16 and in_features % 8 == 0 and out_features % 8 == 0
    return False


def int_mm_fast(device: torch.device) -> bool:
    """Whether ``torch._int_mm`` is faster than the fp32 emulation here: CUDA, or a CPU with int8 dot products."""
    if device.type != "cpu":
        return device.type == "cuda"
    return _cpu_has_int8_dot()


@functools.cache
def _cpu_has_int8_dot() -> bool:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: trust torch's dispatch level
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _fp32_int_mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact a @ bᵀ (int8 codes) in fp32, FP32_EXACT_COLUMNS columns at a time; int32 (M, N)."""
    out: Tensor | None = None
    for start in range(0, max(a.shape[1], 1), FP32_EXACT_COLUMNS):
        cols = slice(start, start + FP32_EXACT_COLUMNS)
        part = torch.mm(a[:, cols].float(), b[:, cols].float().t()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


def int8_matmul(a: Tensor, b: Tensor, path: str = "auto") -> Tensor:
    """Exact integer product of int8 codes: a (M, K) @ b (N, K)ᵀ -> int32 (M, N).

    path: "int_mm" (``torch._int_mm``; fails where it is unsupported), "fp32"
    (chunked exact fp32 emulation) or "auto" (int_mm where
    :func:`int_mm_supported` and :func:`int_mm_fast`, else fp32). All paths return identical results
    (|result| < 2^31 needs K < 131072).
    """
    if path not in PATHS:
        raise LlmpressError(f"int8 matmul path '{path}' is unknown: use one of {', '.join(PATHS)}")
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_matmul needs int8 (M, K) and (N, K), got {a.dtype} {tuple(a.shape)}, "
                         f"{b.dtype} {tuple(b.shape)}")
    if path == "auto":
        native = int_mm_supported(a.shape[0], a.shape[1], b.shape[0], a.device) and int_mm_fast(a.device)
        path = "int_mm" if native else "fp32"
    if path == "int_mm":
        return torch._int_mm(a.contiguous(), b.t())
    return _fp32_int_mm(a, b)


class W8A8Linear(nn.Module):
    """``y = x Wᵀ + b`` with int8 W (per output channel) and int8 x (dynamic, per token).

    State (compressed-tensors "int-quantized" names): ``weight`` int8 (out, in),
    ``weight_scale`` fp32 (out, 1), ``bias`` (out,) or None. ``weight`` is a
    frozen Parameter so that parameter counts and size accounting see it; the
    scale is a buffer. ``path`` picks the GEMM (see :func:`int8_matmul`).
    Forward: codes, s_x = quantize_a8_per_token(x); acc = int8_matmul(codes, weight)
    (int32, exact); y = acc · s_x · s_wᵀ (+ bias), in fp32, cast back to x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, path: str = "auto",
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if path not in PATHS:
            raise LlmpressError(f"W8A8Linear path '{path}' is unknown: use one of {', '.join(PATHS)}")
        self.in_features, self.out_features, self.path = in_features, out_features, path
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None, path: str = "auto") -> W8A8Linear:
        """A W8A8Linear holding ``weight`` (out, in) quantized by :func:`quantize_w8` and ``bias`` as is."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, path, weight.device,
                    bias.dtype if bias is not None else torch.float32)
        codes, scale = quantize_w8(weight)
        layer.weight.data.copy_(codes)
        layer.weight_scale.copy_(scale)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def dequantized_weight(self) -> Tensor:
        """The weight the integer codes stand for, fp32 (out, in)."""
        return self.weight.float() * self.weight_scale

    def forward(self, x: Tensor) -> Tensor:
        X = x.reshape(-1, self.in_features)
        codes, x_scale = quantize_a8_per_token(X)
        acc = int8_matmul(codes, self.weight, self.path)
        Y = acc.to(torch.float32).mul_(x_scale).mul_(self.weight_scale.t())
        if self.bias is not None:
            Y.add_(self.bias.float())
        return Y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, path={self.path}")


_WEIGHT_ARGS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
_INPUT_ARGS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def w8a8_quantization_config(model: nn.Module) -> dict | None:
    """``config.json``'s compressed-tensors ``quantization_config`` for the W8A8Linear modules of ``model``.

    One config group ("int-quantized": int8 channel weights, int8 dynamic per-token inputs)
    targeting ``Linear``, with every linear that is not W8A8 (lm_head, skipped layers) in
    ``ignore``. None when the model has no W8A8Linear.
    """
    if not any(isinstance(m, W8A8Linear) for m in model.modules()):
        return None
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)))
    group = {"targets": ["Linear"], "weights": dict(_WEIGHT_ARGS), "input_activations": dict(_INPUT_ARGS),
             "output_activations": None, "format": "int-quantized"}
    return {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None}


def is_w8a8_config(qconfig: object) -> bool:
    """Whether a ``quantization_config`` (dict or config object) is the W8A8 scheme written here."""
    if qconfig is None:
        return False
    q = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    groups = list((q.get("config_groups") or {}).values())
    return q.get("format") == "int-quantized" and len(groups) == 1 and all(
        {k: (g.get(part) or {}).get(k) for k in want} == want
        for g in groups for part, want in (("weights", _WEIGHT_ARGS), ("input_activations", _INPUT_ARGS)))


def to_w8a8_modules(model: nn.Module, state: dict[str, Tensor], path: str = "auto") -> list[str]:
    """Replace each linear of ``model`` whose ``<name>.weight`` in ``state`` is int8 with a
    ``<name>.weight_scale`` by an empty W8A8Linear of the same shape; returns their names."""
    names = [name[:-len(".weight")] for name, t in state.items()
             if name.endswith(".weight") and t.dtype == torch.int8 and f"{name}_scale" in state]
    for name in names:
        out_features, in_features = state[f"{name}.weight"].shape
        old = model.get_submodule(name)
        bias = getattr(old, "bias", None)
        model.set_submodule(name, W8A8Linear(in_features, out_features, isinstance(bias, Tensor), path,
                                             bias_dtype=bias.dtype if isinstance(bias, Tensor) else torch.float32))
    return names


def load_w8a8_folder(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM with W8A8Linear modules from a folder saved with :func:`w8a8_quantization_config`.

    The model is built from ``config.json`` (without its quantization_config), its W8A8
    linears swapped in by :func:`to_w8a8_modules`, then every tensor of the folder's
    safetensors files loaded; fails if a weight is missing.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state: dict[str, Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    swapped = to_w8a8_modules(model, state)
    missing, _ = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise LlmpressError(f"{folder} lacks {len(missing)} weights (e.g. {missing[0]}): "
                            "it is not a complete checkpoint")
    model.tie_weights()
    log.info("loaded %d W8A8 linears from %s", len(swapped), folder)
    return model.eval()
