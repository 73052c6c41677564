"""Perplexity of a causal LM over fixed-length token windows.

The loss is computed here from the logits (float32 log-softmax, float64
accumulation) rather than taken from the model's ``labels`` reduction, so
every model family and batch size is scored the same way: the mean
next-token negative log-likelihood over all ``w * (L - 1)`` predictions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmpress.errors import LlmpressError

log = logging.getLogger(__name__)


def _check_windows(windows: torch.Tensor, batch_size: int) -> tuple[int, int]:
    """Validate the window tensor and batch size; return ``(w, L)``."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise LlmpressError("perplexity windows must be a 2-D token tensor of shape (windows, seq_len)")
    if windows.dtype not in (torch.int64, torch.int32):
        raise LlmpressError(f"perplexity windows must hold integer token ids, got dtype {windows.dtype}")
    w, seq_len = windows.shape
    if w < 1 or seq_len < 2:
        raise LlmpressError("perplexity needs at least 1 window of at least 2 tokens, got shape "
                            f"{tuple(windows.shape)}")
    if batch_size < 1:
        raise LlmpressError(f"batch_size must be >= 1, got {batch_size}")
    return int(w), int(seq_len)


def _logits(output) -> torch.Tensor:
    """The logits of a model output (a ModelOutput or a plain tuple)."""
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output[0]


def window_nll(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Sum of next-token NLL for one window: ``logits`` (L, V), ``tokens`` (L,)."""
    nll = F.cross_entropy(logits[:-1].float(), tokens[1:].long(), reduction="none")
    return float(nll.double().sum().item())


def perplexity(
    model,
    windows: torch.LongTensor,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    progress: bool = False,
    cache_factory: Callable[[], Any] | None = None,
) -> dict:
    """Mean next-token cross-entropy and its exponential over ``windows``.

    ``windows`` is a ``(w, L)`` tensor of token ids; each window is scored
    independently (no context carried over). The model must already live on
    ``device``; only the inputs are moved. Logits are reduced one window at a
    time so that at most one ``(L, vocab)`` float32 block exists at once.

    ``cache_factory``, when given, makes a fresh KV cache per batch that the forward
    writes to and attends through (e.g. a quantized KV cache, ``llmpress.quant.kvcache``).

    Returns ``{"loss", "perplexity", "tokens", "windows", "seq_len"}`` where
    ``tokens`` is the number of predictions, ``w * (L - 1)``.
    """
    w, seq_len = _check_windows(windows, batch_size)
    model.eval()
    total_nll = 0.0  # Python float: float64 accumulation
    starts = range(0, w, batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
            batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
            cache = {} if cache_factory is None else {"past_key_values": cache_factory()}
            logits = _logits(model(input_ids=batch, use_cache=bool(cache), **cache))
            for i in range(batch.shape[0]):
                total_nll += window_nll(logits[i], batch[i])
            del logits
    count = w * (seq_len - 1)
    loss = total_nll / count
    ppl = math.exp(loss) if loss < 709.0 else math.inf
    log.debug("perplexity %.4f (loss %.6f) over %d predictions", ppl, loss, count)
    return {"loss": loss, "perplexity": ppl, "tokens": count, "windows": w, "seq_len": seq_len}
