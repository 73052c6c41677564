"""KV-cache quantization: keep attention keys and values in int8/int4, measured in perplexity.

KIVI (Liu et al. 2024, arXiv:2402.02750) and KVQuant (Hooper et al. 2024,
arXiv:2401.18079) store the cached keys and values in a few bits with
asymmetric min-max groups: values per token (groups along ``head_dim``),
keys per token or, as KIVI prefers, per channel (groups of ``group_size``
consecutive tokens of one channel, since key outliers live in fixed
channels). The newest tokens may stay in full precision (KIVI's residual).

The grid is not the one in ``llmpress.primitives``, on purpose: weight grids
widen every group's range to include 0 and use an integer zero point (what
compressed-tensors stores), but KV groups are often one-signed with a large
offset (a key channel living in [10, 12]), where including 0 would waste
most of the levels and the zero point would not fit the integer range. So,
as in KIVI, codes are unsigned ``0 .. 2^b-1`` and each group stores an fp16
scale and an fp16 offset (the group minimum): ``x ≈ q·scale + offset``. The
offset is rounded down and the scale up to fp16, so no value is clipped and
every error is at most half a step.

With ``hadamard`` each head's keys and values are rotated by an orthonormal Hadamard matrix before they
are quantized and rotated back after (QuaRot, arXiv:2404.00456: rotating q and k after RoPE leaves q·kᵀ
unchanged, so doing both rotations inside the cache is the same attention with the rounding in the
rotated basis, where a channel's outliers are spread over the whole head). ``None`` (the default) lets
the model decide: a model rotated with ``rotate(online=true)`` asks for it in its config
(``llmpress.rotate.online``).

The pure grid and its accounting live here; the transformers ``Cache`` that applies it at inference,
and the ``kv-cache`` recipe method, are in ``llmpress.quant.kvcache``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Annotated, NamedTuple

import torch
from torch import Tensor

from ..config import Check, Config
from ..errors import LlmpressError
from ..rotate.online import hadamard_transform, kv_hadamard

log = logging.getLogger(__name__)

KV_BITS = (2, 4, 8, 16)  # 16: no quantization (the cache passes keys and values through)
KEY_AXES = ("token", "channel")
PARAM_BYTES = 2  # scale and offset are stored in fp16
KVBits = Annotated[int, Check(choices=KV_BITS, verdict="not supported",
                              advice="use 2, 4, 8, or 16 for no quantization")]  # a bit width field (16 = off)


@dataclass(frozen=True)
class KVCacheConfig(Config):
    """bits: 2, 4, 8 (16 = off); group_size: channels per group of one token (capped at head_dim:
    64 = one group per head at head_dim 64) or, for keys with key_axis "channel", tokens per group
    of one channel; key_axis: "token" or "channel" (KIVI); residual_tokens: newest tokens kept in
    full precision (KIVI's residual); hadamard: rotate each head's keys and values by a Hadamard matrix
    before quantizing them and back after (None: as the model's config asks, see :func:`resolve_hadamard`)."""

    label = "kv-cache"

    bits: KVBits = 8
    group_size: Annotated[int, Check(ge=1, advice="use a positive integer that divides head_dim, e.g. 64")] = 64
    key_axis: Annotated[str, Check(choices=KEY_AXES, advice="use 'token' or 'channel'")] = "token"
    residual_tokens: Annotated[int, Check(ge=0)] = 0
    hadamard: bool | None = None

    @property
    def enabled(self) -> bool:
        return self.bits < 16


class KVCodes(NamedTuple):
    """Quantized keys or values: ``x ≈ q·scale + offset`` per group.

    q: uint8 codes in [0, 2^bits - 1] (packed by :func:`pack_codes` inside the cache); scale and
    offset: fp16, (b, h, t, head_dim/g) for per-token groups, (b, h, t/g, head_dim) for per-channel.
    """

    q: Tensor
    scale: Tensor
    offset: Tensor


def _round_fp16(t: Tensor, up: bool) -> Tensor:
    """``t`` (fp32) rounded to fp16 towards +inf (``up``) or -inf."""
    h = t.to(torch.float16)
    wrong = h.float() < t if up else h.float() > t
    target = torch.full_like(h, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(h, target), h)


def _groups(x: Tensor, group_size: int, axis: str) -> tuple[Tensor, int]:
    """View (b, h, t, d) as groups; returns the view and the dim a group spans."""
    b, h, t, d = x.shape
    if axis == "token":
        group_size = min(group_size, d)  # a group never spans two heads
        if d % group_size:
            raise LlmpressError(f"kv-cache group_size={group_size} does not divide head_dim {d}: "
                                f"use a divisor of {d}")
        return x.reshape(b, h, t, d // group_size, group_size), -1
    if t % group_size:
        raise ValueError(f"per-channel groups need a multiple of {group_size} tokens, got {t}")
    return x.reshape(b, h, t // group_size, group_size, d), -2


def quantize_kv(x: Tensor, bits: int, group_size: int, axis: str = "token") -> KVCodes:
    """Asymmetric min-max quantization of keys or values (KIVI, arXiv:2402.02750, §3).

    ``x`` (batch, heads, tokens, head_dim), any float dtype. ``axis="token"``: each group is
    ``group_size`` consecutive channels of one token of one head (at most the head: a
    ``group_size`` above head_dim means one group per head); ``axis="channel"``: each group
    is ``group_size`` consecutive tokens of one channel (tokens must be a multiple of it).
    Returns :class:`KVCodes` (unpacked uint8 codes of x's shape, fp16 scale and offset).
    Every element is reproduced to within half its group's scale.
    """
    levels = 2 ** bits - 1
    xg, dim = _groups(x.float(), group_size, axis)
    lo, hi = xg.amin(dim=dim), xg.amax(dim=dim)
    offset = _round_fp16(lo, up=False)
    scale = _round_fp16((hi - offset.float()) / levels, up=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((xg - offset.float().unsqueeze(dim)) / scale.float().unsqueeze(dim)).clamp_(0, levels)
    return KVCodes(q.to(torch.uint8).reshape(x.shape), scale, offset)


def dequantize_kv(codes: KVCodes, group_size: int, axis: str = "token",
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Keys or values (b, h, t, head_dim) in ``dtype`` from unpacked :class:`KVCodes`."""
    qg, dim = _groups(codes.q.float(), group_size, axis)
    x = qg * codes.scale.float().unsqueeze(dim) + codes.offset.float().unsqueeze(dim)
    return x.reshape(codes.q.shape).to(dtype)


def pack_codes(q: Tensor, bits: int) -> Tensor:
    """uint8 codes (..., d) -> (..., d·bits/8) bytes, low bits first (bits 2, 4 or 8)."""
    per = 8 // bits
    if per == 1:
        return q
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    grouped = q.reshape(*q.shape[:-1], q.shape[-1] // per, per).to(torch.int32)
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`."""
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    q = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


def quantized_length(tokens: int, cfg: KVCacheConfig, axis: str) -> int:
    """How many of the oldest ``tokens`` are quantized: all but the residual, in whole groups."""
    if not cfg.enabled:
        return 0
    unit = cfg.group_size if axis == "channel" else 1
    return max(tokens - cfg.residual_tokens, 0) // unit * unit


def quantize_kv_rotated(x: Tensor, cfg: KVCacheConfig, axis: str) -> KVCodes:
    """:func:`quantize_kv` of ``x``, first rotated per head by the Hadamard matrix when ``cfg.hadamard``."""
    return quantize_kv(hadamard_transform(x) if cfg.hadamard else x, cfg.bits, cfg.group_size, axis)


def dequantize_kv_rotated(codes: KVCodes, cfg: KVCacheConfig, axis: str, dtype: torch.dtype) -> Tensor:
    """The inverse of :func:`quantize_kv_rotated` up to rounding: dequantize, then rotate back."""
    x = dequantize_kv(codes, cfg.group_size, axis, torch.float32 if cfg.hadamard else dtype)
    return hadamard_transform(x, inverse=True).to(dtype) if cfg.hadamard else x


def fake_quantize_kv(x: Tensor, cfg: KVCacheConfig, *, key: bool = False) -> Tensor:
    """``x`` (batch, heads, tokens, head_dim) as :class:`QuantizedKVCache` returns it after storing it.

    The oldest :func:`quantized_length` tokens go through quantize/dequantize (keys along
    ``cfg.key_axis`` when ``key``, values always per token; rotated per head first when ``cfg.hadamard``);
    the rest stay exact. Same dtype as x.
    """
    axis = cfg.key_axis if key else "token"
    n = quantized_length(x.shape[-2], cfg, axis)
    if n == 0:
        return x
    head = dequantize_kv_rotated(quantize_kv_rotated(x[..., :n, :], cfg, axis), cfg, axis, x.dtype)
    return torch.cat([head, x[..., n:, :]], dim=-2)


def resolve_hadamard(cfg: KVCacheConfig, model_config) -> KVCacheConfig:
    """``cfg`` with ``hadamard`` decided: as given, or (None) as the model's config asks (``rotate(online=true)``)."""
    if cfg.hadamard is not None:
        return cfg
    return dataclasses.replace(cfg, hadamard=kv_hadamard(model_config))


def _kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head_dim) of a transformers config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_token(cfg: KVCacheConfig, config) -> dict:
    """Analytic cache bytes per token (keys + values, all layers) vs an fp16 cache.

    Codes take ``bits/8`` bytes per element; each group adds an fp16 scale and offset
    (per-channel key groups are shared by ``group_size`` tokens). Residual tokens are not counted.
    """
    layers, kv_heads, head_dim = _kv_shape(config)
    fp16 = layers * 2 * kv_heads * head_dim * 2
    if not cfg.enabled:
        return {"bytes_per_token": float(fp16), "fp16_bytes_per_token": float(fp16), "ratio": 1.0}
    codes = head_dim * cfg.bits / 8
    per_token_groups = head_dim / min(cfg.group_size, head_dim) * 2 * PARAM_BYTES
    key_params = head_dim * 2 * PARAM_BYTES / cfg.group_size if cfg.key_axis == "channel" else per_token_groups
    total = layers * kv_heads * (2 * codes + per_token_groups + key_params)
    return {"bytes_per_token": total, "fp16_bytes_per_token": float(fp16), "ratio": fp16 / total}


def as_kv_config(value: KVCacheConfig | dict | int | None) -> KVCacheConfig | None:
    """A :class:`KVCacheConfig` from a config, a dict of its fields, or a bit width."""
    if value is None or isinstance(value, KVCacheConfig):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return KVCacheConfig(bits=value)
    if isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(KVCacheConfig)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise LlmpressError(f"kv_cache: unknown key '{unknown[0]}'; valid keys are {', '.join(sorted(names))}")
        return KVCacheConfig(**value)
    raise LlmpressError(f"kv_cache must be a KVCacheConfig, a dict or a bit width, not {type(value).__name__}")


def kv_config_from_meta(meta: dict | None) -> KVCacheConfig | None:
    """The KV setting a compressed model asks for: ``meta["kv_cache"]``, else its recipe's last kv-cache stage."""
    if not meta:
        return None
    if meta.get("kv_cache") is not None:
        return as_kv_config(meta["kv_cache"])
    stages = (meta.get("recipe") or {}).get("stages") or []
    found = [s.get("args") or {} for s in stages if isinstance(s, dict) and s.get("method") == "kv-cache"]
    return as_kv_config(found[-1]) if found else None
