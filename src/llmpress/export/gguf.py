"""GGUF files (llama.cpp): read, checked and dequantized into a plain transformers model.

Reading only, through transformers' GGUF loader (the ``gguf`` package parses the header; no code
runs). The default model ships as GGUF (``llmpress.models.smollm2``), and ``llmpress.load_model``
takes any ``.gguf`` file. A GGUF writer would join the table in ``llmpress.export.formats`` as one
more entry next to this reader.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..errors import LlmpressError, first_line
from .reading import quiet_transformers, reader_errors


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a plain transformers model, with GGUF's quantization_config dropped."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    return plain.eval()


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """Model and tokenizer from a .gguf file, dequantized by transformers (needs the ``gguf`` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except reader_errors() as exc:
        raise LlmpressError(f"cannot read GGUF file {path}: {first_line(exc)}; "
                            "check it is a complete GGUF of a supported architecture") from exc
    return _plain_copy(model).to(dtype), tokenizer


def check_gguf(path: Path) -> None:
    """Parse the GGUF header ourselves and check it describes a model, before transformers builds one from it.

    A cut or corrupted header fails here with the file's name; so does a header whose essential fields are
    missing or disagree with its tensors (transformers would otherwise build a default-sized model from it).
    A file passes once per process and version (size, modification time): the parse takes seconds.
    """
    stat = Path(path).stat()
    _check_gguf(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _check_gguf(file: str, size: int, mtime_ns: int) -> None:
    from gguf import GGUFReader

    path = Path(file)

    try:
        reader = GGUFReader(path)
    except reader_errors() as exc:
        raise LlmpressError(f"cannot read GGUF file {path}: {first_line(exc)}; the file is cut short or "
                            "corrupted: download it again") from exc

    def value(name: str):
        field = reader.fields.get(name)
        return field.contents() if field is not None and field.types else None

    arch = value("general.architecture")
    if not isinstance(arch, str):
        raise LlmpressError(f"GGUF file {path} names no architecture (general.architecture): it is not a model file")
    blocks, width = value(f"{arch}.block_count"), value(f"{arch}.embedding_length")
    names = [t.name for t in reader.tensors]
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    used = {int(n.split(".")[1]) for n in names if n.startswith("blk.") and n.split(".")[1].isdigit()}
    problem = None
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
        problem = f"{arch}.block_count is {blocks!r}"
    elif not isinstance(width, int) or isinstance(width, bool) or width < 1:
        problem = f"{arch}.embedding_length is {width!r}"
    elif used != set(range(blocks)):
        problem = f"{arch}.block_count is {blocks} but the file has tensors for {len(used)} blocks"
    elif "token_embd.weight" not in shapes or width not in shapes["token_embd.weight"]:
        problem = f"the token embedding does not have the {width} columns {arch}.embedding_length says"
    if problem:
        raise LlmpressError(f"GGUF file {path} is inconsistent ({problem}): it is corrupted or incomplete; "
                            "download it again")


def gguf_size(path: Path) -> dict:
    """The bytes a GGUF file's tensors take, as stored (their block types), for ``llmpress eval FILE.gguf``:
    ``size_bytes`` (all tensors), ``bits_per_weight`` (over all weights), ``linear_bits_per_weight`` (over the
    blocks' 2-D tensors, the linears), ``disk_bytes`` (the file)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    size = numel = linear_bytes = linear_numel = 0
    for t in reader.tensors:
        size += int(t.n_bytes)
        numel += int(t.n_elements)
        if t.name.startswith("blk.") and len(t.shape) == 2:
            linear_bytes += int(t.n_bytes)
            linear_numel += int(t.n_elements)
    return {"size_bytes": size, "bits_per_weight": 8 * size / numel if numel else 0.0,
            "linear_bits_per_weight": 8 * linear_bytes / linear_numel if linear_numel else None,
            "disk_bytes": path.stat().st_size}
