"""One table of folder formats: how a compressed model is written, and how a folder is read back.

Every storage format llmpress writes is one entry of :data:`FORMATS` (a
:class:`~llmpress.export.base.Format`: detect / load / fits / can_save / save / readers), defined
in its own module next to its code and listed here in the order "auto" tries them:

==============  ===========================================  ==========================================
entry           on disk                                      "auto" chooses it when
==============  ===========================================  ==========================================
rotated         ``rotated.safetensors`` + config             the model computes online Hadamard transforms
                "llmpress_rotated" (``export/rotated.py``)   (``rotate(online=true)``) or has W4A4 layers
low-rank        ``lowrank.safetensors`` + config "llmpress"  the model has factorized (LowRankLinear)
                (``export/lowrank.py``)                      layers
codebook        ``codebook.safetensors`` (codes + lookup     some linear is quantized on a non-uniform
                tables) + config "llmpress"                  (codebook) grid
                (``export/codebook.py``)
pack-quantized  compressed-tensors pack-quantized            some linear is weight-only quantized, every
                (``export/compressed_tensors.py``)           such layer with its codes, no GPT-2 Conv1D
int-quantized   compressed-tensors int-quantized, W8A8       the model has W8A8Linear layers
                (``export/w8a8.py``)
sparse          compressed-tensors sparse(-24)-bitmask       never ("compressed-tensors" on a pruned,
                (``export/sparse.py``)                       unquantized model): transformers 5.x
                                                             cannot read it, dense it can
dense           plain transformers (``export/dense.py``)     everything else
==============  ===========================================  ==========================================

The three loops over the table are here: :func:`choose` (which entry saves a compressed model;
``llmpress.compress`` and ``llmpress.save``'s callers), :func:`detect` / :func:`load` (which entry
reads a folder; ``llmpress.load_model``) and :func:`readers`. ``format="auto"`` takes the first
entry that fits the model and can store it exactly; one that fits but refuses (``can_save``
gives the one-line reason, e.g. HQQ's float zero points for pack-quantized) is skipped with a
warning, and dense, last, stores everything else exactly. ``format="compressed-tensors"`` /
``"dense"`` take the first entry of that family that fits (else the family's first) and raise
its refusal as an ``LlmpressError`` (the CLI's exit 2).

A module, not a package: ``llmpress.export`` already is the formats package (one module per
format, :mod:`.base` for the entry's shape); this module is only its table and the loops over it,
so adding a format is one module with a ``FORMAT`` and one line in :data:`FORMATS`. A GGUF writer
would be such a line; GGUF files are read today by :mod:`.gguf` (a file, not a folder, so
``llmpress.load_model`` tries it before the table).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..compressed import Compressed
from ..errors import LlmpressError
from . import codebook, compressed_tensors, dense, lowrank, rotated, sparse, w8a8
from .base import Folder, Format
from .tools import LLMPRESS

log = logging.getLogger(__name__)

FORMATS: tuple[Format, ...] = (rotated.FORMAT, lowrank.FORMAT, codebook.FORMAT, compressed_tensors.FORMAT,
                                w8a8.FORMAT, sparse.FORMAT, dense.FORMAT)
REQUESTS = ("auto", *dict.fromkeys(f.family for f in FORMATS if f.family))  # auto, compressed-tensors, dense


def choose(request: str, model: nn.Module, layers: dict, results: dict[str, Compressed]) -> Format:
    """The entry that saves this compressed model for ``format=request`` (see the module docstring).

    ``layers``/``results``: the compression's per-layer meta and :class:`Compressed` per layer ({} when
    only the model is known: then no entry that needs codes fits).
    """
    if request not in REQUESTS:
        raise LlmpressError(f"unknown format '{request}': use one of {', '.join(REQUESTS)}")
    if rotated.FORMAT.fits(model, layers, results):  # online rotations, W4A4: only llmpress's own folder holds them
        if request != "auto":
            raise LlmpressError(f"format {request} cannot hold this model's online rotations or W4A4 layers: use "
                                "--format auto (llmpress's rotated folder)")
        reason = rotated.FORMAT.can_save(model, layers, results)
        if reason is not None:  # never fall through to a format that would drop the online transforms
            raise LlmpressError(reason)
        return rotated.FORMAT
    if request != "auto":
        family = [f for f in FORMATS if f.family == request]
        chosen = next((f for f in family if f.fits(model, layers, results)), family[0])
        reason = chosen.can_save(model, layers, results)
        if reason is not None:
            raise LlmpressError(reason)
        return chosen
    for entry in FORMATS:
        if not entry.auto or not entry.fits(model, layers, results):
            continue
        reason = entry.can_save(model, layers, results)
        if reason is None:
            return entry
        log.warning("%s cannot store this model exactly (%s): trying the next format", entry.name, reason)
    raise LlmpressError(f"no format can store this model exactly: {dense.FORMAT.can_save(model, layers, results)}")


def save(model: nn.Module, tokenizer, out: str | Path, meta: dict, layers: dict | None = None,
         results: dict[str, Compressed] | None = None, format: str = "auto") -> Path:
    """Write ``model`` to ``out`` in the entry :func:`choose` picks; ``meta`` goes into ``llmpress.json``.

    Without ``layers``/``results`` the model is stored as it stands: factorized, W8A8 or dense.
    """
    layers, results = layers or {}, results or {}
    entry = choose(format, model, layers, results)
    return entry.save(model, tokenizer, out, meta, layers, results)


def detect(folder: Folder | dict | str | Path) -> Format | None:
    """The entry that reads ``folder`` (a :class:`Folder`, a config dict or a folder path); None when the
    folder is in none of llmpress's formats (another quantization method, another compressed-tensors scheme)."""
    folder = folder if isinstance(folder, Folder) else Folder.of(folder)
    # on what llmpress writes the entries are exclusive (tests/test_formats.py); elsewhere the first one wins
    return next((f for f in FORMATS if f.detect(folder)), None)


def load(path: Path, config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of the folder (or hub id) ``path`` whose transformers config is ``config``.

    A folder in none of the table's formats goes to transformers as it is: compressed-tensors
    schemes llmpress does not write through ``load_compressed_tensors`` (dequantized), anything
    else with every weight required (the dense entry's loader).
    """
    folder = Folder(path, config.to_dict())
    entry = detect(folder)
    if entry is not None:
        return entry.load(path, config, dtype)
    if folder.quantization:
        return compressed_tensors.load_compressed_tensors(path, dtype)
    return dense.load(path, config, dtype)


def folder_format(folder_meta: Folder | dict | str | Path) -> str:
    """The storage format a folder (or its ``config.json`` as a dict) is in: dense | pack-quantized |
    pack-quantized-mixed | int-quantized | sparse-bitmask | sparse-24-bitmask | low-rank | unknown."""
    folder = folder_meta if isinstance(folder_meta, Folder) else Folder.of(folder_meta)
    entry = detect(folder)
    return entry.describe(folder.config) if entry is not None else "unknown"


def readers(folder_meta: Folder | dict | str | Path) -> list[str]:
    """The tools that read this folder with llmpress's numbers (``llmpress.export.tools`` has the table).

    ``["llmpress"]`` means llmpress only: other tools refuse the folder with an error (they never run it
    with random weights); a folder in none of the table's formats is also llmpress only, conservatively.
    """
    folder = folder_meta if isinstance(folder_meta, Folder) else Folder.of(folder_meta)
    entry = detect(folder)
    return entry.readers(folder.config) if entry is not None else [LLMPRESS]
