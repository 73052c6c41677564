"""What a streamed run reads: a safetensors folder or a GGUF file, opened the same way.

:func:`open_checkpoint` gives the tensor-by-tensor reader of either (``llmpress.models.lazy.Checkpoint`` or
``llmpress.models.gguf_checkpoint.GgufCheckpoint``), :func:`is_gguf` tells them apart.
"""

from __future__ import annotations

from pathlib import Path

from .gguf_checkpoint import GgufCheckpoint
from .lazy import Checkpoint


def is_gguf(source: Path) -> bool:
    """Whether ``source`` is a GGUF file (else a model folder)."""
    return source.is_file() and source.suffix == ".gguf"


def open_checkpoint(source: Path, config=None) -> Checkpoint | GgufCheckpoint:
    """The tensors of ``source`` (a model folder or a .gguf file), read one at a time."""
    return GgufCheckpoint(source, config) if is_gguf(source) else Checkpoint(source)
