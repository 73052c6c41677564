"""The shape of one entry of the format table (``llmpress.export.formats``), and of what it detects.

A :class:`Format` is data: a name, the ``format=`` value that asks for it, whether "auto" may
choose it, and six functions, each defined next to the code of its format (one module per format
in ``llmpress.export``) and bound into one ``FORMAT`` constant at the end of that module:

- ``detect(folder) -> bool``: whether a :class:`Folder` (path and ``config.json``) is in this format;
  exactly one entry detects each folder llmpress writes (``formats.detect``);
- ``load(path, config, dtype) -> nn.Module``: the model of a detected folder, every weight as stored;
- ``fits(model, layers, results) -> bool``: whether this is the format of this compressed model
  (what "auto" and a ``format=`` family try first);
- ``can_save(model, layers, results) -> str | None``: None when ``save`` stores the model exactly,
  else the one-line reason it cannot;
- ``save(model, tokenizer, out, meta, layers, results) -> Path``: write it (through
  ``llmpress.save.save_model``, atomically), ``meta`` going into ``llmpress.json``;
- ``readers(config) -> list[str]``: the tools that read such a folder (names in ``.tools``);
  ``kind(config)`` names the folder's variant (e.g. several pack-quantized config groups).

``layers`` is the per-layer meta of a compression (``CompressResult.layers``) and ``results`` its
:class:`~llmpress.compressed.Compressed` per layer (codes, scales, zero points, masks).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LlmpressError


@dataclass(frozen=True)
class Folder:
    """What format detection looks at: where the model is (a local folder, a hub id, or a file) and its
    ``config.json`` as a dict ({} where there is none, e.g. a GGUF file)."""

    path: Path | None
    config: dict = field(default_factory=dict)

    @classmethod
    def of(cls, source: dict | str | Path) -> Folder:
        """A config dict as it is, or a folder with its ``config.json`` read (one-line errors)."""
        if isinstance(source, dict):
            return cls(None, source)
        path = Path(source) / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise LlmpressError(f"cannot read {path} ({type(exc).__name__}): give a folder written by llmpress "
                                "compress") from None
        if not isinstance(config, dict):
            raise LlmpressError(f"{path} is not a JSON object: give a folder written by llmpress compress")
        return cls(Path(source), config)

    @property
    def quantization(self) -> dict:
        """The compressed-tensors ``quantization_config`` ({} when the folder has none, or another method's)."""
        qconfig = self.config.get("quantization_config")
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
        return qconfig if str(getattr(method, "value", method)) == "compressed-tensors" else {}


@dataclass(frozen=True)
class Format:
    """One storage format (see the module docstring for the functions' contracts)."""

    name: str
    family: str | None  # the format= / --format value that asks for it; None: only "auto" chooses it
    auto: bool  # whether "auto" may choose it (sparse: no, transformers 5.x cannot read it)
    detect: Callable[[Folder], bool]
    load: Callable[[Path, Any, Any], Any]
    fits: Callable[[Any, dict, dict], bool]
    can_save: Callable[[Any, dict, dict], str | None]
    save: Callable[..., Path]
    readers: Callable[[dict], list[str]]
    kind: Callable[[dict], str] | None = None

    def describe(self, config: dict) -> str:
        """The name of a detected folder's variant (``kind``), else the format's name."""
        return self.kind(config) if self.kind is not None else self.name
