"""Quantization of the token embedding matrix, which a tied model's LM head computes with too.

In SmolLM2-135M the embedding (49,152 x 576, tied with the head) is 28M of 134.5M parameters: at
16 bits 56.6 MB, more than a 60 MB budget leaves. This method rounds it, group-wise along the
hidden dimension (each token's row its own scales), to ``bits`` bits by round-to-nearest
(``llmpress.quant.rtn``'s grid: compressed-tensors' conventions, so the codes pack as a linear's
do), and writes the dequantized matrix back into the shared tensor: the input lookup and the head
both compute with the quantized weights. An untied head is left as it is.

Why RTN and not GPTQ of the head (with the final hidden states' Gram as its Hessian): the matrix
serves two uses. GPTQ moves each column's rounding error onto the columns not yet quantized so
that the *head's* output error under that Gram is smallest, which raises the per-weight error
that the *lookup* passes, unweighted, into the residual stream; round-to-nearest gives the
smallest error per weight, the error both uses see. ``llmpress.sensitivity.embedding_sensitivity``
measures what each setting costs through both uses (Fisher-weighted, like the block linears), so
``llmpress auto`` can weigh it against them.

Recipe stage (a model-level stage: it runs once, before the block stages that follow it, whose
calibration then sees the quantized embeddings)::

    - {method: embedding, args: {bits: 4, group_size: 64}}

The layer's record is the embedding module's name (``model.embed_tokens``) with the grid's keys and
``tied``; size accounting counts it as stored (codes + fp16 scales), and compressed-tensors folders
store its codes (``llmpress.export.compressed_tensors``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..compressed import Compressed
from ..config import Config
from ..errors import LlmpressError
from ..registry import Method, register
from .qlinear import dequantize_packed, packed_tensors
from .rtn import Bits, GroupSize, RTNConfig, rtn


@dataclass(frozen=True)
class EmbeddingConfig(Config):
    """bits: 2–8; group_size: hidden dimensions per scale (-1 = one scale per token row); sym: zero point
    fixed at 0; mse: search each group's clip range (``llmpress.primitives.search_qparams``)."""

    label = "embedding"

    bits: Bits = 8
    group_size: GroupSize = 64
    sym: bool = True
    mse: bool = False


def quantize_embedding(weight: Tensor, cfg: EmbeddingConfig) -> Compressed:
    """Round-to-nearest of the embedding ``weight`` (vocab, hidden): per token row, one scale (and zero
    point unless ``sym``) per ``group_size`` hidden dimensions. Returns the codes (int8, (vocab, hidden)),
    scales and zero points (vocab, groups) and the dequantized weight (fp32)."""
    if weight.dim() != 2:
        raise LlmpressError(f"an embedding matrix is (vocab, hidden), got shape {tuple(weight.shape)}")
    result = rtn(weight.float(), RTNConfig(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, mse=cfg.mse))
    meta = {"method": "embedding", "mse": True} if cfg.mse else {"method": "embedding"}
    return dataclasses.replace(result, meta=meta)


def embedding_module(model: nn.Module) -> tuple[str, nn.Module, bool]:
    """(name, module, tied) of the model's input embedding; ``tied``: its LM head computes with the same
    tensor. A one-line error when the model has no ``nn.Embedding`` input embedding."""
    getter = getattr(model, "get_input_embeddings", None)
    module = getter() if callable(getter) else None
    name = next((n for n, m in model.named_modules() if m is module), None) if module is not None else None
    if name is None or not isinstance(module, nn.Embedding):
        raise LlmpressError(f"{type(model).__name__} has no nn.Embedding input embedding to quantize: "
                            "remove the embedding stage")
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return name, module, head is not None and getattr(head, "weight", None) is module.weight


def embedding_stage(model: nn.Module, arch, samples, cfg: EmbeddingConfig, *, device, batch_size: int,
                    progress: bool, results: dict[str, Compressed]) -> dict[str, dict]:
    """The model-level stage: quantize the input embedding in place (the tied head with it); its codes go into
    ``results`` for export; returns ``{name: record}``."""
    name, module, tied = embedding_module(model)
    W = module.weight.detach()
    result = quantize_embedding(W, cfg)
    with torch.no_grad():
        module.weight.copy_(result.weight.to(W.dtype))
    results[name] = dataclasses.replace(result, weight=None, qweight=result.qweight.cpu(), scale=result.scale.cpu(),
                                        zero=None if result.zero is None else result.zero.cpu())
    return {name: dict(result.record(), shape=list(W.shape), tied=tied)}


class QuantizedEmbedding(nn.Module):
    """An ``nn.Embedding`` whose matrix is kept as packed codes: the buffers of a packed linear
    (``weight_packed``, ``weight_scale``, ``weight_zero_point`` when asymmetric, ``weight_shape``; see
    ``llmpress.quant.qlinear``) with (vocab, hidden) as (out, in); the lookup dequantizes the matrix.
    It is what a compressed-tensors folder stores for a quantized embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None = -1,
                 sym: bool = True, padding_idx: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.dtype = dtype

    @classmethod
    def from_compressed(cls, embedding: nn.Embedding, result: Compressed, grid) -> QuantizedEmbedding:
        """``embedding`` quantized as ``result`` on ``grid`` (bits, group_size, sym)."""
        weight = embedding.weight
        if result.qweight is None or tuple(result.qweight.shape) != tuple(weight.shape):
            raise LlmpressError(f"codes of shape {None if result.qweight is None else tuple(result.qweight.shape)} "
                                f"do not fit an embedding of {tuple(weight.shape)}: pass the result computed for it")
        module = cls(weight.shape[0], weight.shape[1], grid.bits, grid.group_size, grid.sym, embedding.padding_idx,
                     weight.dtype)
        for name, tensor in packed_tensors(result, grid.bits, grid.group_size, grid.sym, weight.dtype).items():
            module.register_buffer(name, tensor.to(weight.device))
        return module

    def dequantized_weight(self) -> Tensor:
        zero = None if self.sym else self.weight_zero_point
        return dequantize_packed(self.weight_packed, self.weight_scale, zero, self.bits, self.group_size,
                                 self.embedding_dim)

    def forward(self, ids: Tensor) -> Tensor:
        return nn.functional.embedding(ids, self.dequantized_weight(), self.padding_idx)


def embedding_recipe(bits: int, group: int = 64) -> dict:
    return {"stages": [{"method": "embedding", "args": {"bits": bits, "group_size": group}}]}


register(Method("embedding", EmbeddingConfig, embedding_stage, kind="model", calibrated=False,
                inputs=("results",)),
         recipes={"embed-w8-g64": embedding_recipe(8), "embed-w4-g64": embedding_recipe(4),
                  "embed-w3-g64": embedding_recipe(3)})

