"""Rotating a model's residual stream without changing what it computes (QuaRot, arXiv:2404.00456, §4).

In a pre-norm transformer with RMSNorm, every read of the residual stream h goes through an RMSNorm and
then linears, and every write is a linear's output added to h. RMSNorm(h) = h/rms(h) ⊙ w; an orthogonal
Q keeps rms(h·Q) = rms(h), so once the scales w are folded into the linears that read the norm
(W ← W·diag(w), w ← 1; :func:`fold_norms`) the whole network can work on h' = h·Q instead of h:

- embedding rows E ← E·Q (the stream starts rotated);
- every linear that reads a norm (q/k/v, gate/up, the head) takes rotated inputs: W ← W·Q;
- every linear that writes the stream (o_proj, down_proj) writes rotated outputs: W ← Qᵀ·W, b ← Qᵀ·b.

Each attention head's values and outputs can be rotated too (QuaRot's per-head Hadamard, SpinQuant's R2):
v rows ← Rᵀ·W_v per KV head and o columns ← W_o·R per query head, exact under GQA because every head shares
R (:func:`rotate_heads`). Weight outliers are spread over all channels, which helps rounding.

A tied head cannot be both E·Q (the embedding) and E·diag(w_final)·Q (the head after folding the final
norm), so :func:`untie_head` gives the head its own copy first: vocab × hidden more parameters
(28.3M, 57 MB at 16 bits, for SmolLM2-135M).

Supported: the Llama-like families of ``models.archs`` with RMSNorm and a sequential residual (llama,
mistral, qwen2, qwen3, smollm3, granite, phi3). :data:`WHY_NOT` says why the others are refused.
Weights are transformed in float64 and written back in their own dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.archs import Arch, get_blocks, linear_weight, set_linear_weight

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "phi3")
_LAYERNORM = ("its LayerNorms subtract the mean and add a bias, which do not commute with a rotation (it would need "
              "SliceGPT's centring of the residual stream first, not implemented)")
_SANDWICH = ("its sandwich norms (post_attention_layernorm, post_feedforward_layernorm) rescale each branch's output "
             "channel by channel before it is added to the residual stream; no rotation of the stream commutes with "
             "that without an extra online rotation after each of them (not implemented)")
WHY_NOT = {"gemma3_text": _SANDWICH, "gemma3": _SANDWICH, "gpt2": _LAYERNORM, "gpt_neox": _LAYERNORM,
           "opt": _LAYERNORM, "phi": _LAYERNORM}


def why_not(model: nn.Module, arch: Arch) -> str | None:
    """None when :func:`rotate_residual` keeps ``model``'s function, else the reason it cannot."""
    if arch.name in WHY_NOT:
        return WHY_NOT[arch.name]
    if arch.name not in ROTATABLE:
        return f"rotation is implemented for {', '.join(ROTATABLE)} only"
    if arch.parallel_residual or len(arch.groups) != 4:
        return "its blocks are not one attention and one MLP sublayer in sequence"
    if final_norm(model, arch) is None:
        return f"no final norm was found next to '{arch.blocks}'"
    for block in get_blocks(model, arch):
        for name, _ in norm_feeds(arch):
            norm = block.get_submodule(name)
            if not type(norm).__name__.endswith("RMSNorm") or getattr(norm, "bias", None) is not None:
                return f"its {name} is a {type(norm).__name__}, not an RMSNorm without bias"
    return None


def norm_feeds(arch: Arch) -> list[tuple[str, tuple[str, ...]]]:
    """(norm, the linears reading it) in a block: the feeds of ``arch`` whose source is not a linear."""
    return [(src, readers) for src, readers in arch.feeds if src not in arch.linear_names]


def writers(arch: Arch) -> tuple[str, ...]:
    """The linears whose outputs are added to the residual stream (o_proj, down_proj)."""
    return arch.groups[1] + arch.groups[3]


def final_norm(model: nn.Module, arch: Arch) -> nn.Module | None:
    """The norm before the head: ``norm`` next to the blocks (``model.norm`` for ``model.layers``)."""
    parent = arch.blocks.rpartition(".")[0]
    try:
        return model.get_submodule(f"{parent}.norm" if parent else "norm")
    except AttributeError:
        return None


def _update(module: nn.Module, arch: Arch, fn) -> None:
    """Apply ``fn`` to a linear's (out, in) weight in float64 and write it back in its own dtype."""
    set_linear_weight(module, arch, fn(linear_weight(module, arch).detach().to(torch.float64)))


@torch.no_grad()
def _fold(norm: nn.Module, readers: list[nn.Module], arch: Arch) -> None:
    scale = norm.weight.detach().to(torch.float64) + arch.norm_offset
    for linear in readers:
        _update(linear, arch, lambda W: W * scale.to(W.device)[None, :])
    norm.weight.fill_(1.0 - arch.norm_offset)


def untie_head(model: nn.Module) -> bool:
    """Give a head tied to the embedding its own copy of the weight; True when it was tied."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return tied


@torch.no_grad()
def fold_norms(model: nn.Module, arch: Arch) -> None:
    """Fold every RMSNorm's scale into the linears reading it (the final one into the head, which is untied
    first); the norms become plain normalizations (weight 1, or 0 under a ``norm_offset`` of 1)."""
    for block in get_blocks(model, arch):
        for name, readers in norm_feeds(arch):
            _fold(block.get_submodule(name), [block.get_submodule(r) for r in readers], arch)
    untie_head(model)
    _fold(final_norm(model, arch), [model.get_output_embeddings()], arch)


@torch.no_grad()
def rotate_residual(model: nn.Module, arch: Arch, Q: Tensor) -> None:
    """Work on h·Q instead of h: embedding and readers ·Q, writers Qᵀ· (norms folded first: :func:`fold_norms`)."""
    Q = Q.to(torch.float64)
    embedding = model.get_input_embeddings()
    embedding.weight.copy_(embedding.weight.to(torch.float64) @ Q.to(embedding.weight.device))
    for block in get_blocks(model, arch):
        for _, readers in norm_feeds(arch):
            for name in readers:
                _update(block.get_submodule(name), arch, lambda W: W @ Q.to(W.device))
        for name in writers(arch):
            linear = block.get_submodule(name)
            _update(linear, arch, lambda W: Q.T.to(W.device) @ W)
            if getattr(linear, "bias", None) is not None:
                linear.bias.copy_(linear.bias.to(torch.float64) @ Q.to(linear.bias.device))
    head = model.get_output_embeddings()
    head.weight.copy_(head.weight.to(torch.float64) @ Q.to(head.weight.device))


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) from the model's config."""
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return heads, kv_heads, head_dim


@torch.no_grad()
def rotate_heads(model: nn.Module, arch: Arch, R: Tensor) -> None:
    """Rotate every attention head's values by R (head_dim, head_dim): v rows Rᵀ· per KV head, o columns ·R
    per query head. Values come from ``v_proj``, or from the last KV rows of a fused ``qkv_proj``."""
    heads, kv_heads, hd = head_layout(model)
    R = R.to(torch.float64)
    (source, *_), (out_name,) = arch.groups[0][-1:], arch.groups[1]
    start = 0 if source.rpartition(".")[2] == "v_proj" else (heads + kv_heads) * hd  # fused qkv: q rows, k rows, v rows

    def rotate_rows(W: Tensor) -> Tensor:  # (rows, ...) with the value rows at [start:]
        V = W[start:].reshape(kv_heads, hd, *W.shape[1:])
        W = W.clone()
        W[start:] = torch.einsum("ji,kj...->ki...", R.to(W.device), V).reshape(kv_heads * hd, *W.shape[1:])
        return W

    for block in get_blocks(model, arch):
        values, out = block.get_submodule(source), block.get_submodule(out_name)
        _update(values, arch, rotate_rows)
        if getattr(values, "bias", None) is not None:
            values.bias.copy_(rotate_rows(values.bias.to(torch.float64)))
        _update(out, arch, lambda W: (W.reshape(W.shape[0], heads, hd) @ R.to(W.device)).reshape(W.shape[0], -1))
