"""llama.cpp itself, through ``llama-cpp-python``: perplexity from its logits, prefill and decode speed, and
its own quantizer (``llama_model_quantize``) as the anchor GGUF exports are compared with.

Optional (``pip install 'llmpress[llamacpp]'``; pip builds llama.cpp from source the first time, then its
wheel cache serves it). Perplexity is computed exactly as :func:`llmpress.measure.perplexity` does: each
window scored on its own from llama.cpp's logits of every position, the same token ids (no BOS added), the
mean next-token NLL accumulated in float64. Speed is at batch 1: prefill is one prompt evaluated at once,
decode one token per call, each repeated and the median reported, with llama.cpp's threads set to this
machine's cores unless given. The importance matrix llama.cpp's quantizer takes is what its ``llama-imatrix``
tool collects: per linear, the mean of each input column's squared activation over the calibration tokens
(:func:`importance_matrix`), keyed by GGUF tensor name.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LlmpressError
from .perplexity import window_nll

INSTALL = "pip install 'llmpress[llamacpp]' (builds llama.cpp from source the first time, ~15-40 min)"
# llama.cpp's file types (enum llama_ftype) that its quantizer is asked for here
FTYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_M": 12,
          "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}


def available() -> bool:
    """Whether the ``llama_cpp`` bindings are installed."""
    return importlib.util.find_spec("llama_cpp") is not None


def _module():
    if not available():
        raise LlmpressError(f"llama.cpp's Python bindings are not installed: {INSTALL}")
    import llama_cpp

    return llama_cpp


def threads() -> int:
    """This machine's cores (what llama.cpp is given unless told otherwise)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs model loading to the C stderr; keep it off the terminal."""
    fd = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def load(path: str | Path, n_ctx: int, logits_all: bool, n_threads: int | None = None):
    """A ``llama_cpp.Llama`` for the GGUF file ``path`` on the CPU (one-line error if llama.cpp refuses it)."""
    llama_cpp = _module()
    n = n_threads or threads()
    try:
        with _quiet_stderr():
            return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n,
                                   n_threads_batch=n, logits_all=logits_all, verbose=False, n_gpu_layers=0)
    except (ValueError, RuntimeError) as exc:
        raise LlmpressError(f"llama.cpp cannot load {path}: {exc}; check the file is a complete GGUF of an "
                            "architecture llama.cpp supports") from exc


def logits(path: str | Path, tokens: list[int], n_threads: int | None = None) -> torch.Tensor:
    """llama.cpp's logits (L, vocab) for one sequence of token ids, every position."""
    llm = load(path, len(tokens), logits_all=True, n_threads=n_threads)
    try:
        llm.eval(tokens)
        return torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))
    finally:
        llm.close()


def perplexity(path: str | Path, windows: torch.Tensor, n_threads: int | None = None,
               progress: bool = False) -> dict:
    """Perplexity of the GGUF model ``path`` over ``windows`` (w, L) of token ids, from llama.cpp's logits.

    Returns ``{"loss", "perplexity", "tokens", "windows", "seq_len"}`` like ``measure.perplexity``.
    """
    w, seq_len = windows.shape
    llm = load(path, seq_len, logits_all=True, n_threads=n_threads)
    total = 0.0
    try:
        for row in tqdm(windows, desc="llama.cpp perplexity", unit="window", disable=not progress):
            llm.reset()
            tokens = [int(t) for t in row]
            llm.eval(tokens)
            logits = torch.from_numpy(np.array(llm.scores[:seq_len], dtype=np.float32))
            total += window_nll(logits, row)
    finally:
        llm.close()
    count = w * (seq_len - 1)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 709.0 else math.inf, "tokens": count,
            "windows": w, "seq_len": seq_len}


def speed(path: str | Path, prompt: list[int], decode_tokens: int = 64, repeats: int = 3,
          n_threads: int | None = None) -> dict:
    """Batch-1 prefill (the whole ``prompt`` at once) and decode (``decode_tokens`` single-token steps after
    it) in tokens/s, median over ``repeats`` after one warm-up; decode feeds the prompt's own tokens again,
    so no sampling is timed."""
    n = n_threads or threads()
    llm = load(path, len(prompt) + decode_tokens + 1, logits_all=False, n_threads=n)
    prefill, decode = [], []
    try:
        for i in range(repeats + 1):
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt)
            middle = time.perf_counter()
            for t in range(decode_tokens):
                llm.eval([prompt[t % len(prompt)]])
            end = time.perf_counter()
            if i:  # the first run warms caches and pages the weights in
                prefill.append(len(prompt) / (middle - start))
                decode.append(decode_tokens / (end - middle))
    finally:
        llm.close()
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "prefill_range": [min(prefill), max(prefill)], "decode_range": [min(decode), max(decode)],
            "threads": n, "prompt_tokens": len(prompt), "decode_tokens": decode_tokens, "repeats": repeats}


@torch.no_grad()
def importance_matrix(model: nn.Module, ids: torch.Tensor, names: dict[str, str],
                      progress: bool = False) -> dict[str, np.ndarray]:
    """llama-imatrix's statistic: per linear, the mean over calibration tokens of each input column's squared
    activation. ``names`` maps the linears' module names to the GGUF tensor names the result is keyed by."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def collect(_module, inputs, _output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return collect

    for name, module in model.named_modules():
        if name in names:
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        model.eval()
        for row in tqdm(ids, desc="importance matrix", unit="window", disable=not progress):
            model(input_ids=row[None])
    finally:
        for h in hooks:
            h.remove()
    return {names[n]: (sums[n] / counts[n]).numpy().astype(np.float32) for n in sums}


def quantize(source: str | Path, out: str | Path, ftype: str, imatrix: dict[str, np.ndarray] | None = None,
             n_threads: int | None = None) -> Path:
    """llama.cpp's own quantizer: ``source`` (an F16/F32/BF16 GGUF) to ``out`` at file type ``ftype`` (Q4_0,
    Q4_K_M, ...: its per-tensor choices and fallbacks), weighted by ``imatrix`` when given."""
    llama_cpp = _module()
    if ftype not in FTYPES:
        raise LlmpressError(f"unknown llama.cpp file type '{ftype}': use one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = n_threads or threads()
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep.append((name.encode(), data))
            entries[i].name = keep[-1][0]
            entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = data.size
        entries[len(imatrix)].name = None
        params.imatrix = entries
    with _quiet_stderr():
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise LlmpressError(f"llama.cpp's quantizer failed on {source} ({ftype}, status {status})")
    return Path(out)
