"""Token ids, calibration samples and evaluation windows from a text spec.

Calibration draws ``n`` windows at seeded random offsets; evaluation takes
consecutive non-overlapping windows from token 0 (the protocol in which the
reference perplexities were measured). Tokenized texts are cached on disk,
keyed by a hash of the text itself and of the tokenizer, so a changed file
is never served stale.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmpress.data.sources import load_text
from llmpress.errors import LlmpressError
from llmpress.paths import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CHUNK_CHARS = 100_000
_CACHE_VERSION = "1"


def tokenize_text(
    tokenizer: PreTrainedTokenizerBase, text: str, chunk_chars: int = CHUNK_CHARS
) -> torch.LongTensor:
    """1-D token ids of ``text``, no special tokens, tokenized in ~``chunk_chars`` pieces.

    Chunks end after a newline that sits between two non-space characters
    (a single line break inside prose), so byte-level BPE tokenizers with a
    GPT-2 style pre-tokenizer give the same ids as on the whole text. When a
    piece has no such break, any newline is used, and failing that a hard cut.
    """
    ids: list[int] = []
    for piece in _chunks(text, chunk_chars):
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def _chunks(text: str, size: int) -> list[str]:
    pieces, start = [], 0
    while len(text) - start > size:
        end = _break_before(text, start, start + size)
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def _break_before(text: str, start: int, limit: int) -> int:
    """Index just after a newline in ``text[start:limit]``, preferring one inside a paragraph."""
    pos = text.rfind("\n", start, limit)
    fallback = pos + 1 if pos > start else limit
    while pos > start:
        if not text[pos - 1].isspace() and pos + 1 < len(text) and not text[pos + 1].isspace():
            return pos + 1
        pos = text.rfind("\n", start, pos)
    return fallback


def token_ids(tokenizer: PreTrainedTokenizerBase, spec: str) -> torch.LongTensor:
    """``tokenize_text(tokenizer, load_text(spec))``, cached under ``cache_dir()/tokens``."""
    text = load_text(spec)
    key = hashlib.sha256()
    for part in (_CACHE_VERSION, _tokenizer_fingerprint(tokenizer), text):
        key.update(part.encode("utf-8", "surrogatepass") + b"\0")
    path = cache_dir() / "tokens" / f"{key.hexdigest()[:32]}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True).long()
        except (OSError, RuntimeError, EOFError) as e:
            log.warning("ignoring unreadable token cache %s (%s)", path, e)
    ids = tokenize_text(tokenizer, text)
    _save_cache(path, ids)
    return ids


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identity of a tokenizer: its full serialization when it has one, else name and size."""
    name = f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        name += "|" + hashlib.sha256(backend.to_str().encode()).hexdigest()
    return name


def _save_cache(path: Path, ids: torch.Tensor) -> None:
    """Write atomically; a cache we cannot write only costs time, so just log it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(ids.to(torch.int32), f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write token cache %s (%s)", path, e)


def calibration_samples(
    tokenizer: PreTrainedTokenizerBase, spec: str, n: int, seq_len: int, seed: int = 0
) -> torch.LongTensor:
    """``(n, seq_len)`` windows at offsets drawn uniformly from ``[0, len - seq_len]``.

    Offsets come from ``torch.randint`` with ``torch.Generator().manual_seed(seed)``,
    so the same spec, tokenizer and seed always give the same samples.
    """
    _check_positive(n=n, seq_len=seq_len)
    ids = token_ids(tokenizer, spec)
    _check_length(ids, seq_len, spec, what=f"{n} calibration samples")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=gen)
    return torch.stack([ids[o : o + seq_len] for o in offsets.tolist()])


def eval_windows(
    tokenizer: PreTrainedTokenizerBase,
    spec: str,
    seq_len: int,
    max_windows: int | None = None,
    add_bos: bool = False,
) -> torch.LongTensor:
    """``(w, seq_len)`` consecutive non-overlapping windows from token 0; a partial tail is dropped.

    With ``add_bos`` each window is ``[bos]`` followed by the next ``seq_len - 1``
    text tokens (the text is sliced in steps of ``seq_len - 1``), so every window
    still has ``seq_len`` tokens. ``max_windows`` keeps only the first windows.
    """
    _check_positive(seq_len=seq_len, **({} if max_windows is None else {"max_windows": max_windows}))
    ids = token_ids(tokenizer, spec)
    step = seq_len - 1 if add_bos else seq_len
    if step < 1:
        raise LlmpressError("seq_len must be at least 2 when a BOS token is added; use a larger --seq-len")
    _check_length(ids, step, spec, what="one evaluation window")
    count = len(ids) // step
    if max_windows is not None:
        count = min(count, max_windows)
    windows = ids[: count * step].view(count, step)
    if add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise LlmpressError("this tokenizer has no BOS token; evaluate without add_bos")
        windows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise LlmpressError(f"{name} must be at least 1, got {value}")


def _check_length(ids: torch.Tensor, needed: int, spec: str, what: str) -> None:
    if len(ids) < needed:
        raise LlmpressError(
            f"{spec} has only {len(ids)} tokens, fewer than one window of {needed} for {what}; "
            "use a smaller --seq-len, fewer samples, or a longer text"
        )
