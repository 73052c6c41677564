"""Models larger than memory: a weightless skeleton whose modules read their tensors from disk on demand.

A model of tens of GB cannot be loaded whole before compression starts (the peers' most frequent
failure: llm-compressor and GPTQModel hold the whole model in CPU RAM). Like accelerate's big-model
inference and llm-compressor's sequential onloading, but without ever materialising the whole model:

- :class:`Checkpoint` indexes a safetensors folder (one file, or shards with an index) from the
  files' headers alone (names, dtypes, shapes, byte sizes) and reads one tensor at a time.
- :func:`skeleton` builds the transformers model with every parameter on the ``meta`` device
  (``accelerate.init_empty_weights``; buffers such as rotary tables are real, they are computed, not stored).
- :func:`materialize` gives one module (a decoder block, the embedding) its tensors from the checkpoint
  in the dtype the method computes in; :func:`release` puts it back on ``meta``.

Nothing here runs code from the files: safetensors headers are JSON, tensors are raw bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from ..errors import LlmpressError

# safetensors' dtype names -> torch dtypes (those a checkpoint of an LLM holds)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(file: Path) -> dict[str, dict]:
    """The JSON header of one safetensors file: {name: {"dtype", "shape", "data_offsets"}} (no metadata)."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise LlmpressError(f"'{file}' is not a safetensors file (too short): download or save it again")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise LlmpressError(f"'{file}' is not a safetensors file (header of {length} bytes): "
                                "download or save it again")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeError) as exc:
            raise LlmpressError(f"'{file}' has a damaged safetensors header ({exc}): download or save it "
                                "again") from None
    if not isinstance(header, dict):
        raise LlmpressError(f"'{file}' has a damaged safetensors header: download or save it again")
    header.pop("__metadata__", None)
    try:
        end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    except (TypeError, KeyError, ValueError, IndexError):
        raise LlmpressError(f"'{file}' has a damaged safetensors header: download or save it again") from None
    size, expected = file.stat().st_size, 8 + length + end
    if size != expected:  # what safetensors checks on open ("file not fully covered"), here before any work
        raise LlmpressError(f"cannot load the weights in '{file.parent}' ({file.name} is {size} bytes, its header "
                            f"describes {expected}): the checkpoint is damaged, incomplete or does not match "
                            "config.json; save or download it again")
    return header


class Checkpoint:
    """The tensors of a safetensors model folder, indexed from headers and read one at a time.

    ``folder`` holds ``model.safetensors`` or ``model.safetensors.index.json`` and its shards.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise LlmpressError(f"'{index}' is damaged: download or save the model again") from None
        elif (self.folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise LlmpressError(f"'{self.folder}' has no model.safetensors (or index): streaming reads "
                                "safetensors checkpoints")
        self.where: dict[str, Path] = {}
        self.info: dict[str, dict] = {}
        for name in files:
            file = self.folder / name
            if not file.is_file():
                raise LlmpressError(f"shard '{file}' named in the index is missing: the checkpoint is incomplete; "
                                    "download it again")
            for key, entry in read_header(file).items():
                self.where[key] = file
                self.info[key] = entry
        self.files = [self.folder / f for f in files]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.info[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info[name]["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self.info[name]["data_offsets"]
        return end - start

    def total_bytes(self, prefix: str = "") -> int:
        return sum(self.nbytes(n) for n in self.where if n.startswith(prefix))

    def float_dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's floating bytes are stored in (its "own" dtype)."""
        by: dict[torch.dtype, int] = {}
        for name in self.where:
            dtype = self.dtype(name)
            if dtype.is_floating_point:
                by[dtype] = by.get(dtype, 0) + self.nbytes(name)
        return max(by, key=by.get) if by else torch.float32

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name``, read from its file (and cast to ``dtype`` when floating and given)."""
        from safetensors import safe_open

        # opened per read: an open handle keeps the file mapped, and every page read would stay in the process's
        # resident set (a 16 GB checkpoint read through would count 16 GB of RSS)
        with safe_open(str(self.where[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    def close(self) -> None:
        """Nothing stays open between reads (kept for callers that close what they opened)."""


def skeleton(config) -> nn.Module:
    """The causal LM of ``config`` with its parameters on the meta device (no memory), buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # a tied head shares the embedding's Parameter, as from_pretrained leaves it
    return model.eval()


def _set(module: nn.Module, name: str, tensor: torch.Tensor | nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._parameters[attr] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    """A tied head shares the embedding's (new) Parameter again after either was replaced."""
    for head, embed in tied.items():
        _set(model, head, model.get_parameter(embed))


def checkpoint_name(checkpoint: Checkpoint, name: str, tied: dict[str, str]) -> str:
    """The checkpoint key holding parameter ``name``: itself, or for a tied head the embedding's."""
    if name in checkpoint:
        return name
    if name in tied and tied[name] in checkpoint:
        return tied[name]
    raise LlmpressError(f"the checkpoint has no tensor '{name}': its names do not match the model's; "
                        "load it whole instead (--stream off)")


def materialize(model: nn.Module, prefix: str, checkpoint: Checkpoint, dtype: torch.dtype,
                device: torch.device | str = "cpu", tied: dict[str, str] | None = None) -> nn.Module:
    """Give the submodule ``prefix`` of ``model`` (a skeleton) its parameters from ``checkpoint``, floating
    ones in ``dtype``, on ``device``; returns it."""
    module = model.get_submodule(prefix.rstrip("."))
    base = f"{prefix.rstrip('.')}." if prefix else ""
    tied = tied_names(model) if tied is None else tied
    for name, _ in list(module.named_parameters(remove_duplicate=False)):
        tensor = checkpoint.get(checkpoint_name(checkpoint, base + name, tied), dtype)
        _set(module, name, tensor.to(device))
    _retie(model, tied)
    return module


def release(module: nn.Module, model: nn.Module | None = None) -> None:
    """Put every parameter of ``module`` back on the meta device (its memory is freed); ``model``, when
    given, has its tied head tied to the embedding again."""
    for name, param in list(module.named_parameters(remove_duplicate=False)):
        _set(module, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))
    if model is not None:
        _retie(model, tied_names(model))


def tied_names(model: nn.Module) -> dict[str, str]:
    """{head weight: embedding weight} when the config ties them (whether or not they share a Parameter now)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "tie_word_embeddings", False):
        return {}
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    embed = get_in() if callable(get_in) else None
    if head is None or embed is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(head)]}.weight": f"{names[id(embed)]}.weight"}


def on_meta(module: nn.Module) -> bool:
    """Whether ``module`` still has a parameter without data."""
    return any(p.is_meta for p in module.parameters())


def check_names(model: nn.Module, checkpoint: Checkpoint) -> str | None:
    """None when every parameter of the skeleton has a tensor in the checkpoint with its shape, else why not."""
    tied = tied_names(model)
    for name, param in model.named_parameters():
        key = name if name in checkpoint else tied.get(name)
        if key is None or key not in checkpoint:
            return f"the checkpoint has no tensor '{name}' (its names differ from the model's)"
        if checkpoint.shape(key) != tuple(param.shape):
            return f"tensor '{key}' has shape {checkpoint.shape(key)}, the model expects {tuple(param.shape)}"
    return None
