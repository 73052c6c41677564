"""Compress a model larger than memory: blocks read from disk, written as they finish, resumable after a kill.

The in-memory path (``llmpress.api.compress`` on a loaded model) holds the whole model in float32 and
writes it at the end: an 8B model needs ~32 GB before any work, and a run killed after hours restarts from
zero (the peers' most reported failure: llm-compressor's OOM at ``save_pretrained`` after a 15-hour run;
GPTQModel's "a 2TB model will use ≥2TB of CPU RAM"). Here, for recipes of block stages (RTN, GPTQ, AWQ,
Wanda, SparseGPT, magnitude, the KV-cache setting) on a safetensors folder or a GGUF file (its tensors read and
dequantized one at a time: ``llmpress.models.gguf_checkpoint``):

- the model is a skeleton on the meta device (``llmpress.models.lazy``); the sequential engine
  (``llmpress.engine.compress_blocks``) materialises one block at a time from the checkpoint, in float32
  (the methods' dtype; a lone weight quantizer calibrating in the checkpoint's dtype: in that dtype, see
  ``block_dtype``), and puts it back on meta when done; the input embedding is read only to embed the
  calibration windows;
- each finished block is written at once to its own safetensors shard (packed codes as compressed-tensors
  ``pack-quantized``, or dense tensors in the checkpoint's own dtype) and dropped; embeddings, final norm and
  head are copied from the checkpoint tensor by tensor at the end, with the index, config and tokenizer;
- everything goes to a hidden staging folder ``.OUT.partial`` beside ``--out``, renamed into place when
  complete. After every block the staging folder records a fingerprint of the run (model files, recipe,
  calibration tokens, device and dtype), the blocks done, their records and the calibration activations
  entering the next block: the same command after a kill (SIGKILL included) continues after the last
  finished block and writes the same bytes as an uninterrupted run; another command is refused.

Peak memory is about one block (in float32, or in the checkpoint's dtype: ``block_dtype``), plus one batch of
calibration activations, plus GPTQ's Hessian of its widest linear and that Hessian's factorisation in place,
plus the largest tensor copied at the end. What a block's passes keep for later (the calibration activations
between passes on a CPU, the reference outputs, the settled sub-modules' inputs of true-sequential calibration,
the reference rows or Grams of the per-linear errors) waits on disk in ``.OUT.partial/spill``, in the page cache
rather than in the process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from .calib import SpillList, block_prefix, tensor_spec
from .compressed import Compressed, Grid
from .engine import Placement, compress_blocks
from .errors import LlmpressError
from .export.compressed_tensors import PACKED, Scheme, quantization_config, regroup, storage_group_size
from .export.formats import readers
from .measure.memory import return_free_memory
from .models.archs import arch_for, block_linears, get_blocks
from .models.lazy import DTYPES, Checkpoint, check_names, materialize, release, skeleton, tied_names
from .models.loader import source_config
from .models.sources import is_gguf, open_checkpoint
from .paths import make_public
from .quant.qlinear import integer_zero, packed_tensors
from .recipe import Recipe
from .resume import LOCK, refuse_if_busy, refuse_if_other
from .save import META_FILE, check_new_path

log = logging.getLogger(__name__)

# methods whose output the streamed writer stores exactly: packed codes (integer zero points) or dense weights
STREAMABLE = {"rtn", "gptq", "awq", "wanda", "sparsegpt", "magnitude", "kv-cache"}
QUANTIZERS = {"rtn", "gptq"}
PROGRESS, HIDDEN, SPILL = "progress.json", "hidden.safetensors", "spill"
REST_SHARD_BYTES = 512 * 2**20  # embeddings, norm and head: shards of at most this (one big tensor alone)


def why_not(source: Path | None, recipe: Recipe, format: str) -> str | None:
    """None when this run can stream from ``source`` (a model folder or a .gguf file), else the reason (it then
    runs in memory)."""
    if source is None or not (source.is_dir() or is_gguf(source)):
        return "the model is not a local folder or .gguf file"
    if source.is_dir():
        if not ((source / "model.safetensors").is_file() or (source / "model.safetensors.index.json").is_file()):
            return "the folder has no model.safetensors (or index)"
        config = json.loads((source / "config.json").read_text())
        if config.get("quantization_config"):
            return "the model is already quantized"
    other = sorted({s.method for s in recipe.stages} - STREAMABLE)
    if other:
        return f"stage(s) {', '.join(other)} need the whole model"
    if any(getattr(c, "kquant", None) is not None for s in recipe.stages for c in (s.config, *(c for _, c in
                                                                                             s.overrides))):
        return "K-quant layouts are written by the GGUF path"
    packs = any(s.method in QUANTIZERS for s in recipe.stages)
    if format == "gguf" or (format == "compressed-tensors" and not packs):
        return f"format {format} is written from the whole model"
    return _why_not_model(source)


def _why_not_model(source: Path) -> str | None:
    """None when the source's model can be built weightless and its checkpoint names its parameters, else why
    not (the in-memory path then loads it, and words its own errors: an unsupported architecture, a damaged
    GGUF file, ...)."""
    try:
        config = source_config(source)
        model = skeleton(config)
        arch = arch_for(model)
        get_blocks(model, arch)
    except LlmpressError as exc:  # a damaged GGUF header, ...: its own words
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure here means: load it the ordinary way
        return f"its model cannot be built without weights ({type(exc).__name__})"
    if arch.transposed:
        return "GPT-2's Conv1D layers are saved by the in-memory path"
    try:
        checkpoint = open_checkpoint(source, config)
    except Exception as exc:  # noqa: BLE001 - as above
        return f"its tensors cannot be read one at a time ({type(exc).__name__})"
    if not getattr(checkpoint, "one_to_one", True):
        return "its GGUF tensors are split or merged on reading (mixture of experts)"
    return check_names(model, checkpoint)


def fingerprint(checkpoint: Checkpoint, recipe: Recipe, samples: torch.Tensor | None, device: torch.device,
                compute_dtype: torch.dtype | None, format: str) -> str:
    """A hash of everything that decides the output: the checkpoint files (names, sizes, times), the recipe,
    the calibration tokens, the device, the compute dtype and the format."""
    digest = hashlib.sha256()
    for file in checkpoint.files:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode())
    if samples is not None:
        digest.update(samples.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(f"{device}:{compute_dtype}:{format}".encode())
    return digest.hexdigest()[:32]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], tensor,
                      metadata: dict | None = None) -> None:
    """A safetensors file of ``entries`` (name, shape, dtype), written atomically one tensor at a time:
    ``tensor(j)`` gives entry j's tensor only when its bytes are written, so no more than one is held (and no
    buffer of them all, as ``safetensors.torch.save_file`` serializes)."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for j, (name, shape, dtype) in enumerate(entries):
            t = tensor(j)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)}, its header entry {dtype} {tuple(shape)}")
            flat = t.detach().cpu().contiguous().reshape(-1)
            f.write(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
            del t, flat
    os.replace(tmp, path)


def _save_streamed(tensors: list[torch.Tensor] | SpillList, path: Path) -> None:
    """``tensors`` as one safetensors file (keys h0, h1, ...), written one tensor at a time (a SpillList's tensors
    are read once, when written; the header comes from their shapes alone)."""
    write_safetensors(path, [(f"h{j}", *tensor_spec(tensors, j)) for j in range(len(tensors))], tensors.__getitem__)


def _atomic_json(data: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


@dataclasses.dataclass
class Staging:
    """The hidden folder ``.OUT.partial`` a streamed run writes into, and what it has done so far."""

    out: Path
    key: str
    folder: Path = dataclasses.field(init=False)
    done: int = 0
    layers: dict = dataclasses.field(default_factory=dict)
    blocks: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.folder = self.out.parent / f".{self.out.name}.partial"

    def open(self, what: str) -> bool:
        """Create the folder, or take over the one a killed run of the same command left; True when resuming."""
        if self.folder.exists():
            refuse_if_busy(self.folder, self.out)
            progress = self.folder / PROGRESS
            if not progress.is_file():  # killed before its first block was written: nothing to resume, start over
                shutil.rmtree(self.folder)
                return self.open(what)
            state = json.loads(progress.read_text())
            refuse_if_other(self.folder, self.out, self.key, state)
            self.done, self.layers, self.blocks = state["done"], state["layers"], state["blocks"]
            self.seconds = state.get("seconds", 0.0)
        else:
            self.folder.mkdir()
        (self.folder / LOCK).write_text(str(os.getpid()))
        self.what = what
        return self.done > 0

    def hidden(self) -> list[torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self.folder / HIDDEN
        if not path.is_file():
            return None
        saved = load_file(str(path))
        return [saved[f"h{j}"] for j in range(len(saved))]

    def record(self, done: int, layers: dict, blocks: dict, hidden: list[torch.Tensor] | None,
               seconds: float) -> None:
        """Block ``done - 1`` is written: keep the activations entering block ``done`` and the records."""
        if hidden is not None:
            _save_streamed(hidden, self.folder / HIDDEN)
        _atomic_json({"fingerprint": self.key, "what": self.what, "done": done, "layers": layers, "blocks": blocks,
                      "seconds": seconds}, self.folder / PROGRESS)
        self.done = done

    def finish(self) -> Path:
        for name in (PROGRESS, HIDDEN, LOCK):
            (self.folder / name).unlink(missing_ok=True)
        shutil.rmtree(self.folder / SPILL, ignore_errors=True)
        make_public(self.folder)
        if self.out.exists():
            raise LlmpressError(f"output folder {self.out} appeared while writing: choose a new --out path")
        os.rename(self.folder, self.out)
        return self.out


class _StreamPlacement(Placement):
    """Onload = read the block from the checkpoint (in ``dtype``: see :func:`block_dtype`, on the device);
    offload = back to meta."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, prefix: str, device: torch.device,
                 before_first=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(device, torch.device("meta"))
        self.model, self.checkpoint, self.prefix, self.dtype = model, checkpoint, prefix, dtype
        self.tied = tied_names(model)
        self.before_first = before_first
        self.index = {id(b): i for i, b in enumerate(get_blocks(model, arch_for(model)))}

    def onload(self, block: nn.Module) -> None:
        if self.before_first is not None:
            self.before_first()
            self.before_first = None
        materialize(self.model, f"{self.prefix}{self.index[id(block)]}", self.checkpoint, self.dtype,
                    self.device, self.tied)
        if self.dtype != torch.float32:  # floating buffers too, as the calibration copy of a float32 block had them
            block.to(self.dtype)

    def offload(self, block: nn.Module) -> None:
        release(block, self.model)
        return_free_memory()  # glibc keeps freed heap pages; without this RSS creeps up block after block


class _Writer:
    """Writes each finished block's tensors to its shard: packed codes for quantized linears, the rest dense in
    the checkpoint's dtype."""

    def __init__(self, folder: Path, model: nn.Module, checkpoint: Checkpoint, pack: bool) -> None:
        self.folder, self.model, self.checkpoint, self.pack = folder, model, checkpoint, pack
        self.dtype = checkpoint.float_dtype()
        self.blocks = get_blocks(model, arch_for(model))
        self.prefix = block_prefix(model, self.blocks)
        block_names = {n for n in checkpoint.names() if n.startswith(self.prefix)}
        self.rest = _groups([n for n in checkpoint.names() if n not in block_names], checkpoint)
        self.total = len(self.blocks) + len(self.rest)
        linears = [m for b in self.blocks for m in block_linears(b, arch_for(model)).values()]
        self.widths = sorted({m.in_features for m in linears if isinstance(m, nn.Linear)})

    def shard(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.total:05d}.safetensors"

    def scheme(self, grid: Grid) -> Scheme:
        return Scheme(grid.bits, storage_group_size(None if grid.group_size <= 0 else grid.group_size,
                                                    self.widths), grid.sym)

    def block(self, i: int, block: nn.Module, layers: dict, results: dict[str, Compressed]) -> None:
        base = f"{self.prefix}{i}."
        tensors = {}
        packed = set()
        if self.pack:
            for name in block_linears(block, arch_for(self.model)):
                full = base + name
                result = results.pop(full, None)
                grid = Grid.of(layers.get(full)) if layers.get(full) else None
                if result is None or result.qweight is None or grid is None or grid.act_bits is not None:
                    continue
                if not (grid.sym or integer_zero(result.zero)) or grid.float_zero:
                    raise LlmpressError(f"layer {full} has float zero points, which pack-quantized cannot store: "
                                        "run with --stream off to save it dense")
                scheme = self.scheme(grid)
                result = regroup(result, None if grid.group_size <= 0 else grid.group_size, scheme.group_size)
                for part, t in packed_tensors(result, scheme.bits, scheme.group_size, scheme.sym, self.dtype).items():
                    tensors[f"{full}.{part}"] = t
                packed.add(f"{full}.weight")
        for name, t in block.state_dict().items():
            if base + name in packed:
                continue
            tensors[base + name] = t.to(self.dtype) if t.is_floating_point() else t
        for name in [n for n in results if n.startswith(base)]:
            results.pop(name)
        _atomic_save(tensors, self.folder / self.shard(i), {"format": "pt"})

    def finish(self, layers: dict) -> dict:
        """Copy embeddings, norm and head from the checkpoint; write the index. Returns the packed schemes."""
        for k, names in enumerate(self.rest):  # one tensor read and held at a time
            write_safetensors(self.folder / self.shard(len(self.blocks) + k),
                              [(n, self.checkpoint.shape(n), self.checkpoint.dtype(n)) for n in names],
                              lambda j, names=names: self.checkpoint.get(names[j]), {"format": "pt"})
        weight_map, total = {}, 0
        from .models.lazy import read_header

        for k in range(self.total):
            for name, entry in read_header(self.folder / self.shard(k)).items():
                weight_map[name] = self.shard(k)
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
        _atomic_json({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                     self.folder / "model.safetensors.index.json")
        schemes: dict[Scheme, list[str]] = {}
        if self.pack:
            for name in sorted({n.removesuffix(".weight_packed") for n in weight_map if n.endswith(".weight_packed")}):
                schemes.setdefault(self.scheme(Grid.of(layers[name])), []).append(name)
        return schemes


def _groups(names: list[str], checkpoint: Checkpoint) -> list[list[str]]:
    """``names`` in shards of at most REST_SHARD_BYTES (a larger tensor alone)."""
    groups: list[list[str]] = []
    size = 0
    for name in sorted(names):
        nbytes = checkpoint.nbytes(name)
        if not groups or size + nbytes > REST_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def block_dtype(recipe: Recipe, checkpoint: Checkpoint, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a block is read in: float32 (the methods' dtype), or the calibration dtype when that is the
    checkpoint's own and the recipe is one weight quantizer (RTN, GPTQ; a KV-cache setting beside it).

    Such a method reads each linear as float32 (exact from the checkpoint's values) and writes codes; the
    calibration passes ran on a copy of the block cast to that dtype anyway, and a dense weight is written in
    it. So nothing computed or written changes, and the block is held once, in half the bytes, instead of in
    float32 and again as that copy (a 1B block: 0.24 GB + 0.12 GB -> 0.12 GB). Only the per-linear errors
    see the rewritten weight as stored (rounded to that dtype)."""
    stages = [s for s in recipe.stages if s.method != "kv-cache"]
    if compute_dtype != checkpoint.float_dtype() or len(stages) != 1 or stages[0].method not in QUANTIZERS:
        return torch.float32
    return compute_dtype


def packs(recipe: Recipe, format: str) -> bool:
    """Whether the streamed run writes packed codes (a weight quantizer, and a format other than dense)."""
    return format != "dense" and any(s.method in QUANTIZERS for s in recipe.stages)


def run_blocks(model: nn.Module, checkpoint: Checkpoint, recipe: Recipe, samples: torch.Tensor | None,
               device: torch.device, compute_dtype: torch.dtype | None, placement: Placement, spill: Path,
               **kw) -> dict[str, dict]:
    """The engine on a skeleton whose blocks ``placement`` reads from ``checkpoint``: each linear's original weight
    for its error read again from there, the blocks' reference outputs waiting on disk in ``spill``; ``kw`` as
    :func:`~llmpress.engine.compress_blocks` takes them. The streamed run and the plan's probe block both run this."""
    arch = arch_for(model)
    prefix = block_prefix(model, get_blocks(model, arch))
    return compress_blocks(model, arch, recipe.stages, samples, device, recipe.calibration.batch_size,
                           placement=placement, compute_dtype=compute_dtype,
                           originals=lambda i, name: checkpoint.get(f"{prefix}{i}.{name}.weight", torch.float32),
                           spill=spill, **kw)


def embed_for_capture(model: nn.Module, checkpoint: Checkpoint):
    """Read the input embedding to embed the calibration windows; returns the function that drops it again.

    A plain lookup table is read in the checkpoint's dtype and its rows cast to float32: the same values as a
    float32 table, for half the bytes (an embedding that computes, e.g. Gemma's scaled one, is read in float32).
    """
    embedding = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embedding)
    plain = type(embedding) is nn.Embedding
    materialize(model, name, checkpoint, checkpoint.float_dtype() if plain else torch.float32)
    hook = embedding.register_forward_hook(lambda _m, _args, output: output.float()) if plain else None

    def drop() -> None:
        if hook is not None:
            hook.remove()
        release(embedding, model)

    return drop


def compress_streamed(source: Path, tokenizer, recipe: Recipe, samples: torch.Tensor | None, out: str | Path,
                      device: torch.device, compute_dtype: torch.dtype | None, progress: bool, format: str,
                      notes: list[str], memory=None) -> tuple[dict, dict, Path, float]:
    """Run ``recipe`` on the checkpoint ``source`` (a model folder or a .gguf file) block by block and write ``out``
    as it goes (see the module docstring). Returns (layers, blocks, path, seconds of compression, over all resumed
    runs)."""
    start = time.perf_counter()
    out = check_new_path(out, "--out", "output folder")
    config = source_config(source)
    checkpoint = open_checkpoint(source, config)
    model = skeleton(config)
    reason = check_names(model, checkpoint)
    if reason is not None:
        raise LlmpressError(f"cannot stream '{source}': {reason}; run with --stream off to load it whole")
    arch = arch_for(model)
    if arch.transposed:
        raise LlmpressError("cannot stream a GPT-2 (Conv1D) model: run with --stream off")
    pack = packs(recipe, format)
    key = fingerprint(checkpoint, recipe, samples, device, compute_dtype, format)
    staging = Staging(out, key)
    resumed = staging.open(f"{recipe.name} on {source}")
    if resumed:
        log.warning("resuming the unfinished run in %s after block %d", staging.folder.name, staging.done - 1)
    try:
        writer = _Writer(staging.folder, model, checkpoint, pack)
        blocks = get_blocks(model, arch)
        prefix = block_prefix(model, blocks)
        layers, block_records = staging.layers, staging.blocks
        results: dict[str, Compressed] = {}
        calibrated = samples is not None
        drop_embedding = (embed_for_capture(model, checkpoint) if calibrated and staging.done < len(blocks)
                          else (lambda: None))
        placement = _StreamPlacement(model, checkpoint, prefix, device, drop_embedding,
                                     block_dtype(recipe, checkpoint, compute_dtype))
        previous = staging.seconds

        def after_block(i: int, block: nn.Module, hidden: list[torch.Tensor] | None) -> None:
            writer.block(i, block, layers, results)
            staging.record(i + 1, layers, block_records, hidden, previous + time.perf_counter() - start)

        if staging.done < len(blocks):
            layers.update(run_blocks(model, checkpoint, recipe, samples, device, compute_dtype, placement,
                                     staging.folder / SPILL, progress=progress, results=results,
                                     block_records=block_records, start=staging.done,
                                     hidden=staging.hidden() if resumed else None, after_block=after_block,
                                     layers=layers))
        drop_embedding()
        schemes = writer.finish(layers)
        seconds = previous + time.perf_counter() - start
        _write_metadata(staging.folder, model, tokenizer, source, recipe, layers, block_records, schemes,
                        writer, seconds, notes + (["resumed after a kill"] if resumed else []),
                        None if memory is None else memory.so_far())
        path = staging.finish()
    except BaseException as exc:
        # nothing worth resuming, or bad input found by this run: nothing is left behind; else the progress stays
        if staging.done == 0 or (isinstance(exc, LlmpressError) and not resumed):
            shutil.rmtree(staging.folder, ignore_errors=True)
        else:
            (staging.folder / LOCK).unlink(missing_ok=True)
            log.warning("the run stopped after %d of its blocks; the same command resumes it", staging.done)
        raise
    checkpoint.close()
    return layers, block_records, path, seconds


def _write_metadata(tmp: Path, model: nn.Module, tokenizer, source: Path, recipe: Recipe, layers: dict,
                    blocks: dict, schemes: dict, writer: _Writer, seconds: float, notes: list[str],
                    peak: int | None) -> None:
    config = model.config
    if schemes:
        packed = {n for names in schemes.values() for n in names}
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in packed]
        config.quantization_config = quantization_config(schemes, ignore)
    config.save_pretrained(tmp)
    if schemes:
        del config.quantization_config
    generation = source / "generation_config.json"  # a folder's (a .gguf file has none)
    if generation.is_file():
        shutil.copyfile(generation, tmp / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    meta = {"recipe": recipe.to_dict(), "layers": layers, "blocks": blocks, "notes": notes,
            "compress_time_s": round(seconds, 3), "peak_memory_bytes": peak, "streamed": True}
    if schemes:
        meta["export"] = {"format": "compressed-tensors", "compression_format": PACKED,
                          "scale_dtype": str(writer.dtype).removeprefix("torch."),
                          "packed_layers": sum(len(v) for v in schemes.values()), "packed_embedding": None,
                          "dense_conv1d_layers": [], "vllm_marlin_misfits": None}
        meta["readers"] = readers({"quantization_config": config_dict(tmp)})
    else:
        meta["export"] = {"format": "dense", "dtype": str(writer.dtype).removeprefix("torch.")}
        meta["readers"] = readers(tmp)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


def config_dict(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
