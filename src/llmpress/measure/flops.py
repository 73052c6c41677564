"""Analytic forward FLOPs per token (2 FLOPs per multiply-add).

Counted from the model's actual linear weights when a model is given, so
structured pruning and low-rank factorization show up; otherwise from the
config. Attention score/value products are charged at the average causal
context. Elementwise work (norms, activations, softmax) is ignored.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmpress.compressed import Sparsity
from llmpress.errors import LlmpressError
from llmpress.measure.size import nonzero_count

log = logging.getLogger(__name__)

# Model types whose MLP is up -> act -> down (2 matrices), not gated (3).
UNGATED_MLP = {"gpt2", "gpt_neox", "opt", "gptj", "gpt_bigcode", "bloom", "falcon", "phi", "starcoder2"}


def _text_config(config):
    """The language-model part of a (possibly multimodal) config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _attn_dims(cfg) -> tuple[int, int, int, int]:
    """(hidden, layers, heads, head_dim) from a text config."""
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return hidden, int(cfg.num_hidden_layers), heads, int(head_dim)


def _avg_context(seq_len: int, window: int | None) -> float:
    """Average keys attended per query over a causal sequence of ``seq_len``.

    Full attention: ``seq_len / 2``. A sliding window ``W < seq_len`` caps it:
    ``(W^2/2 + (seq_len - W) * W) / seq_len``.
    """
    if window is None or window >= seq_len:
        return seq_len / 2
    return (window * window / 2 + (seq_len - window) * window) / seq_len


def attention_flops(config, seq_len: int) -> int:
    """Score (QK^T) and value (AV) products per token, summed over layers.

    Per layer ``2 * 2 * n_heads * head_dim * ctx``; layers marked
    ``sliding_attention`` in ``config.layer_types`` use a windowed context.
    """
    cfg = _text_config(config)
    _hidden, n_layers, heads, head_dim = _attn_dims(cfg)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers
    window = getattr(cfg, "sliding_window", None)
    total = 0.0
    for kind in layer_types[:n_layers]:
        ctx = _avg_context(seq_len, window if kind == "sliding_attention" else None)
        total += 2 * 2 * heads * head_dim * ctx
    return int(round(total))


def _config_linear_shapes(config) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Block linear shapes (out, in) for all layers, and the lm_head shape."""
    cfg = _text_config(config)
    hidden, n_layers, heads, head_dim = _attn_dims(cfg)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None)
    inter = int(inter or getattr(cfg, "n_inner", None) or 4 * hidden)
    attn = [(heads * head_dim, hidden), (kv * head_dim, hidden), (kv * head_dim, hidden), (hidden, heads * head_dim)]
    n_mlp = 2 if getattr(cfg, "model_type", "") in UNGATED_MLP else 3
    mlp = [(inter, hidden)] * (n_mlp - 1) + [(hidden, inter)]
    head_in = int(getattr(cfg, "word_embed_proj_dim", None) or hidden)
    return (attn + mlp) * n_layers, (int(cfg.vocab_size), head_in)


def _density(spec: dict | None, weight: torch.Tensor | None, name: str | None = None,
             nonzero: dict[str, int] | None = None) -> float:
    """Fraction of non-zero weights: from the compression record, else counted (a meta weight's count from
    ``nonzero`` by ``name``, see ``size.nonzero_count``)."""
    if spec is not None:
        sparsity = Sparsity.of(spec)
        if sparsity is None:
            return 1.0
        return sparsity.nm[0] / sparsity.nm[1] if sparsity.nm is not None else 1.0 - sparsity.fraction
    if weight is None or weight.numel() == 0:
        return 1.0
    return nonzero_count(weight, name, nonzero) / weight.numel()


def _is_int_linear(module) -> bool:
    """Runtime quantized linears (W8A8Linear) that keep an (out, in) ``weight``."""
    return hasattr(module, "in_features") and hasattr(module, "out_features") and isinstance(
        getattr(module, "weight", None), torch.Tensor)


def _model_linear_flops(model, layers: dict, nonzero: dict[str, int] | None = None) -> dict:
    """Dense and zero-discounted FLOPs of every Linear / Conv1D in ``model``."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    out = {"linear": 0, "lm_head": 0, "sparse_linear": 0.0, "sparse_lm_head": 0.0}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) and not _is_int_linear(module):
            continue
        dense = 2 * module.weight.numel()
        key = "lm_head" if module is head else "linear"
        # The LM head's zeros are padding-token rows, not pruning: count them only if listed.
        counted = module.weight if key == "linear" else None
        sparse = dense * _density(layers.get(name), counted, f"{name}.weight", nonzero)
        out[key] += dense
        out["sparse_" + key] += sparse
    return out


def _config_linear_flops(config, layers: dict) -> dict:
    """Dense FLOPs from config shapes; listed layers' sparsity discounted."""
    blocks, head = _config_linear_shapes(config)
    linear = sum(2 * o * i for o, i in blocks)
    lm_head = 2 * head[0] * head[1]
    saved = 0.0
    for name, spec in layers.items():
        shape = spec.get("shape")
        if shape is None:
            raise LlmpressError(f"flops_per_token: layer {name!r} needs a shape when no model is given")
        saved += 2 * shape[0] * shape[1] * (1.0 - _density(spec, None))
    return {"linear": linear, "lm_head": lm_head, "sparse_linear": linear - saved, "sparse_lm_head": lm_head}


def flops_per_token(config, seq_len: int, layers: dict | None = None, model=None,
                    nonzero: dict[str, int] | None = None) -> dict:
    """Forward FLOPs per token at sequence length ``seq_len``.

    ``linear``: 2 x weight elements of every block Linear/Conv1D (the model's
    real shapes if ``model`` is given, else derived from ``config``);
    ``lm_head``: 2 x vocab x hidden; ``attention``: see
    :func:`attention_flops`. ``sparse_flops_per_token`` discounts zero
    weights (from ``layers`` records where listed, otherwise counted in the
    model's block weights; the LM head only when listed, since its zero rows
    are padding tokens); sparsity never lowers ``flops_per_token`` itself. ``nonzero``: the non-zero counts of
    a skeleton's meta weights by name (a streamed evaluation, ``llmpress.measure.streamed``).
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise LlmpressError(f"flops_per_token: seq_len must be a positive integer, got {seq_len!r}")
    layers = layers or {}
    if model is not None:
        lin = _model_linear_flops(model, layers, nonzero)
    else:
        lin = _config_linear_flops(config, layers)
    attention = attention_flops(config, seq_len)
    total = lin["linear"] + lin["lm_head"] + attention
    sparse = int(round(lin["sparse_linear"] + lin["sparse_lm_head"])) + attention
    log.debug("flops/token %d (linear %d, attention %d, lm_head %d)", total, lin["linear"], attention, lin["lm_head"])
    return {
        "flops_per_token": int(total),
        "linear": int(lin["linear"]),
        "attention": attention,
        "lm_head": int(lin["lm_head"]),
        "sparse_flops_per_token": sparse,
        "seq_len": seq_len,
    }
