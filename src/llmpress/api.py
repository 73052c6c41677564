"""The Python API: ``compress`` a model with a recipe, ``evaluate`` what it cost.

The CLI is a thin layer over these two functions.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .calib import calibration_dtype
from .compressed import Grid
from .data import calibration_samples, describe_spec, eval_windows, load_text
from .data.sources import offline_if_unreachable
from .data.tasks import LOCAL_TASKS, local_task_folder
from .engine import compress_blocks, merge_meta, run_plan
from .errors import LlmpressError
from .export import formats
from .export.gguf import gguf_size
from .export.gguf_blocks import BLOCK, why_not
from .export.gguf_write import check_gguf_out, write_gguf
from .measure import PeakMemory, flops_per_token, perplexity, size_report, speed
from .measure.attribution import METRICS as ERROR_METRICS
from .measure.plots import error_records
from .measure.streamed import cannot_stream, open_folder, should_stream, streamed_perplexity
from .models.archs import arch_for
from .models.loader import (
    DEFAULT_MODEL,
    LoadedModel,
    load_model,
    local_source,
    source_config,
    source_gguf,
    source_notes,
    source_tokenizer,
)
from .recipe import Recipe, load_recipe
from .registry import get_method
from .resume import NO_RESUME, Resume, StageFolder
from .save import check_output, check_space
from .stream import why_not as why_not_streamed

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    in_memory: torch.nn.Module | None  # None after a streamed run: ``model`` then reads the output folder
    tokenizer: object | None
    recipe: Recipe
    layers: dict[str, dict]
    seconds: float
    peak_memory_bytes: int | None = None
    out: Path | None = None
    notes: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)  # layer name -> Compressed (codes, scales, mask) for export
    blocks: dict[str, dict] = field(default_factory=dict)  # block name -> {"output_error": ...} (engine)
    gguf: object | None = None  # the GgufReport of a --format gguf save (tensor types, re-rounded tensors)

    @property
    def model(self) -> torch.nn.Module:
        """The compressed model: in memory, or (after a streamed run) loaded from the output folder on first use."""
        if self.in_memory is None and self.out is not None:
            self.in_memory = load_model(self.out).model
        return self.in_memory

    @property
    def meta(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "layers": self.layers, "blocks": self.blocks, "notes": self.notes,
                "compress_time_s": round(self.seconds, 3), "peak_memory_bytes": self.peak_memory_bytes}


def _loaded(model, tokenizer=None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(model)
    if isinstance(model, torch.nn.Module):
        return LoadedModel(model, tokenizer, type(model).__name__)
    raise LlmpressError(f"model must be a path, alias, hub id or a transformers model, not {type(model).__name__}")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device this machine can compute on; anything else is a one-line error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LlmpressError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            fix = f"cpu or cuda:0 … cuda:{count - 1} ({count} CUDA devices here)" if count else "cpu (no CUDA here)"
            raise LlmpressError(f"device '{device}' is not available here: use --device {fix}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise LlmpressError(f"device '{device}' is not available here: use --device cpu (no Apple GPU here)")
    elif dev.type != "cpu":
        raise LlmpressError(f"device '{device}' cannot run llmpress (it computes on cpu, cuda or mps): "
                            "use --device cpu or cuda")
    return dev


def context_length(config) -> int | None:
    """The longest sequence the model's position encoding is configured for, when the config says."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_seq_len(model: torch.nn.Module, seq_len: int, what: str = "--seq-len", flag: str = "--seq-len") -> None:
    """Refuse windows longer than the model's context before any work (they would fail or crawl)."""
    limit = context_length(model.config) if hasattr(model, "config") else None
    if limit is not None and seq_len > limit:
        raise LlmpressError(f"{what} {seq_len} is longer than the model's context of {limit} tokens "
                            f"(max_position_embeddings): use {flag} {limit} or less")


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each shared tensor once: a rough size of a dense save."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def compress(model=DEFAULT_MODEL, recipe="rtn-w4-g64", *, tokenizer=None, data: str | None = None,
             samples: int | None = None, seq_len: int | None = None, seed: int | None = None,
             out: str | Path | None = None, device: str = "cpu", progress: bool = False,
             format: str = "auto", gguf: dict | None = None, stream: str = "auto") -> CompressResult:
    """Compress ``model`` with ``recipe`` block by block; save to ``out`` when given.

    ``data``/``samples``/``seq_len``/``seed`` override the recipe's calibration settings.
    ``format``: "compressed-tensors" (packed low-bit weights, loadable by transformers and vLLM),
    "dense" (a plain folder of dequantized weights), or "auto": compressed-tensors whenever some
    linear was weight-quantized and can be packed, else dense; "gguf": one llama.cpp file (``out`` ends in
    .gguf), each linear with its own codes where its grid is a GGUF block type (``gguf``: the options of
    ``llmpress.export.gguf_write.write_gguf``: dense, embedding, requantize). A pruned, unquantized model asked for
    as "compressed-tensors" is written sparse-bitmask / sparse-24-bitmask (``llmpress.export.sparse``:
    real bytes; ``llmpress.load_model`` reads it, transformers 5.x no longer can).
    Each rewritten linear's record gets its error against the original weight (``output_error`` on
    the calibration data, or ``weight_error`` when the recipe has none; ``llmpress.engine``), and
    ``blocks`` each block's output error; ``data``/``samples`` given to a recipe that needs no
    calibration (RTN) are used for these output errors alone.
    ``stream``: "auto" (default) compresses a safetensors folder block by block from disk, writing each block
    to ``out`` as it finishes (``llmpress.stream``: memory of one block, the checkpoint's dtype kept, resumable
    after a kill by the same call) whenever the recipe's stages allow it and ``out`` is given, else in memory;
    "on" insists (a one-line error says why it cannot), "off" loads the whole model.
    >>> result = compress("smollm2-135m", "rtn-w4-g64", out="smollm2-w4")  # doctest: +SKIP
    """
    recipe = _with_calibration(load_recipe(recipe), data=data, samples=samples, seq_len=seq_len, seed=seed)
    if format not in FORMATS:
        raise LlmpressError(f"unknown format '{format}': use one of {', '.join(FORMATS)}")
    if format == "gguf" and not (gguf or {}).get("requantize"):
        _check_gguf_grids(recipe)
    if out is not None and format == "gguf":
        check_gguf_out(out)
    elif out is not None:
        check_output(out)
    calibrate = recipe.needs_calibration or data is not None or samples is not None  # else weight errors only
    if calibrate:
        describe_spec(recipe.calibration.data)
    dev = resolve_device(device)
    folder = _streamable(model, recipe, out, format, stream)
    if folder is not None:
        return _compress_streamed(folder, tokenizer, recipe, out, dev, progress, format, calibrate)
    loaded = _loaded(model, tokenizer)
    arch = arch_for(loaded.model)
    _check_plan(loaded.model, recipe, out, calibrate)
    ids = _calibration_ids(loaded.tokenizer, recipe) if calibrate else None
    start = time.perf_counter()
    compute_dtype = calibration_dtype(recipe.calibration.dtype, dev)
    stage_folder = _stage_folder(model, recipe, out, ids, dev, compute_dtype, format)
    resume = stage_folder.open() if stage_folder is not None else NO_RESUME
    finished, failure = False, None
    try:
        result = _compress_loaded(loaded, arch, recipe, ids, dev, compute_dtype, progress, resume, start)
        if out is not None and format == "gguf":
            result.gguf = write_gguf(loaded.model, loaded.tokenizer, out, results=result.results, layers=result.layers,
                                     source_gguf=source_gguf(loaded), meta=result.meta, **(gguf or {}))
            result.out = result.gguf.path
        elif out is not None:  # the format table (llmpress.export.formats) chooses and writes
            result.out = formats.save(loaded.model, loaded.tokenizer, out, result.meta, result.layers, result.results,
                                      format)
        finished = True
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if stage_folder is not None:
            stage_folder.close(finished, bad_input=isinstance(failure, LlmpressError))
    return result


def _compress_loaded(loaded: LoadedModel, arch, recipe: Recipe, ids, dev: torch.device, compute_dtype,
                     progress: bool, resume: Resume, start: float) -> CompressResult:
    """The stages of ``recipe`` on the whole model in memory, in order (block stages through the engine,
    model-level ones on the model, each with its resume point in ``resume``)."""
    results: dict = {}
    teacher = _teacher(loaded.model, recipe)
    blocks: dict[str, dict] = {}
    touched: list[set[str]] = []  # the layers each segment rewrote
    with PeakMemory(dev) as mem:
        layers: dict[str, dict] = {}
        for k, (model_stage, stages) in enumerate(_segments(recipe.stages)):
            if model_stage:
                method = get_method(stages[0].method)
                extra = {"teacher": teacher, "tokenizer": loaded.tokenizer, "layers": layers, "results": results,
                         "resume": resume.scoped(f"{k}-{method.name}")}
                done = method.fn(loaded.model, arch, ids, stages[0].config, device=dev,
                                 batch_size=recipe.calibration.batch_size, progress=progress,
                                 **{name: extra[name] for name in method.inputs})
                if method.kind == "plan":  # the method chose per-block settings; the engine runs them
                    done = run_plan(loaded.model, arch, done, ids, device=dev,
                                    batch_size=recipe.calibration.batch_size, progress=progress, results=results,
                                    compute_dtype=compute_dtype, block_records=blocks)
            else:
                done = compress_blocks(loaded.model, arch, stages, ids, dev, recipe.calibration.batch_size,
                                       progress=progress, results=results, compute_dtype=compute_dtype,
                                       block_records=blocks)
                arch = arch_for(loaded.model)  # the stage may have changed the structure
            for name, meta in done.items():
                layers[name] = merge_meta(layers.get(name), meta)
            touched.append(set(done))
    del teacher
    _keep_errors_of_one_segment(layers, blocks, touched)
    return CompressResult(loaded.model, loaded.tokenizer, recipe, layers, time.perf_counter() - start,
                          mem.peak_bytes, notes=[*loaded.notes, f"compressed from {loaded.source}"],
                          results=results, blocks=blocks)


def _stage_folder(model, recipe: Recipe, out, ids, dev: torch.device, compute_dtype, format: str):
    """The hidden folder where this run's model-level stages keep their resume points (``llmpress.resume``), or
    None: no output path, a model not read from local files, or no stage that keeps any."""
    if out is None or not isinstance(model, (str, Path)):
        return None
    if not any("resume" in get_method(s.method).inputs for s in recipe.stages):
        return None
    source = local_source(model)
    if source is None:
        return None
    from .models.sources import open_checkpoint
    from .stream import fingerprint

    try:
        checkpoint = open_checkpoint(source)
    except LlmpressError:  # weights in another form (a pickle, a packed folder read by transformers): no resume
        return None
    key = fingerprint(checkpoint, recipe, ids, dev, compute_dtype, format)
    return StageFolder(Path(out).expanduser(), key, f"{recipe.name} on {model}")



def plan(model=DEFAULT_MODEL, recipe="rtn-w4-g64", *, data: str | None = None, samples: int | None = None,
         seq_len: int | None = None, out: str | Path | None = None, device: str = "cpu"):
    """The :class:`~llmpress.plan.Plan` of ``compress(model, recipe, out=out, ...)``: peak RAM, device memory, disk
    and time, from the checkpoint's headers and two probe blocks (``llmpress.plan``). Streamed runs only."""
    from .plan import plan_streamed

    recipe = _with_calibration(load_recipe(recipe), data=data, samples=samples, seq_len=seq_len)
    source = local_source(model) if isinstance(model, (str, Path)) else None
    reason = why_not_streamed(source, recipe, "auto")
    if reason is not None:
        raise LlmpressError(f"cannot plan this run: {reason} (plans cover runs streamed from a safetensors folder "
                            "or a .gguf file)")
    dev = resolve_device(device)
    ids = None
    if recipe.needs_calibration or data is not None or samples is not None:
        describe_spec(recipe.calibration.data)
        ids = _calibration_ids(source_tokenizer(source), recipe)
    return plan_streamed(source, recipe, ids, dev, None if out is None else Path(out).expanduser(), name=str(model))


def _with_calibration(recipe: Recipe, **overrides) -> Recipe:
    """``recipe`` with the calibration settings given (not None) in place of its own."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return recipe
    return dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, **given))


def _calibration_ids(tokenizer, recipe: Recipe) -> torch.Tensor:
    """The recipe's calibration windows (N, L) of token ids; a one-line error without a tokenizer."""
    if tokenizer is None:
        raise LlmpressError("this recipe needs calibration text but the model has no tokenizer: pass one")
    c = recipe.calibration
    return calibration_samples(tokenizer, c.data, c.samples, c.seq_len, c.seed)


STREAM = ("auto", "on", "off")


def _streamable(model, recipe: Recipe, out, format: str, stream: str) -> Path | None:
    """The folder or .gguf file to compress streamed (``llmpress.stream``), or None for the in-memory path."""
    if stream not in STREAM:
        raise LlmpressError(f"unknown stream setting '{stream}': use one of {', '.join(STREAM)}")
    if stream == "off":
        return None
    folder, reason = None, "the model is given in memory"
    if isinstance(model, (str, Path)):
        folder = local_source(model)
        reason = why_not_streamed(folder, recipe, format) if out is not None else "no --out to write to"
    if reason is None:
        return folder
    if stream == "on":
        raise LlmpressError(f"cannot compress this run streamed: {reason}; use --stream off (or auto)")
    log.debug("compressing in memory: %s", reason)
    return None


def _compress_streamed(folder: Path, tokenizer, recipe: Recipe, out, dev: torch.device, progress: bool,
                       format: str, calibrate: bool) -> CompressResult:
    """:func:`compress` for a checkpoint folder or .gguf file, block by block from disk (``llmpress.stream``)."""
    from types import SimpleNamespace

    from .models.sources import open_checkpoint
    from .stream import compress_streamed

    tokenizer = tokenizer if tokenizer is not None else source_tokenizer(folder)
    config = source_config(folder)
    if calibrate:
        check_seq_len(SimpleNamespace(config=config), recipe.calibration.seq_len, "calibration seq_len")
    check_space(out, open_checkpoint(folder, config).total_bytes())
    ids = _calibration_ids(tokenizer, recipe) if calibrate else None
    notes = [*source_notes(folder), f"compressed from {folder}"]
    from .plan import check, plan_streamed

    check(plan_streamed(folder, recipe, ids, dev, Path(out).expanduser(), probe=False))
    with PeakMemory(dev) as mem:
        layers, blocks, path, seconds = compress_streamed(
            folder, tokenizer, recipe, ids, out, dev, calibration_dtype(recipe.calibration.dtype, dev), progress,
            format, notes, memory=mem)
    return CompressResult(None, tokenizer, recipe, layers, seconds, mem.peak_bytes, out=path, notes=notes,
                          blocks=blocks)


# "auto" and the families of the format table (compressed-tensors, dense), and GGUF (one file, not a folder)
FORMATS = (*formats.REQUESTS, "gguf")


def _check_gguf_grids(recipe: Recipe) -> None:
    """Before any work, refuse a ``--format gguf`` run whose quantizer grids are no GGUF block type (the
    writer checks every layer again; this only saves a wasted run)."""
    for stage in recipe.stages:
        for config in (stage.config, *(c for _, c in stage.overrides)):
            bits, group = getattr(config, "bits", None), getattr(config, "group_size", None)
            if get_method(stage.method).kind != "quantize" or not isinstance(bits, int) or group is None:
                continue
            if getattr(config, "kquant", None) is not None:  # a K-quant, or llama.cpp's fallback for narrow rows
                continue
            why = why_not(Grid(bits, group, bool(getattr(config, "sym", True))), BLOCK)
            if why:
                raise LlmpressError(f"recipe '{recipe.name}' quantizes to a grid that fits no GGUF type "
                                    f"({stage.method}: {why}): use a GGUF recipe (gptq-q4_0, rtn-q4_1, ... see "
                                    "'llmpress recipes') or pass --requantize Q4_0 to re-round the layers, reported")


def _check_plan(model: torch.nn.Module, recipe: Recipe, out: str | Path | None, calibrate: bool) -> None:
    """What can be checked once the model is known, before any work: window lengths and disk space."""
    if calibrate:
        check_seq_len(model, recipe.calibration.seq_len, "calibration seq_len")
    for stage in recipe.stages:  # stages with windows of their own (distillation)
        seq_len = getattr(stage.config, "seq_len", None)
        if isinstance(seq_len, int):
            check_seq_len(model, seq_len, f"{stage.method} seq_len", f"{stage.method}(seq_len=...)")
    if out is not None:
        check_space(out, param_bytes(model))


def _keep_errors_of_one_segment(layers: dict[str, dict], blocks: dict[str, dict], touched: list[set[str]]) -> None:
    """Drop the recorded errors that no longer compare the final weights with the original ones.

    The engine measures each layer (and block) against its weights at the start of its own segment; a
    layer that another segment also rewrote (distillation after GPTQ, a second engine run after a model
    stage) has no error against the original, and nor has a block holding such a layer.
    """
    counts = Counter(name for names in touched for name in names)
    redone = {name for name, count in counts.items() if count > 1}
    for name in redone:
        for key in ERROR_METRICS:
            layers[name].pop(key, None)
    for block in [b for b in blocks if any(name.startswith(b + ".") for name in redone)]:
        del blocks[block]


def _teacher(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module | None:
    """A frozen copy of the model before any stage, when some stage asks for one (distillation)."""
    if not any("teacher" in get_method(s.method).inputs for s in recipe.stages):
        return None
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def _segments(stages) -> list[tuple[bool, list]]:
    """Split recipe stages into runs for the block engine and single model-level stages, in order.

    A method of kind "model" or "plan" (depth pruning, globally allocated factorization, OWL) sees
    the whole model at once (``llmpress.registry``: ``ModelMethod``, ``PlanMethod``); the stages
    around it go through :func:`compress_blocks` as usual.
    """
    segments: list[tuple[bool, list]] = []
    for stage in stages:
        if get_method(stage.method).kind in ("model", "plan"):
            segments.append((True, [stage]))
        elif segments and not segments[-1][0]:
            segments[-1][1].append(stage)
        else:
            segments.append((False, [stage]))
    return segments


LONG_EVAL_TOKENS = 4 * 16 * 1024  # four times the default evaluation (16 windows of 1024 tokens)


def _announce(windows: torch.Tensor, max_windows: int | None, description: str) -> None:
    """Say up front how much text an evaluation of all windows (max_windows None / --max-windows 0) reads."""
    if max_windows is not None:
        return
    count, length = windows.shape
    tokens = count * length
    log.info("evaluating all %d windows of %d tokens of %s (%s tokens)", count, length, description, f"{tokens:,}")
    if tokens > LONG_EVAL_TOKENS:
        log.warning("evaluating %s tokens, %.0fx the default evaluation (16 windows of 1024), will take "
                    "long: use --max-windows N for a shorter run", f"{tokens:,}", tokens / (16 * 1024))


def _task_paths(tasks: list[str], include_path: list[str] | None, task_data: str) -> list[str]:
    """Check the task request before any model is loaded; returns the include paths lm-eval needs
    (the user's, plus the local tasks' folder, built from ``task_data`` when they are asked for)."""
    from .measure.tasks import task_manager

    paths = [str(Path(p).expanduser()) for p in include_path or []]
    if any(t in LOCAL_TASKS for t in tasks):
        describe_spec(task_data)
        paths.append(str(local_task_folder(task_data, load_text(task_data))))
    task_manager(paths, tasks)  # refuses unknown task names
    return paths


STREAM_NO_SPEED = "pass --stream off to measure speed with the whole model in memory, or --no-speed"
_STREAM_SETTINGS = {None: None, "auto": None, True: True, "on": True, False: False, "off": False}


def _streamed_folder(model, stream: bool | str | None, tasks: list[str] | None):
    """The folder ``evaluate`` reads block by block (a ``StreamedModel``), or None to load the model whole."""
    if stream not in _STREAM_SETTINGS:
        raise LlmpressError(f"unknown stream setting {stream!r}: use True / 'on', False / 'off' or None / 'auto'")
    setting = _STREAM_SETTINGS[stream]
    if setting is False or (setting is None and not should_stream(model)):
        return None
    reason = cannot_stream(model)
    if reason is not None:
        raise LlmpressError(reason)
    if tasks:
        raise LlmpressError("--tasks runs the whole model and cannot be streamed: drop --tasks (or pass --stream off "
                            "on a machine with the memory for it)")
    return open_folder(model)


def _loaded_streamed(streamed, source, tokenizer) -> LoadedModel:
    """A streamed folder as the LoadedModel evaluate() reports on (its model a skeleton on meta)."""
    notes = [*streamed.notes, "evaluated block by block (streamed from disk)"]
    gguf = streamed.folder if streamed.folder.is_file() else None  # a .gguf file: its size as stored
    return LoadedModel(streamed.model, tokenizer if tokenizer is not None else streamed.tokenizer, str(source),
                       None if gguf else streamed.folder, streamed.meta, notes, gguf)


def evaluate(model=DEFAULT_MODEL, data: str = "austen:eval", *, tokenizer=None, seq_len: int = 1024,
             max_windows: int | None = 16, device: str = "cpu", layers: dict | None = None,
             measure_speed: bool = True, progress: bool = False, name: str | None = None,
             kv_cache=None, tasks: list[str] | None = None, limit: int | float | None = None,
             num_fewshot: int | None = None, include_path: list[str] | None = None,
             task_data: str = "austen:eval2", task_batch_size: int = 8,
             stream: bool | str | None = None) -> dict:
    """Perplexity, size, FLOPs, speed and memory of ``model`` on consecutive windows of ``data``.

    Returns one JSON-able dict; its top-level keys ``perplexity``, ``params``, ``size_bytes``,
    ``bits_per_weight`` and ``compression_ratio`` are a stable interface.
    ``kv_cache`` (a ``KVCacheConfig``, its fields as a dict, or a bit width; 16 = off) quantizes the
    KV cache during the perplexity forward; by default the model's own recipe (a ``kv-cache``
    stage) decides. The report then has a ``kv_cache`` entry (setting and bytes per token).
    ``tasks`` (lm-eval task names, with ``limit``/``num_fewshot``/``include_path`` as lm-eval's CLI takes them)
    adds a ``tasks`` entry: per task the headline metric, its standard error, all metrics and the
    per-document scores (``llmpress.measure.tasks``), with the KV-cache setting applied. The built-in local
    tasks ``llmpress_lastword`` and ``llmpress_nextsent`` are built from ``task_data`` (``llmpress.data.tasks``).
    ``stream`` (True/"on", False/"off", None/"auto"): evaluate a local safetensors folder (dense or pack-quantized)
    or a .gguf file block by block from disk, never holding the whole model (``llmpress.measure.streamed``: the
    same perplexity to the last bit); "auto" streams when the dense model in float32 would take more than half the
    memory available. The report then has ``"streamed": True``, no ``speed`` (a note says so), and ``tasks`` are
    refused.
    """
    description = describe_spec(data)  # a bad spec fails before the model is loaded
    task_paths = _task_paths(tasks, include_path, task_data) if tasks else None
    runtime = get_method("kv-cache").runtime
    kv = runtime.coerce(kv_cache)
    dev = resolve_device(device)
    blocks = None
    if isinstance(model, CompressResult):
        layers = model.layers if layers is None else layers
        blocks = model.blocks
        kv = kv or runtime.from_meta(model.meta)
        model = LoadedModel(model.model, model.tokenizer, "compressed (in memory)", notes=model.notes)
    streamed = _streamed_folder(model, stream, tasks)
    loaded = _loaded(model, tokenizer) if streamed is None else _loaded_streamed(streamed, model, tokenizer)
    if loaded.tokenizer is None:
        raise LlmpressError("the model has no tokenizer, so text cannot be evaluated: pass a tokenizer")
    layers = loaded.meta.get("layers") if layers is None else layers
    blocks = loaded.meta.get("blocks") if blocks is None else blocks
    kv = kv or runtime.from_meta(loaded.meta)
    check_seq_len(loaded.model, seq_len)
    windows = eval_windows(loaded.tokenizer, data, seq_len, max_windows)
    _announce(windows, max_windows, description)
    with PeakMemory(dev) as mem:
        if streamed is None:
            ppl = perplexity(loaded.model.to(dev), windows, dev, progress=progress,
                             cache_factory=runtime.cache_factory(loaded.model, kv))
        else:
            ppl = streamed_perplexity(streamed, windows, dev, progress=progress,
                                      cache_factory=runtime.cache_factory(loaded.model, kv))
    nonzero = ppl.get("nonzero")  # a streamed model's parameters are on meta: counted as they were read
    size = size_report(loaded.model, layers, loaded.folder, nonzero=nonzero)
    if loaded.gguf is not None:  # a GGUF file: its tensors as stored, not the dequantized model in memory
        size.update(gguf_size(loaded.gguf))
        size["compression_ratio"] = size["dense_bytes"] / size["size_bytes"]
    flops = flops_per_token(loaded.model.config, seq_len, layers, model=loaded.model, nonzero=nonzero)
    report = {
        "name": name or loaded.source,
        "model": loaded.source,
        "data": data,
        "data_description": description,
        "perplexity": ppl["perplexity"],
        "loss": ppl["loss"],
        "tokens": ppl["tokens"],
        "windows": ppl["windows"],
        "seq_len": seq_len,
        "params": size["params"],
        "size_bytes": size["size_bytes"],
        "dense_bytes": size["dense_bytes"],
        "disk_bytes": size["disk_bytes"],
        "bits_per_weight": size["bits_per_weight"],
        "linear_bits_per_weight": size["linear_bits_per_weight"],
        "embedding_bits_per_weight": size["embedding_bits_per_weight"],
        "compression_ratio": size["compression_ratio"],
        "flops_per_token": flops["flops_per_token"],
        "flops": flops,
        "peak_memory_bytes": mem.peak_bytes,
        "notes": loaded.notes,
    }
    if kv is not None:
        report["kv_cache"] = runtime.report(kv, loaded.model.config)
    if tasks:
        from .measure.tasks import run_tasks

        started = time.perf_counter()
        with offline_if_unreachable():
            report["tasks"] = run_tasks(loaded.model, loaded.tokenizer, tasks, include_path=task_paths,
                                        limit=limit, num_fewshot=num_fewshot, batch_size=task_batch_size,
                                        cache_factory=runtime.cache_factory(loaded.model, kv))
        report["task_data"] = task_data if any(t in LOCAL_TASKS for t in tasks) else None
        report["task_seconds"] = round(time.perf_counter() - started, 1)
    if streamed is not None:
        report["streamed"] = True
    if measure_speed and streamed is not None:
        log.warning("speed is not measured when streaming (it runs the whole model in memory): %s", STREAM_NO_SPEED)
        report["notes"] = [*loaded.notes, f"speed not measured (streamed block by block): {STREAM_NO_SPEED}"]
    elif measure_speed:
        report["speed"] = speed(loaded.model, dev, progress=progress)
    errors = error_records(layers, blocks)
    if errors:
        report["errors"] = errors
    if "compress_time_s" in loaded.meta:
        report["compress_time_s"] = loaded.meta["compress_time_s"]
    return report
