"""A GGUF file (llama.cpp) read as a streamed checkpoint: one tensor at a time, dequantized, under the
transformers model's names and in its layout.

``llmpress.models.lazy.Checkpoint`` reads a safetensors folder tensor by tensor. GGUF is the other form users
hold their models in, and transformers' GGUF loader (``load_gguf_checkpoint``) dequantizes every tensor into
memory before the model is built: an 8B Q4_K file becomes a 32 GB float32 state dict. Here the ``gguf``
package parses the header once (names, block types, shapes, offsets); each tensor is then read from its offset
with a plain file read when asked for (no memory map: the pages read do not stay in the process), dequantized
by ``gguf.dequantize`` and rearranged by transformers' own tensor processor for the architecture (Llama's q/k
rows un-permuted, Gemma's norms less one), under the name transformers' map gives it. These are the values
``llmpress.export.gguf.load_gguf`` gives, to the bit (``tests/test_gguf_stream.py``).

Dtypes: a tensor stored F32, F16 or BF16 is read in that dtype; a block-quantized one (Q4_0, Q4_K, ...) in
float32, where its dequantized values are exact (a 4-bit code times a float16 scale plus a float16 minimum
is generally not a float16). Byte counts are those of the tensors as read, which is what streaming holds and
writes. Only architectures whose GGUF tensors map one to one onto the model's parameters stream (mixture-of-
experts files, whose expert tensors transformers splits on reading, load whole).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LlmpressError

DEQUANTIZE_BYTES = 32 * 2**20  # float32 rows dequantized at a time
# block types read in their own dtype; every other (block-quantized) type is read in float32
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# transformers' tensor processors that keep a tensor's name (value or layout changes only); others split or
# merge tensors (MoE experts) and load whole
_ONE_TO_ONE = {"TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor", "NemotronTensorProcessor",
               "BloomTensorProcessor"}


@dataclass(frozen=True)
class _Entry:
    gguf_name: str
    kind: str  # the GGML block type's name (F32, Q4_K, ...)
    offset: int  # absolute byte offset of the data in the file
    nbytes: int  # bytes stored
    raw_dtype: np.dtype  # how the gguf package views the stored bytes
    raw_shape: tuple[int, ...]
    shape: tuple[int, ...]  # the tensor's shape (rows first)


@functools.lru_cache(maxsize=4)
def _header(path: str, size: int, mtime_ns: int) -> tuple[str, tuple[_Entry, ...], dict]:
    """The architecture, tensor table and transformers config dict of a GGUF file (parsed once per process and
    file version: the ``gguf`` package reads every metadata field, the vocabulary too, in Python)."""
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    reader = GGUFReader(path)
    if reader.byte_order != "I":
        raise LlmpressError(f"GGUF file {path} is big-endian: load it whole (--stream off)")
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    entries = tuple(_Entry(t.name, GGMLQuantizationType(t.tensor_type).name, int(t.data_offset), int(t.n_bytes),
                           t.data.dtype, tuple(int(n) for n in t.data.shape),
                           tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors)
    del reader  # drops its memory map of the file
    return arch, entries, load_gguf_checkpoint(path, return_tensors=False)["config"]


def _parsed(path: Path) -> tuple[str, tuple[_Entry, ...], dict]:
    stat = path.stat()
    return _header(str(path), stat.st_size, stat.st_mtime_ns)


def gguf_config(path: Path):
    """The transformers config a GGUF file describes (from its header, as ``AutoConfig.from_pretrained(...,
    gguf_file=...)`` builds it)."""
    from transformers import CONFIG_MAPPING

    parsed = dict(_parsed(path)[2])
    return CONFIG_MAPPING[parsed["model_type"]].from_dict(parsed)


def _names(arch: str, model: torch.nn.Module, config) -> dict[str, str]:
    """{GGUF tensor name: model parameter name}, from the ``gguf`` package's table of llama.cpp's standard names
    (what transformers' ``get_gguf_hf_weights_map`` reads, without its walk over every submodule's state dict,
    5 s for a 30-block model)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    key = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if key is None:
        raise LlmpressError(f"the gguf package does not know architecture '{arch}': load this file whole "
                            "(--stream off)")
    table = get_tensor_name_map(key, config.num_hidden_layers)
    mapping = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        base, dot, suffix = name.rpartition(".")
        found = table.get_name(base) if dot else None
        if found is not None:
            mapping.setdefault(f"{found}.{suffix}", name)
    return mapping


class GgufCheckpoint:
    """The tensors of a ``.gguf`` file under the transformers model's parameter names, read one at a time: the
    protocol of :class:`llmpress.models.lazy.Checkpoint` (``names``, ``dtype``, ``shape``, ``nbytes``,
    ``total_bytes``, ``float_dtype``, ``get``, ``files``)."""

    def __init__(self, path: str | Path, config=None) -> None:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        from .lazy import skeleton

        self.path = Path(path)
        self.folder = self.path.parent
        self.files = [self.path]
        arch, entries, parsed = _parsed(self.path)
        self.arch = arch  # llama.cpp's architecture name (general.architecture)
        self.config = gguf_config(self.path) if config is None else config
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=dict(parsed))
        self.one_to_one = type(self.processor).__name__ in _ONE_TO_ONE
        mapping = _names(arch, skeleton(self.config), self.config)
        # tensors no parameter takes (llama 3's rope_freqs: the config computes them) are left out, as
        # transformers' loader leaves them
        self.entries = {mapping[e.gguf_name]: e for e in entries if e.gguf_name in mapping}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def kind(self, name: str) -> str:
        """The GGML block type tensor ``name`` is stored in."""
        return self.entries[name].kind

    def dtype(self, name: str) -> torch.dtype:
        return _PLAIN.get(self.entries[name].kind, torch.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor as read (its dtype), not as stored."""
        e = self.entries[name]
        return int(np.prod(e.shape)) * self.dtype(name).itemsize

    def total_bytes(self, prefix: str = "") -> int:
        return sum(self.nbytes(n) for n in self.entries if n.startswith(prefix))

    def float_dtype(self) -> torch.dtype:
        """The dtype most of the tensors' bytes are read in."""
        by: dict[torch.dtype, int] = {}
        for name in self.entries:
            by[self.dtype(name)] = by.get(self.dtype(name), 0) + self.nbytes(name)
        return max(by, key=by.get) if by else torch.float32

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name``, read from the file, dequantized and laid out as the model's parameter (cast to ``dtype``
        when given)."""
        from gguf import GGMLQuantizationType, dequantize

        e = self.entries[name]
        raw = np.fromfile(self.path, dtype=np.uint8, count=e.nbytes, offset=e.offset)
        if raw.size != e.nbytes:
            raise LlmpressError(f"GGUF file {self.path} is cut short (tensor {e.gguf_name}): download it again")
        data = raw.view(e.raw_dtype).reshape(e.raw_shape)
        if e.kind == "BF16":  # numpy has no bfloat16: widen the bits to float32 (exact)
            values = torch.from_numpy(raw).view(torch.bfloat16).float().numpy()
        elif e.kind in _PLAIN:
            values = dequantize(data, GGMLQuantizationType[e.kind])
        else:  # block types, a slice of rows at a time: the package's temporaries stay small
            rows = data.reshape(-1, data.shape[-1])
            values = np.empty((rows.shape[0], e.shape[-1]), dtype=np.float32)
            step = max(1, DEQUANTIZE_BYTES // (4 * e.shape[-1]))
            for start in range(0, rows.shape[0], step):
                values[start:start + step] = dequantize(rows[start:start + step], GGMLQuantizationType[e.kind])
        del data, raw  # (an F32 tensor's values are its bytes: they stay)
        values = values.reshape(e.shape)
        result = self.processor.process(weights=values, name=e.gguf_name, tensor_key_mapping={},
                                        parsed_parameters={"tensors": {}})
        if result.name != e.gguf_name:
            raise LlmpressError(f"GGUF tensor {e.gguf_name} is renamed on reading ({self.processor.__class__.__name__})"
                                ": load this file whole (--stream off)")
        tensor = torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))  # a fresh array: ours
        return tensor.to(dtype if dtype is not None else self.dtype(name))

    def close(self) -> None:
        """Nothing stays open between reads."""
