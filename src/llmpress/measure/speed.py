"""Wall-clock prefill latency and greedy decode throughput at batch 1, with the spread over repeats and the
machine's load while they ran.

A random prompt is used (speed does not depend on token identity). Decode is
a manual greedy loop over the KV cache so the timed region holds exactly
``new_tokens`` single-token forwards and nothing from the prefill.

A timing taken while other processes compete for the cores measures the machine, not the model. The 1-minute
load average is read before and after the timing; the result is flagged ``busy`` when either reading exceeds the
cores this process may run on by more than :data:`BUSY_MARGIN` (the load average counts our own timing threads
too, so an otherwise idle machine reads at most about ``threads`` <= cores).
"""

from __future__ import annotations

import logging
import os
import statistics
import time

import torch

from llmpress.errors import LlmpressError
from llmpress.progress import bar

log = logging.getLogger(__name__)

BUSY_MARGIN = 0.5  # runnable tasks beyond the cores, on average, before a timing is called busy


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


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask where the OS has one, else all of them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, or None where the OS does not report them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def peak_load(load_before: list[float] | None, load_after: list[float] | None) -> float | None:
    """The larger 1-minute load average around a timing; None when the OS reported neither."""
    loads = [load[0] for load in (load_before, load_after) if load]
    return max(loads) if loads else None


def is_busy(load_before: list[float] | None, load_after: list[float] | None, cpus: int) -> bool | None:
    """True when a 1-minute load average around the timing exceeds ``cpus + BUSY_MARGIN``; None when unknown."""
    peak = peak_load(load_before, load_after)
    return None if peak is None else peak > cpus + BUSY_MARGIN


def _decode(model, out, new_tokens: int, step) -> None:
    """Greedy-generate ``new_tokens`` tokens from a prefill output's cache."""
    past = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        step()


def _timed_run(model, prompt: torch.Tensor, new_tokens: int, device: torch.device, step) -> tuple[float, float]:
    """One prefill + decode; return (prefill seconds, decode seconds). ``step()`` is called after each forward."""
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    t1 = time.perf_counter()
    step()
    _decode(model, out, new_tokens, step)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def speed(
    model,
    device: str | torch.device = "cpu",
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    vocab_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Median prefill latency and decode tokens/s over ``repeats`` runs, their range, and the machine's load.

    Each run does one forward over a ``prompt_len`` random prompt (the prefill,
    timed alone) and then ``new_tokens`` greedy single-token forwards using the
    KV cache (timed together). One untimed warm-up run (1 decode step) comes
    first. The model must already live on ``device``. ``progress`` shows a bar
    over the forwards.

    Besides the medians (``prefill_latency_s``, ``prefill_tokens_per_s``,
    ``decode_tokens_per_s``, ``decode_time_s``) the result has each run's figures
    (``prefill_latency_s_runs``, ``decode_tokens_per_s_runs``), their extremes
    (``*_min``, ``*_max``), ``load_before`` / ``load_after`` (1/5/15-minute load
    averages, None where unknown), ``cpus`` and ``busy`` (see the module docstring).
    """
    if prompt_len < 1 or new_tokens < 1 or repeats < 1:
        raise LlmpressError("speed: prompt_len, new_tokens and repeats must all be >= 1")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(_vocab_size(model, vocab_size), (1, prompt_len), generator=gen).to(device)
    model.eval()
    cpus, load_before = available_cpus(), load_average()
    with torch.inference_mode(), bar(enabled=progress, desc="speed", total=2 + repeats * (1 + new_tokens),
                                     unit="forward") as pbar:
        step = pbar.update
        _timed_run(model, prompt, 1, device, step)
        runs = [_timed_run(model, prompt, new_tokens, device, step) for _ in range(repeats)]
    load_after = load_average()
    prefill = [r[0] for r in runs]
    decode = [new_tokens / r[1] for r in runs]
    busy = is_busy(load_before, load_after, cpus)
    log.debug("prefill %.4fs, decode %.1f tok/s (medians of %d), load %s -> %s on %d cpus",
              statistics.median(prefill), statistics.median(decode), repeats, load_before, load_after, cpus)
    if busy:
        log.info("the machine was busy while timing (load %.1f on %d cores): the speed figures are not comparable",
                    max(load[0] for load in (load_before, load_after) if load), cpus)
    return {
        "prefill_latency_s": statistics.median(prefill),
        "prefill_tokens_per_s": prompt_len / statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
        "decode_time_s": statistics.median(r[1] for r in runs),
        "prefill_latency_s_min": min(prefill),
        "prefill_latency_s_max": max(prefill),
        "decode_tokens_per_s_min": min(decode),
        "decode_tokens_per_s_max": max(decode),
        "prefill_latency_s_runs": prefill,
        "decode_tokens_per_s_runs": decode,
        "repeats": repeats,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cpus": cpus,
        "load_before": load_before,
        "load_after": load_after,
        "busy": busy,
    }
