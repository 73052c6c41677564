"""Write a compressed model to a folder without ever leaving a half-written one.

Everything goes to a hidden temporary folder beside the target, which is
renamed into place only when complete; an existing target is never
touched. The folder is a plain transformers folder plus ``llmpress.json``
(recipe, per-layer metadata, notes) that ``llmpress eval`` reads for size
accounting.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LlmpressError
from .models.loader import META_FILE


def check_output(out: str | Path) -> Path:
    """Fail early, before any work, if ``out`` exists or its parent is not a writable folder."""
    path = Path(out).expanduser()
    if path.exists():
        raise LlmpressError(f"output folder {path} already exists: choose a new --out path or remove it yourself")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise LlmpressError(f"cannot create {path}: {parent} is not a folder")
    return path


def save_model(model, tokenizer, out: str | Path, meta: dict) -> Path:
    """Save model, tokenizer and ``meta`` to ``out`` via a temporary folder and an atomic rename."""
    path = check_output(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    from .quant.w8a8 import w8a8_quantization_config

    w8a8 = w8a8_quantization_config(model)  # int8 weight+activation layers: a compressed-tensors W8A8 folder
    try:
        if w8a8 is not None:
            model.config.quantization_config = w8a8
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if path.exists():  # appeared while we worked: never replace it
            raise LlmpressError(f"output folder {path} appeared while writing: choose a new --out path")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if w8a8 is not None:
            del model.config.quantization_config
    return path
