"""Wall-clock prefill latency and greedy decode throughput at batch 1.

A random prompt is used (speed does not depend on token identity). Decode is
a manual greedy loop over the KV cache so the timed region holds exactly
``new_tokens`` single-token forwards and nothing from the prefill.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from llmpress.errors import LlmpressError

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    """Wait for queued kernels so timings cover the work, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vocab_size(model, vocab_size: int | None) -> int:
    """Vocabulary to draw prompt tokens from."""
    if vocab_size is not None:
        return int(vocab_size)
    embeddings = model.get_input_embeddings()
    return int(embeddings.num_embeddings)


def _decode(model, out, new_tokens: int) -> None:
    """Greedy-generate ``new_tokens`` tokens from a prefill output's cache."""
    past = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)


def _timed_run(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """One prefill + decode; return (prefill seconds, decode seconds)."""
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    t1 = time.perf_counter()
    _decode(model, out, new_tokens)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def speed(
    model,
    device: str | torch.device = "cpu",
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    vocab_size: int | None = None,
    seed: int = 0,
) -> dict:
    """Median prefill latency and decode tokens/s over ``repeats`` runs.

    Each run does one forward over a ``prompt_len`` random prompt (the prefill,
    timed alone) and then ``new_tokens`` greedy single-token forwards using the
    KV cache (timed together). One untimed warm-up run (1 decode step) comes
    first. The model must already live on ``device``.
    """
    if prompt_len < 1 or new_tokens < 1 or repeats < 1:
        raise LlmpressError("speed: prompt_len, new_tokens and repeats must all be >= 1")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(_vocab_size(model, vocab_size), (1, prompt_len), generator=gen).to(device)
    model.eval()
    with torch.inference_mode():
        _timed_run(model, prompt, 1, device)
        runs = [_timed_run(model, prompt, new_tokens, device) for _ in range(repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    log.debug("prefill %.4fs, decode %.4fs for %d tokens", prefill, decode, new_tokens)
    return {
        "prefill_latency_s": prefill,
        "prefill_tokens_per_s": prompt_len / prefill,
        "decode_tokens_per_s": new_tokens / decode,
        "decode_time_s": decode,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
