"""Black-box distillation data: the teacher writes text, the student learns it by next-token prediction.

Sequence-level knowledge distillation (Kim & Rush 2016): instead of matching the teacher's
distributions token by token, the student is trained with plain cross-entropy
(``LossConfig(kind="ce")``) on sequences the teacher generated. Prompts are windows of a data spec
(e.g. the first ``prompt_len`` tokens of random ``austen:calib`` windows), or there are none
("data-free", LLM-QAT, Liu et al. 2023: each sequence starts from a random vocabulary token, the
first few continued greedily, the rest sampled), so a model can be recovered without any data.
Sampling uses its own seeded ``torch.Generator`` (temperature, top-k, top-p), never the global RNG.
The result is a JSON-lines file of ``{"text": ...}`` records that the data spec
``jsonl:PATH:text`` reads back like any other text.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import Config
from ..data import calibration_samples
from ..errors import LlmpressError
from .config import AtLeastOne, AtLeastZero, SamplingTemperature, TopP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig(Config):
    """What the teacher writes. ``data``: prompt source (a data spec), or None = data-free;
    ``prompts``: sequences; ``prompt_len``: tokens of each prompt (data-free: 1 random token);
    ``new_tokens``: tokens generated per sequence; ``temperature`` (0 = greedy), ``top_k`` (0 = off),
    ``top_p`` (1 = off); ``greedy_first``: the first generated tokens taken greedily (LLM-QAT's hybrid)."""

    label = "generation"

    data: str | None = "austen:calib"
    prompts: AtLeastOne = 64
    prompt_len: AtLeastOne = 32
    new_tokens: AtLeastOne = 256
    temperature: SamplingTemperature = 1.0
    top_k: AtLeastZero = 50
    top_p: TopP = 1.0
    greedy_first: AtLeastZero = 0
    batch_size: AtLeastOne = 8
    seed: AtLeastZero = 0


def _filter(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Logits with everything outside the top-k and the top-p nucleus set to -inf (rows independent)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass = sorted_logits.softmax(-1).cumsum(-1)
        drop = mass - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits


def next_tokens(logits: Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> Tensor:
    """One token per row of (B, vocab) ``logits``: greedy when ``temperature`` is 0, else sampled."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = _filter(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def sample_continuations(model: nn.Module, prompts: Tensor, cfg: GenerateConfig,
                         generator: torch.Generator | None = None) -> Tensor:
    """(B, P) prompt ids -> (B, P + cfg.new_tokens) ids: the model's continuations, with a KV cache.

    ``generator`` (CPU) drives the sampling; the model runs on the prompts' device.
    """
    model.eval()
    out = model(input_ids=prompts, use_cache=True)
    past, logits, ids = out.past_key_values, out.logits[:, -1], [prompts]
    for t in range(cfg.new_tokens):
        temperature = 0 if t < cfg.greedy_first else cfg.temperature
        token = next_tokens(logits, temperature, cfg.top_k, cfg.top_p, generator)[:, None]
        ids.append(token)
        if t + 1 < cfg.new_tokens:
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
    return torch.cat(ids, dim=1)


def _prompts(tokenizer, cfg: GenerateConfig, generator: torch.Generator, vocab: int) -> Tensor:
    """(prompts, P) ids: windows of ``cfg.data``, or one random non-special token below ``vocab`` each (data-free)."""
    if cfg.data is not None:
        return calibration_samples(tokenizer, cfg.data, cfg.prompts, cfg.prompt_len, cfg.seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = torch.tensor([i for i in range(min(len(tokenizer), vocab)) if i not in special])
    return allowed[torch.randint(len(allowed), (cfg.prompts, 1), generator=generator)]


def generate_dataset(teacher: nn.Module, tokenizer, cfg: GenerateConfig, path: str | Path, *,
                     device: str | torch.device = "cpu", progress: bool = False) -> Path:
    """Write ``cfg.prompts`` teacher-generated texts (prompt + continuation) to the JSON-lines file ``path``.

    One ``{"text": ...}`` record per sequence, written to a temporary file and renamed into place;
    read it back with the data spec ``jsonl:PATH:text``. The teacher is moved to ``device`` and back.
    Returns ``path``.
    """
    from tqdm.auto import tqdm

    path = Path(path).expanduser()
    if tokenizer is None:
        raise LlmpressError("black-box distillation needs the teacher's tokenizer to write text: pass one")
    generator = torch.Generator().manual_seed(cfg.seed)
    prompts = _prompts(tokenizer, cfg, generator, teacher.get_output_embeddings().weight.shape[0])
    device = torch.device(device)
    home = next(teacher.parameters()).device
    teacher.to(device)
    texts = []
    try:
        for start in tqdm(range(0, len(prompts), cfg.batch_size), desc="teacher generates", disable=not progress,
                          leave=False):
            ids = sample_continuations(teacher, prompts[start:start + cfg.batch_size].to(device), cfg, generator)
            texts += tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)
    finally:
        teacher.to(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    os.replace(tmp, path)
    log.info("teacher wrote %d sequences of %d new tokens to %s", len(texts), cfg.new_tokens, path)
    return path


def dataset_spec(path: str | Path) -> str:
    """The data spec that reads a file written by :func:`generate_dataset`."""
    return f"jsonl:{Path(path)}:text"
