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

:class:`QuantizedKVCache` is a transformers (v5) ``Cache`` whose layers keep
the packed codes and return dequantized keys and values from ``update``, so
it acts in generation and in one teacher-forced forward alike (pass it with
``use_cache=True``). The KV setting is a runtime property, not a weight
change: the ``kv-cache`` recipe method leaves the weights alone and the
setting is read back from the recipe by ``llmpress.evaluate``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Callable, NamedTuple

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs

from ..compressed import Compressed
from ..config import Check, Config
from ..errors import LlmpressError
from ..registry import Method, register

log = logging.getLogger(__name__)

KV_BITS = (2, 4, 8, 16)  # 16: no quantization (the cache passes keys and values through)
KEY_AXES = ("token", "channel")
PARAM_BYTES = 2  # scale and offset are stored in fp16


@dataclass(frozen=True)
class KVCacheConfig(Config):
    """bits: 2, 4, 8 (16 = off); group_size: channels per group of one token (capped at head_dim:
    64 = one group per head at head_dim 64) or, for keys with key_axis "channel", tokens per group
    of one channel; key_axis: "token" or "channel" (KIVI); residual_tokens: newest tokens kept in
    full precision (KIVI's residual)."""

    label = "kv-cache"

    bits: Annotated[int, Check(choices=KV_BITS, verdict="not supported",
                               advice="use 2, 4, 8, or 16 for no quantization")] = 8
    group_size: Annotated[int, Check(ge=1, advice="use a positive integer that divides head_dim, e.g. 64")] = 64
    key_axis: Annotated[str, Check(choices=KEY_AXES, advice="use 'token' or 'channel'")] = "token"
    residual_tokens: Annotated[int, Check(ge=0)] = 0

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


def fake_quantize_kv(x: Tensor, cfg: KVCacheConfig, *, key: bool = False) -> Tensor:
    """``x`` (batch, heads, tokens, head_dim) as :class:`QuantizedKVCache` returns it after storing it.

    The oldest :func:`quantized_length` tokens go through quantize/dequantize (keys along
    ``cfg.key_axis`` when ``key``, values always per token); the rest stay exact. Same dtype as x.
    """
    axis = cfg.key_axis if key else "token"
    n = quantized_length(x.shape[-2], cfg, axis)
    if n == 0:
        return x
    head = dequantize_kv(quantize_kv(x[..., :n, :], cfg.bits, cfg.group_size, axis), cfg.group_size, axis, x.dtype)
    return torch.cat([head, x[..., n:, :]], dim=-2)


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


class _KVStream:
    """Keys or values of one layer: a quantized prefix (packed codes, fp16 scale/offset) and an exact tail."""

    def __init__(self, cfg: KVCacheConfig, axis: str) -> None:
        self.cfg, self.axis = cfg, axis
        self.codes: KVCodes | None = None
        self.quantized = 0
        self.tail: Tensor | None = None

    def __len__(self) -> int:
        return self.quantized + (0 if self.tail is None else self.tail.shape[-2])

    def append(self, x: Tensor) -> Tensor:
        """Store ``x`` (b, h, t, d); return every stored token, dequantized, in x's dtype."""
        tail = x if self.tail is None else torch.cat([self.tail, x], dim=-2)
        n = quantized_length(tail.shape[-2], self.cfg, self.axis)  # self.quantized is a whole number of groups
        if n:
            new = quantize_kv(tail[..., :n, :], self.cfg.bits, self.cfg.group_size, self.axis)
            new = KVCodes(pack_codes(new.q, self.cfg.bits), new.scale, new.offset)
            self.codes = new if self.codes is None else KVCodes(
                *(torch.cat([old, part], dim=-2) for old, part in zip(self.codes, new)))
            self.quantized += n
            tail = tail[..., n:, :]
        self.tail = tail
        if self.codes is None:
            return tail
        q = unpack_codes(self.codes.q, self.cfg.bits)
        head = dequantize_kv(KVCodes(q, self.codes.scale, self.codes.offset), self.cfg.group_size, self.axis, x.dtype)
        return torch.cat([head, tail], dim=-2)

    def drop_front(self, tokens: int) -> None:
        """Forget up to ``tokens`` oldest tokens, whole groups only (sliding-window layers)."""
        unit = self.cfg.group_size if self.axis == "channel" else 1
        whole = max(tokens, 0) // unit * unit  # keeps later groups aligned to absolute positions
        drop = min(self.quantized, whole)
        if drop:
            rows = drop // unit if self.axis == "channel" else drop
            q, scale, offset = self.codes
            self.codes = KVCodes(q[..., drop:, :], scale[..., rows:, :], offset[..., rows:, :])
            self.quantized -= drop
        left = whole - drop
        if self.quantized == 0 and left > 0 and self.tail is not None:
            self.tail = self.tail[..., left:, :]

    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` to every stored tensor (batch reordering for beam search)."""
        if self.codes is not None:
            self.codes = KVCodes(*(fn(t) for t in self.codes))
        if self.tail is not None:
            self.tail = fn(self.tail)

    def nbytes(self) -> int:
        tensors = list(self.codes or ()) + ([self.tail] if self.tail is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache; ``sliding_window`` set: keeps only what the window needs."""

    is_croppable = False

    def __init__(self, cfg: KVCacheConfig, sliding_window: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.cumulative_length = 0
        self._keys, self._values = _KVStream(cfg, cfg.key_axis), _KVStream(cfg, "token")

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Store the new keys/values; return all visible ones as attention should see them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.cumulative_length
        self.cumulative_length += key_states.shape[-2]
        keys, values = self._keys.append(key_states), self._values.append(value_states)
        if self.sliding_window is not None:
            visible = min(past, self.sliding_window - 1) + key_states.shape[-2]
            keys, values = keys[..., -visible:, :], values[..., -visible:, :]
            for stream in (self._keys, self._values):
                stream.drop_front(len(stream) - (self.sliding_window - 1))
        self.keys, self.values = self._keys.tail, self._values.tail  # the full-precision part
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.sliding_window is None:
            return self.cumulative_length + query_length, 0
        offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        return min(self.cumulative_length, self.sliding_window - 1) + query_length, offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def nbytes(self) -> int:
        """Bytes this layer's cache holds now (codes, scales, offsets and the exact tail)."""
        return self._keys.nbytes() + self._values.nbytes()

    def reset(self) -> None:
        self.__init__(self.cfg, self.sliding_window)

    def crop(self, tokens_to_remove: int) -> None:
        raise LlmpressError("a quantized KV cache cannot be cropped (assisted decoding): use a plain cache there")

    def _each(self, fn: Callable[[Tensor], Tensor]) -> None:
        for stream in (self._keys, self._values):
            stream.apply(fn)
        self.keys, self.values = self._keys.tail, self._values.tail

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._each(lambda t: t[indices, ...])


_SLIDING = ("sliding_attention", "chunked_attention")


class QuantizedKVCache(DynamicCache):
    """A transformers ``DynamicCache`` whose layers store keys/values quantized by ``cfg``.

    With ``config`` (the model's), one layer per decoder layer, sliding-window layers bounded
    like transformers' own; without, layers are made as they are first used (no sliding windows).
    >>> cache = QuantizedKVCache(KVCacheConfig(bits=4), model.config)  # doctest: +SKIP
    >>> model(input_ids=ids, past_key_values=cache, use_cache=True)     # doctest: +SKIP
    """

    def __init__(self, cfg: KVCacheConfig, config=None) -> None:
        self.cfg = cfg
        if config is None:
            Cache.__init__(self, layer_class_to_replicate=partial(QuantizedKVLayer, cfg))
            return
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        layers = []
        for kind, kwargs in zip(layer_types, layer_kwargs):
            if kind == "full_attention":
                layers.append(QuantizedKVLayer(cfg))
            elif kind in _SLIDING:
                layers.append(QuantizedKVLayer(cfg, kwargs["sliding_window"]))
            else:
                raise LlmpressError(f"KV-cache quantization supports full and sliding-window attention layers, "
                                    f"not '{kind}': evaluate this model without a kv-cache setting")
        Cache.__init__(self, layers=layers)

    def nbytes(self) -> int:
        """Bytes the cache holds now, over all layers."""
        return sum(layer.nbytes() for layer in self.layers)


def kv_cache_factory(model: torch.nn.Module, cfg: KVCacheConfig | None) -> Callable[[], Cache] | None:
    """A function making a fresh cache for ``model`` per forward, or None when ``cfg`` asks for nothing."""
    if cfg is None or not cfg.enabled:
        return None
    return partial(QuantizedKVCache, cfg, model.config)


def kv_cache_stage(weight: Tensor, cfg: KVCacheConfig) -> Compressed:
    """The ``kv-cache`` recipe method: weights unchanged (a KV setting is applied at evaluation).

    The setting itself lives in the recipe stored in ``llmpress.json``; see :func:`kv_config_from_meta`.
    """
    return Compressed(weight=weight, meta={"method": "kv-cache"})


def as_kv_config(value: "KVCacheConfig | dict | int | None") -> KVCacheConfig | None:
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


class KVCacheSetting:
    """The ``kv-cache`` method's :class:`llmpress.registry.RuntimeSetting`."""

    coerce = staticmethod(as_kv_config)
    from_meta = staticmethod(kv_config_from_meta)
    cache_factory = staticmethod(kv_cache_factory)

    @staticmethod
    def report(cfg: KVCacheConfig, model_config) -> dict:
        return {**dataclasses.asdict(cfg), **kv_bytes_per_token(cfg, model_config)}


# KIVI-style asymmetric groups per head per token, applied at evaluation
register(Method("kv-cache", KVCacheConfig, kv_cache_stage, (), "runtime", runtime=KVCacheSetting()), recipes={
    "kv-int8": {"stages": [{"method": "kv-cache", "args": {"bits": 8, "group_size": 64}}]},
    "kv-int4": {"stages": [{"method": "kv-cache", "args": {"bits": 4, "group_size": 64}}]},
})
