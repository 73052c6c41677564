"""The KV-cache quantization runtime: a transformers ``Cache`` on the grid of ``llmpress.quant.kvgrid``.

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
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs

from ..compressed import Compressed
from ..errors import LlmpressError
from ..registry import Method, register
from .kvgrid import (
    KVCacheConfig,
    KVCodes,
    as_kv_config,
    dequantize_kv_rotated,
    fake_quantize_kv,
    kv_bytes_per_token,
    kv_config_from_meta,
    pack_codes,
    quantize_kv_rotated,
    quantized_length,
    resolve_hadamard,
    unpack_codes,
)

log = logging.getLogger(__name__)


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
            new = quantize_kv_rotated(tail[..., :n, :], self.cfg, self.axis)
            new = KVCodes(pack_codes(new.q, self.cfg.bits), new.scale, new.offset)
            self.codes = new if self.codes is None else KVCodes(
                *(torch.cat([old, part], dim=-2) for old, part in zip(self.codes, new)))
            self.quantized += n
            tail = tail[..., n:, :]
        self.tail = tail
        if self.codes is None:
            return tail
        q = unpack_codes(self.codes.q, self.cfg.bits)
        head = dequantize_kv_rotated(KVCodes(q, self.codes.scale, self.codes.offset), self.cfg, self.axis, x.dtype)
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
    """A function making a fresh cache for ``model`` per forward, or None when ``cfg`` asks for nothing.

    ``cfg.hadamard`` None is decided by the model (:func:`~llmpress.quant.kvgrid.resolve_hadamard`)."""
    if cfg is None or not cfg.enabled:
        return None
    return partial(QuantizedKVCache, resolve_hadamard(cfg, model.config), model.config)


class FakeQuantKVLayer(DynamicLayer):
    """A training cache layer: attention sees the keys and values as :class:`QuantizedKVLayer` would return
    them (:func:`~llmpress.quant.kvgrid.fake_quantize_kv`), with the straight-through gradient, so
    quantization-aware training (``llmpress.distill``, ``kv_bits``) learns around the KV cache's rounding."""

    def __init__(self, cfg: KVCacheConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return (keys + (fake_quantize_kv(keys.detach(), self.cfg, key=True) - keys.detach()),
                values + (fake_quantize_kv(values.detach(), self.cfg) - values.detach()))


def training_kv_cache(model: torch.nn.Module, cfg: KVCacheConfig | None) -> Callable[[], Cache] | None:
    """A function making a fresh :class:`FakeQuantKVLayer` cache per training forward (None: ``cfg`` asks for
    nothing). One teacher-forced forward through it computes what :func:`kv_cache_factory`'s cache gives, with
    gradients; full-attention models only (a sliding window would need :class:`QuantizedKVCache`'s bounds)."""
    if cfg is None or not cfg.enabled:
        return None
    config = model.config.get_text_config(decoder=True)
    if any(kind != "full_attention" for kind in get_layer_types_and_kwargs(config)[0]):
        raise LlmpressError("training with a quantized KV cache supports full-attention models only: "
                            "train without kv_bits")
    return partial(Cache, layer_class_to_replicate=partial(FakeQuantKVLayer, resolve_hadamard(cfg, model.config)))


def kv_cache_stage(weight: Tensor, cfg: KVCacheConfig) -> Compressed:
    """The ``kv-cache`` recipe method: weights unchanged (a KV setting is applied at evaluation).

    The setting itself lives in the recipe stored in ``llmpress.json``; see :func:`kv_config_from_meta`.
    """
    return Compressed(weight=weight, meta={"method": "kv-cache"})


class KVCacheSetting:
    """The ``kv-cache`` method's :class:`llmpress.registry.RuntimeSetting`."""

    coerce = staticmethod(as_kv_config)
    from_meta = staticmethod(kv_config_from_meta)
    cache_factory = staticmethod(kv_cache_factory)

    @staticmethod
    def report(cfg: KVCacheConfig, model_config) -> dict:
        cfg = resolve_hadamard(cfg, model_config) if cfg.enabled else cfg
        return {**dataclasses.asdict(cfg), **kv_bytes_per_token(cfg, model_config)}


# KIVI-style asymmetric groups per head per token, applied at evaluation
register(Method("kv-cache", KVCacheConfig, kv_cache_stage, (), "runtime", runtime=KVCacheSetting()), recipes={
    "kv-int8": {"stages": [{"method": "kv-cache", "args": {"bits": 8, "group_size": 64}}]},
    "kv-int4": {"stages": [{"method": "kv-cache", "args": {"bits": 4, "group_size": 64}}]},
})
