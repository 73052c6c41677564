"""Perplexity of a model larger than memory, one decoder block at a time (``llmpress eval --stream``).

``llmpress eval`` loads the whole model in float32: an 8B model (16 GB in bf16) needs 32 GB before the
first token. Here the model is a skeleton on the meta device (``llmpress.models.lazy``) and the evaluation
runs layer-wise, as the GPTQ reference code evaluates its models (IST-DASLab ``gptq``'s ``llama_eval``:
every window's hidden states through one layer, then the next) and llm-compressor's sequential pipeline
calibrates:

1. what runs before the blocks (the input embedding) is read, every window embedded and each block's inputs
   and keyword arguments (rotary tables, masks) captured (``llmpress.calib.capture_inputs``), the embedding
   released;
2. each block is read from the checkpoint, every window's hidden states run through it, and it is released;
3. the head is read (for a tied head, the embedding again) and each window's logits computed by the model's
   own forward after the blocks (final norm, head, soft-capping) with the blocks replaced by the hidden
   states just computed, one window at a time, scored by :func:`~llmpress.measure.perplexity.window_nll`
   in the same float64 sum as :func:`~llmpress.measure.perplexity.perplexity`.

Memory: the hidden states of all windows (windows × L × hidden), one block (or the embedding, or the head),
and one window's logits. The windows go one at a time through the same operations as ``perplexity()``
with batch size 1, so the perplexity is the same to the last bit (``tests/test_streamed_eval.py``).

A folder is read dense or pack-quantized (``llmpress.export.compressed_tensors.dense_tensors`` dequantizes
one layer at a time), a .gguf file one tensor at a time (``llmpress.models.gguf_checkpoint``); other formats
(low-rank, W8A8, sparse) load whole. A quantized KV cache (a
``kv-cache`` recipe stage, ``--kv-bits``) is a fresh cache per window and block: a block's attention reads
only its own layer of it. Each parameter's non-zero count is taken as it is read, so the size and FLOPs
reports of the skeleton are those of the whole model. Speed and lm-eval tasks run the whole model: not here.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..calib import block_prefix, captured_inputs, hidden_of
from ..errors import LlmpressError
from ..export.base import Folder
from ..export.compressed_tensors import dense_tensors
from ..export.formats import folder_format
from ..export.reading import reader_errors
from ..models.archs import arch_for, get_blocks
from ..models.gguf_checkpoint import GgufCheckpoint
from ..models.lazy import Checkpoint, check_names, materialize, release, skeleton, tied_names
from ..models.loader import GGUF_NOTE, read_meta, source_config, source_tokenizer
from ..models.sources import is_gguf
from ..progress import bar
from .memory import available_memory
from .perplexity import _check_windows, window_nll

log = logging.getLogger(__name__)

STREAMABLE = ("dense", "pack-quantized", "pack-quantized-mixed")  # folder formats read one block at a time
FIX = "use --stream off (loads the model whole)"


class FolderTensors:
    """A safetensors folder's tensors as the dense model holds them, read one at a time: the checkpoint
    protocol of :func:`llmpress.models.lazy.materialize` (``in``, ``get``, ``shape``). A pack-quantized
    layer's ``<module>.weight`` is dequantized from its packed tensors when asked for."""

    def __init__(self, folder: Path, quantization: dict) -> None:
        self.checkpoint = Checkpoint(folder)
        self.folder = self.checkpoint.folder
        self.quantization = quantization
        self.packed = {n.removesuffix("_packed") for n in self.checkpoint.names() if n.endswith(".weight_packed")}

    def __contains__(self, name: str) -> bool:
        return name in self.checkpoint or name in self.packed

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self.checkpoint:
            return self.checkpoint.get(name, dtype)
        module = name.removesuffix("weight")  # "model.layers.0.mlp.up_proj."
        return dense_tensors(self.checkpoint, self.quantization, module, dtype or torch.float32)[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.checkpoint:
            return self.checkpoint.shape(name)
        return tuple(int(n) for n in self.checkpoint.get(f"{name.removesuffix('weight')}weight_shape"))


@dataclass
class StreamedModel:
    """A folder opened for a streamed evaluation: the skeleton, its tensors, tokenizer and ``llmpress.json``."""

    model: nn.Module
    tensors: FolderTensors | GgufCheckpoint
    tokenizer: object | None
    folder: Path
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def cannot_stream(source) -> str | None:
    """None when ``source`` is a local safetensors folder of a format read block by block, or a .gguf file, else
    why not."""
    path = Path(str(source)).expanduser() if isinstance(source, (str, Path)) else None
    if path is not None and is_gguf(path):
        return None  # what cannot be read one tensor at a time is said when it is opened
    if path is None or not path.is_dir():
        return f"--stream on reads a local model folder or .gguf file, not {_what(source)}: {FIX}"
    if not (path / "config.json").is_file():
        return f"'{path}' has no config.json: --stream on reads a Hugging Face model folder; {FIX}"
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return f"'{path}' has no model.safetensors (or index): --stream on reads safetensors checkpoints; {FIX}"
    kind = folder_format(path)
    if kind not in STREAMABLE:
        return f"'{path}' is stored {kind}, and --stream on reads dense or pack-quantized folders: {FIX}"
    return None


def _what(source) -> str:
    if isinstance(source, (str, Path)):
        return f"'{source}' (no folder here: an alias, a file, a hub id or a missing path)"
    return f"an in-memory {type(source).__name__}"


def dense_bytes(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the model's parameters take dense in ``dtype``, tied ones once (by identity: every meta tensor's
    ``data_ptr()`` is 0)."""
    unique = {id(p): p.numel() for p in model.parameters()}
    return sum(unique.values()) * torch.empty((), dtype=dtype).element_size()


def should_stream(source, dtype: torch.dtype = torch.float32) -> bool:
    """"auto": whether ``source`` is a folder read block by block (:func:`cannot_stream`) whose dense model in
    ``dtype`` would take more than half the memory available now."""
    if cannot_stream(source) is not None:
        return False
    try:
        need = dense_bytes(skeleton(source_config(Path(str(source)).expanduser())), dtype)
    except (*reader_errors(), ImportError, LlmpressError):  # an architecture transformers cannot build, a damaged
        return False  # GGUF file: the whole load says why
    available = available_memory()
    if need <= available / 2:
        return False
    log.info("the model takes %.1f GB dense in %s, %.1f GB of memory are available: evaluating it block by block "
             "(--stream off loads it whole)", need / 1e9, str(dtype).removeprefix("torch."), available / 1e9)
    return True


def open_folder(folder: str | Path) -> StreamedModel:
    """``folder`` (see :func:`cannot_stream`; a .gguf file too) as a skeleton whose tensors stay on disk, with
    tokenizer and meta."""
    path = Path(folder).expanduser()
    reason = cannot_stream(path)
    if reason is not None:
        raise LlmpressError(reason)
    config = source_config(path)
    model = skeleton(config)
    tokenizer = source_tokenizer(path)
    if is_gguf(path):
        tensors = GgufCheckpoint(path, config)
        if not tensors.one_to_one:
            raise LlmpressError(f"'{path}' cannot be read block by block: its GGUF tensors are split or merged on "
                                f"reading (mixture of experts); {FIX}")
        meta, notes = {}, [GGUF_NOTE]
    else:
        tensors = FolderTensors(path, Folder.of(path).quantization)
        meta = read_meta(path)
        notes = [str(n) for n in meta.get("notes", [])]
    reason = check_names(model, tensors)
    if reason is not None:
        raise LlmpressError(f"'{path}' cannot be read block by block: {reason}; {FIX}")
    return StreamedModel(model, tensors, tokenizer, path, meta, notes)


def _onload(streamed: StreamedModel, prefix: str, dtype: torch.dtype, device: torch.device,
            nonzero: dict[str, int]) -> nn.Module:
    """Materialize module ``prefix`` and record its parameters' non-zero counts by full name."""
    module = materialize(streamed.model, prefix, streamed.tensors, dtype, device)
    for name, param in module.named_parameters(prefix=prefix):
        nonzero[name] = int(torch.count_nonzero(param).item())
    return module


def _names(model: nn.Module, blocks: nn.ModuleList) -> tuple[list[str], str, str]:
    """(modules outside the blocks with parameters of their own, input embedding's name, head's name)."""
    inside = {id(m) for m in blocks.modules()}
    names = {id(m): n for n, m in model.named_modules()}
    outside = [n for n, m in model.named_modules()
               if id(m) not in inside and next(m.parameters(recurse=False), None) is not None]
    return outside, names[id(model.get_input_embeddings())], names[id(model.get_output_embeddings())]


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Computed buffers (rotary tables) onto ``device``; parameters stay on meta."""
    for module in model.modules():
        for key, value in module._buffers.items():
            if value is not None and not value.is_meta:
                module._buffers[key] = value.to(device)


class _PassThrough:
    """The blocks replaced for the model's forward after them: block 0 returns the window's final hidden
    states, the others pass theirs on."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.blocks, self.hidden = blocks, None

    def __enter__(self) -> _PassThrough:
        def first(*args, **kwargs):
            return self.hidden

        def through(*args, **kwargs):
            return args[0] if args else kwargs["hidden_states"]

        for i, block in enumerate(self.blocks):
            block.forward = first if i == 0 else through
        return self

    def __exit__(self, *exc) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)


def streamed_perplexity(streamed: StreamedModel, windows: torch.Tensor, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, progress: bool = False,
                        cache_factory=None) -> dict:
    """:func:`~llmpress.measure.perplexity.perplexity` of the folder's model, block by block (module docstring).

    Returns its keys and ``nonzero``: {parameter name: non-zero count} of every parameter, as read, for
    :func:`~llmpress.measure.size.size_report` and :func:`~llmpress.measure.flops.flops_per_token` of the
    skeleton. ``cache_factory``: a fresh KV cache for each window's pass through each block (a quantized KV
    cache, ``llmpress.quant.kvcache``; a block's attention reads only its own layer of the cache).
    """
    count, seq_len = _check_windows(windows, 1)
    device = torch.device(device)
    model = streamed.model
    blocks = get_blocks(model, arch_for(model))
    outside, embedding, head = _names(model, blocks)
    tied = bool(tied_names(model))
    nonzero: dict[str, int] = {}
    _buffers_to(model, device)
    try:
        for name in outside:  # the embedding and the rest before the blocks; a tied head comes with the embedding
            if name != head:
                _onload(streamed, name, dtype, device, nonzero)
        inputs = captured_inputs(model, blocks, windows.long(), 1, device)
        release(model.get_submodule(embedding), model)
        prefix = block_prefix(model, blocks)
        for i, block in enumerate(bar(blocks, progress, "perplexity (blocks)")):
            _onload(streamed, f"{prefix}{i}", dtype, device, nonzero)
            _run_block(block, inputs, i, dtype, cache_factory)
            release(block, model)
        _onload(streamed, embedding if tied else head, dtype, device, nonzero)
        total_nll = _score(model, blocks, inputs.hidden, windows, dtype, device, progress)
    finally:
        release(model, model)  # every parameter back on meta, whatever was read when this stopped
    loss = total_nll / (count * (seq_len - 1))
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 709.0 else math.inf,
            "tokens": count * (seq_len - 1), "windows": count, "seq_len": seq_len, "nonzero": nonzero}


def _run_block(block: nn.Module, inputs, index: int, dtype: torch.dtype, cache_factory) -> None:
    """Every window's hidden states through the block (as ``BlockInputs.run`` calls it), each replaced by the
    block's output as it comes, so that the states of all windows are held once; with a fresh KV cache per
    call when ``cache_factory`` is given."""
    with torch.inference_mode():
        for j, (h, (extra, kw)) in enumerate(inputs.batches(index, dtype)):
            if cache_factory is None:
                output = block(h, *extra, **kw)
            else:
                args, kwargs = _with_cache(block, (h, *extra), kw, cache_factory())
                output = block(*args, **kwargs)
            inputs.hidden[j] = hidden_of(output)


def _with_cache(block: nn.Module, args: tuple, kwargs: dict, cache) -> tuple[tuple, dict]:
    """The block's captured arguments (taken without a cache) with ``cache`` and ``use_cache=True`` in their
    places, by name: transformers >= 5.24 calls it ``cache`` (GPT-2 passes it positionally), before
    ``past_key_values``."""
    signature = inspect.signature(block.forward)
    bound = signature.bind(*args, **kwargs)
    names = signature.parameters
    key = "cache" if "cache" in names or "cache" in kwargs else "past_key_values"
    for name, value in ((key, cache), ("use_cache", True)):
        if name in names and names[name].kind is not inspect.Parameter.VAR_KEYWORD:
            bound.arguments[name] = value
        else:
            extra = next((n for n, p in names.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
            if extra is None:
                raise LlmpressError(f"{type(block).__name__} takes no '{name}' argument: evaluate this model "
                                    f"without a KV-cache setting, or {FIX}")
            bound.arguments.setdefault(extra, {})[name] = value
    return bound.args, bound.kwargs


def _score(model: nn.Module, blocks: nn.ModuleList, hidden: list[torch.Tensor], windows: torch.Tensor,
           dtype: torch.dtype, device: torch.device, progress: bool) -> float:
    """Sum of every window's next-token NLL, its logits computed one window at a time (float64 sum)."""
    total_nll = 0.0
    with _PassThrough(blocks) as through, torch.inference_mode():
        for i in bar(range(len(hidden)), progress, "perplexity (head)"):
            through.hidden = hidden[i]
            placeholder = torch.zeros(hidden[i].shape, dtype=dtype, device=device)  # the blocks ignore it
            output = model(inputs_embeds=placeholder, use_cache=False)
            logits = getattr(output, "logits", None)
            logits = output[0] if logits is None else logits
            total_nll += window_nll(logits[0], windows[i].to(device=device, dtype=torch.long))
            del output, logits
    return total_nll
