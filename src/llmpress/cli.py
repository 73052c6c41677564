"""The ``llmpress`` command: parse, call the API, print.

One error boundary (:func:`main`): bad input and every foreseeable failure (I/O, a damaged file, a resource
limit) exits 2 with one ``llmpress: error:`` line naming the problem and the fix; Ctrl-C exits 130 with one
line; anything else is a bug and exits 1 with one line that says so. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

from .errors import LlmpressError, describe_failure, first_line, foreseeable
from .models.loader import DEFAULT_MODEL
from .progress import silenced

DEMO_RECIPES = ("rtn-w4-g64", "rtn-w4-g64-asym", "magnitude-50")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), worded like every other llmpress error."""

    def error(self, message: str):
        self.exit(2, f"llmpress: error: {message}; see '{self.prog} --help'\n")


def _add_debug(p: argparse.ArgumentParser, default=False) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="on an error, show the Python traceback instead of one line")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def _add_outputs(p: argparse.ArgumentParser, json_help: str = "write the report (JSON) to this file") -> None:
    p.add_argument("--json", help=json_help)
    p.add_argument("--report", help="write report.json, report.md and PNG plots to this new folder")


def _add_kv_bits(p: argparse.ArgumentParser, whose: str) -> None:
    p.add_argument("--kv-bits", type=int, choices=[2, 4, 8, 16],
                   help=f"quantize the KV cache{whose} to this many bits while evaluating "
                        "(16 = off; default: the model's recipe)")


def _add_gguf_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("GGUF (--format gguf)")
    g.add_argument("--dense-type", default="F16", type=str.upper,
                   help="type of 2-D tensors without codes: F16 (default), BF16, F32, or a block type "
                        "(Q8_0, Q4_0, ...: re-rounded with llama.cpp's reference rounding)")
    g.add_argument("--embedding-type", type=str.upper,
                   help="type of the embedding and an untied head (default Q8_0 when linears are quantized, "
                        "as llama.cpp writes SmolLM2's; else --dense-type)")
    g.add_argument("--requantize", type=str.upper,
                   help="re-round linears whose grid is no GGUF block type (e.g. group 64) to this type "
                        "(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), reported; default: refuse them")


def _gguf_options(args) -> dict:
    return {"dense": args.dense_type, "embedding": args.embedding_type, "requantize": args.requantize}


def _add_eval_window_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="austen:eval", help="evaluation text (default austen:eval = Persuasion)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--max-windows", type=int, default=16, help="windows evaluated, 0 = all (default 16)")
    p.add_argument("--no-speed", action="store_true", help="skip the latency/throughput measurement")
    t = p.add_argument_group("downstream tasks (lm-eval-harness; pip install 'llmpress[eval]')")
    t.add_argument("--tasks", help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy; built in and "
                                   "offline: llmpress_lastword, llmpress_nextsent")
    t.add_argument("--limit", type=float, help="documents per task (a fraction if < 1), as lm-eval's --limit")
    t.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt, as lm-eval's --num_fewshot")
    t.add_argument("--include-path", action="append", help="folder of your own lm-eval task YAMLs (repeatable)")
    t.add_argument("--task-data", default="austen:eval2",
                   help="text the built-in local tasks are made from (default austen:eval2)")
    t.add_argument("--task-batch-size", type=int, default=8, help="lm-eval batch size (default 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmpress", description="Compress LLMs and measure what it cost.")
    _add_debug(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model with a recipe and save it")
    c.add_argument("model", help=f"alias ({DEFAULT_MODEL}), model folder, .gguf file or hub id")
    c.add_argument("--recipe", required=True, help="built-in recipe name or YAML file (see 'llmpress recipes')")
    c.add_argument("--out", required=True, help="output folder (must not exist; its parent folder must)")
    c.add_argument("--data", help="calibration text, overrides the recipe (e.g. austen:calib, text:FILE)")
    c.add_argument("--samples", type=int, help="calibration windows, overrides the recipe (a recipe without "
                   "calibration, e.g. RTN, then measures each layer's output error on them)")
    c.add_argument("--seq-len", type=int, help="calibration window length, overrides the recipe")
    c.add_argument("--seed", type=int, help="calibration sampling seed, overrides the recipe")
    c.add_argument("--format", default="auto", choices=["auto", "compressed-tensors", "dense", "gguf"],
                   help="auto (default): packed compressed-tensors when weights were quantized, else dense; "
                        "gguf: one llama.cpp file (--out FILE.gguf), each linear with its own codes")
    c.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                   help="auto (default): a safetensors folder or .gguf file is compressed block by block from disk, "
                        "each block "
                        "written as it finishes (memory of one block; the same command resumes a killed run); "
                        "on: insist; off: load the whole model")
    _add_gguf_options(c)
    _add_common(c)

    x = sub.add_parser("export", help="write a model or compressed folder in another format (GGUF for llama.cpp)")
    x.add_argument("model", help=f"compressed folder, model folder, .gguf file or alias ({DEFAULT_MODEL})")
    x.add_argument("--format", default="gguf", choices=["gguf"], help="gguf (default): one llama.cpp file")
    x.add_argument("--out", required=True, help="output file, FILE.gguf (must not exist; its folder must)")
    _add_gguf_options(x)
    x.add_argument("--debug", action="store_true", help="on an error, show the Python traceback instead of one line")

    e = sub.add_parser("eval", help="perplexity, size, FLOPs, speed and memory of a model")
    e.add_argument("model", help=f"alias ({DEFAULT_MODEL}), model folder, .gguf file or hub id")
    _add_eval_window_args(e)
    e.add_argument("--base", help="also evaluate this base model on the same windows, side by side")
    e.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                   help="on: read a safetensors folder or .gguf file one block at a time, never the whole model "
                        "(the same perplexity; no speed, no --tasks); auto (default): when the model would take "
                        "more than half the free memory; off: load it whole")
    _add_kv_bits(e, "")
    _add_outputs(e, "write the result (one JSON object) to this file")
    _add_common(e)

    d = sub.add_parser("demo", help="compress the default model with a few recipes and compare them to the base")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--recipes", default=",".join(DEMO_RECIPES), help="comma-separated recipe names or files")
    _add_eval_window_args(d)
    _add_outputs(d)
    _add_common(d)

    m = sub.add_parser("compare", help="evaluate several model folders on the same windows and plot them together")
    m.add_argument("folders", nargs="+", help="model folders, e.g. written by 'llmpress compress --out'")
    m.add_argument("--base", help="evaluate this base model first, on the same windows; Δppl is relative to it")
    _add_eval_window_args(m)
    _add_kv_bits(m, " of every model")
    _add_outputs(m)
    _add_common(m)

    w = sub.add_parser("sweep", help="compress and evaluate many recipes as parallel trials, one report")
    w.add_argument("model", help=f"alias ({DEFAULT_MODEL}) or model folder every trial starts from")
    w.add_argument("--recipes", help="comma-separated recipe names or YAML files")
    w.add_argument("--grid", help="a YAML or JSON file listing the recipes (a list, or {recipes: [...]})")
    w.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    w.add_argument("--ray", metavar="ADDRESS",
                   help="run each trial as a Ray task on this cluster ('local' starts one here; pip install "
                        "'llmpress[ray]')")
    _add_eval_window_args(w)
    _add_outputs(w)
    _add_common(w)

    a = sub.add_parser("auto", help="choose a mixed-precision recipe under a size budget (per-layer sensitivity)")
    a.add_argument("model", help=f"alias ({DEFAULT_MODEL}) or model folder")
    a.add_argument("--budget", required=True,
                   help="bits per weight over the block linears, scales included (3.5bpw), the whole saved "
                        "model as eval counts it (60MB), or a measured perplexity (ppl<=40, see --rounds)")
    a.add_argument("--out", required=True, help="the recipe YAML to write (a new file); run it with compress")
    a.add_argument("--methods", default="gptq", help="comma-separated weight methods to choose from (default gptq)")
    a.add_argument("--bits", default="2,3,4,8", help="bit widths the quantizers may use (default 2,3,4,8)")
    a.add_argument("--groups", default="32,64,128", help="group sizes the quantizers may use (default 32,64,128)")
    a.add_argument("--sparsities", default="0.5,2:4", help="settings the pruning methods may use (default 0.5,2:4)")
    a.add_argument("--no-dense", action="store_true", help="every block linear must be compressed")
    a.add_argument("--keep-embedding", action="store_true",
                   help="byte budgets: leave the embedding (and a tied head) at 16 bits; by default it takes part, "
                        "quantized at --bits and --groups or left dense")
    a.add_argument("--data", help="calibration text (default: the first method's recipe's, austen:calib)")
    a.add_argument("--samples", type=int, help="calibration windows (default 128)")
    a.add_argument("--seq-len", type=int, help="calibration window length (default 512)")
    a.add_argument("--seed", type=int, help="calibration sampling seed")
    a.add_argument("--fisher-samples", type=int, default=16,
                   help="windows of the backward pass that weighs each layer's error (default 16)")
    a.add_argument("--table", help="JSON file of the measured sensitivities: reused when it exists (same model, "
                                   "calibration and candidates), else written; other budgets then take seconds")
    a.add_argument("--rounds", type=int, default=3,
                   help="ppl<= budgets: compress-and-measure rounds, each correcting the prediction (default 3)")
    a.add_argument("--eval-data", default="austen:eval", help="ppl<= budgets: evaluation text (default austen:eval)")
    a.add_argument("--eval-windows", type=int, default=16, help="ppl<= budgets: 1024-token windows (default 16)")
    a.add_argument("--json", help="write the choice and its predicted cost (JSON) to this file")
    _add_common(a)

    i = sub.add_parser("inspect", help="the layers and blocks a compression hurt most, from a folder's records")
    i.add_argument("folders", nargs="+", metavar="FOLDER",
                   help="a folder written by 'llmpress compress'; with a second one, where their errors differ most")
    i.add_argument("--top", type=int, default=10, help="rows per table (default 10)")
    i.add_argument("--json", help="write the result (one JSON object) to this file")

    pl = sub.add_parser("plan", help="the peak RAM, device memory, disk and time a compression needs, before it runs")
    pl.add_argument("model", help=f"alias ({DEFAULT_MODEL}), model folder or .gguf file")
    pl.add_argument("--recipe", required=True, help="built-in recipe name or YAML file (see 'llmpress recipes')")
    pl.add_argument("--out", help="where the output would go (its disk's free space is checked)")
    pl.add_argument("--data", help="calibration text, overrides the recipe")
    pl.add_argument("--samples", type=int, help="calibration windows, overrides the recipe")
    pl.add_argument("--seq-len", type=int, help="calibration window length, overrides the recipe")
    pl.add_argument("--json", help="write the plan (one JSON object) to this file")
    _add_common(pl)

    r = sub.add_parser("recipes", help="list the built-in recipes")
    f = sub.add_parser("fetch", help="download the default model and corpus into the cache")
    _add_common(f)
    for p in (c, e, d, m, w, a, i, pl, r, f):
        _add_debug(p, default=argparse.SUPPRESS)  # also after the command; the value before it stays
    return parser


def _check_windows(args) -> None:
    if args.seq_len < 2:
        raise LlmpressError(f"--seq-len {args.seq_len} is too small: use at least 2 tokens per window")
    if args.max_windows < 0:
        raise LlmpressError(f"--max-windows {args.max_windows} is negative: use 0 for all windows, or a positive count")


def _check_outputs(args) -> None:
    """--json / --report: new paths in existing, writable folders (the rule --out follows too)."""
    from .save import check_new_path

    for flag in ("json", "report"):
        if getattr(args, flag, None):
            check_new_path(getattr(args, flag), f"--{flag}")


def _write_json(path: Path, data: dict) -> None:
    from .paths import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def _evaluate_kwargs(args) -> dict:
    """evaluate()'s keywords from the window, task and --kv-bits arguments (the same for every model)."""
    return {"data": args.data, "seq_len": args.seq_len, "max_windows": args.max_windows or None,
            "measure_speed": not args.no_speed, "kv_cache": getattr(args, "kv_bits", None), **_task_kwargs(args),
            **({"stream": args.stream} if args.command == "eval" else {})}


def _evaluate_rows(args, models: list[tuple[str, object]]) -> list[dict]:
    from .api import evaluate

    kw = _evaluate_kwargs(args)
    return [evaluate(model, device=args.device, progress=not args.quiet, name=name, **kw) for name, model in models]


def _task_kwargs(args) -> dict:
    """The lm-eval task options of ``args`` as evaluate() keywords (none when --tasks is not given)."""
    tasks = [t.strip() for t in (getattr(args, "tasks", None) or "").split(",") if t.strip()]
    if not tasks:
        return {}
    if args.limit is not None and args.limit <= 0:
        raise LlmpressError(f"--limit {args.limit:g} must be positive: a document count, or a fraction below 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise LlmpressError(f"--num-fewshot {args.num_fewshot} is negative: use 0 or more examples")
    if args.task_batch_size < 1:
        raise LlmpressError(f"--task-batch-size {args.task_batch_size} must be at least 1")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    return {"tasks": tasks, "limit": limit, "num_fewshot": args.num_fewshot, "include_path": args.include_path,
            "task_data": args.task_data, "task_batch_size": args.task_batch_size}


def _emit(args, rows: list[dict], failed: list[dict] | None = None) -> None:
    from .measure import build_report, report_markdown, write_report

    report = build_report(rows, base_name=rows[0]["name"])
    if failed:
        report["failed"] = [{"name": r["name"], "error": r["error"]} for r in failed]
    print(report_markdown(report))
    if getattr(args, "json", None):
        _write_json(Path(args.json).expanduser(), rows[0] if len(rows) == 1 and not failed else report)
    if getattr(args, "report", None):
        write_report(report, Path(args.report).expanduser())


def cmd_compress(args) -> None:
    from .api import compress

    result = compress(args.model, args.recipe, data=args.data, samples=args.samples, seq_len=args.seq_len,
                      seed=args.seed, out=args.out, device=args.device, progress=not args.quiet,
                      format=args.format, gguf=_gguf_options(args), stream=args.stream)
    from .export import readers

    n = len(result.layers)
    print(f"compressed {n} linear layers with '{result.recipe.name}' in {result.seconds:.1f}s -> {result.out}")
    if result.gguf is not None:
        print(f"GGUF {result.gguf.file_type}, {result.gguf.bytes / 1e6:.1f} MB: {result.gguf.summary()}")
        return
    tools = readers(result.out)
    from .export import folder_format

    dense_too = folder_format(result.out) != "rotated"  # online Hadamards and int4 activations: no dense form
    only = ((" only (other tools refuse it; --format dense writes a folder every tool reads)" if dense_too else
             " only (no other tool runs online Hadamard transforms or int4 activations)")
            if tools == ["llmpress"] else "")
    print(f"readable by: {', '.join(tools)}{only}")


def cmd_export(args) -> None:
    from .compressed import Grid
    from .export import folder_format
    from .export.compressed_tensors import packed_codes
    from .export.gguf_write import check_gguf_out, write_gguf
    from .models.loader import load_model, source_gguf

    check_gguf_out(args.out)  # before the model is loaded
    loaded = load_model(args.model)
    results = None
    if loaded.folder is not None and folder_format(loaded.folder).startswith("pack-quantized"):
        results = packed_codes(loaded.folder)  # the codes the method chose, not re-rounded weights
        records = loaded.meta.get("layers") or {}
        for name, result in results.items():  # a K-quant grid is known from the layer's record only
            grid = Grid.of(records.get(name))
            if grid is not None and grid.kquant is not None:
                result.grid = grid
    report = write_gguf(loaded.model, loaded.tokenizer, args.out, results=results, source_gguf=source_gguf(loaded),
                        meta=loaded.meta or None, **_gguf_options(args))
    print(f"wrote {report.path}: GGUF {report.file_type}, {report.bytes / 1e6:.1f} MB: {report.summary()}")


def cmd_eval(args) -> None:
    _check_windows(args)
    _check_outputs(args)
    models = ([(f"{args.base} (base)", args.base)] if args.base else []) + [(args.model, args.model)]
    _emit(args, _evaluate_rows(args, models))


def cmd_demo(args) -> None:
    from .api import compress, evaluate
    from .models.loader import LoadedModel, load_model
    from .recipe import load_recipe

    _check_windows(args)
    _check_outputs(args)
    recipes = [load_recipe(r.strip()) for r in args.recipes.split(",") if r.strip()]
    base = load_model(args.model)
    kw = {"seq_len": args.seq_len, "max_windows": args.max_windows or None, "device": args.device,
          "measure_speed": not args.no_speed, "progress": not args.quiet}
    rows = [evaluate(base, args.data, name=f"{args.model} (base)", **kw)]
    for recipe in recipes:
        fresh = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.source, notes=base.notes)
        result = compress(fresh, recipe, device=args.device, progress=not args.quiet)
        row = evaluate(result, args.data, name=recipe.name or "recipe", **kw)
        row["compress_time_s"] = result.seconds
        rows.append(row)
    _emit(args, rows)


def _compare_folders(folders: list[str]) -> list[tuple[str, Path]]:
    """(row name, folder) for ``llmpress compare``: each an existing folder, given once; named by its last path
    part, or by the path as given where two last parts are the same."""
    paths = [Path(f).expanduser() for f in folders]
    seen: dict[Path, str] = {}
    for given, path in zip(folders, paths):
        if not path.exists():
            raise LlmpressError(f"compare: folder {given} does not exist: pass model folders written by "
                                "'llmpress compress --out'")
        if not path.is_dir():
            raise LlmpressError(f"compare: {given} is not a folder: pass model folders written by "
                                "'llmpress compress --out'")
        if path.resolve() in seen:
            raise LlmpressError(f"compare: {given} is the same folder as {seen[path.resolve()]}: pass each folder once")
        seen[path.resolve()] = given
    names = [p.resolve().name for p in paths]
    return [(name if names.count(name) == 1 else given, path) for name, given, path in zip(names, folders, paths)]


def cmd_compare(args) -> None:
    from .measure.plots import error_records
    from .models.loader import read_meta

    _check_windows(args)
    folders = _compare_folders(args.folders)
    _check_outputs(args)
    models = ([(f"{args.base} (base)", args.base)] if args.base else []) + [(n, str(p)) for n, p in folders]
    rows = _evaluate_rows(args, models)
    for row, (_name, path) in zip(rows[len(rows) - len(folders):], folders):
        meta = read_meta(path)
        errors = error_records(meta.get("layers"), meta.get("blocks"))
        if errors and not row.get("errors"):
            row["errors"] = errors
    _emit(args, rows)


def _sweep_recipes(args) -> list[str]:
    """The recipes of ``--recipes`` and ``--grid``, in order, each once."""
    names = [r.strip() for r in (args.recipes or "").split(",") if r.strip()]
    if args.grid:
        import yaml

        path = Path(args.grid).expanduser()
        try:
            grid = yaml.safe_load(path.read_text())  # JSON is YAML too
        except OSError as e:
            raise LlmpressError(f"--grid {args.grid}: cannot read it ({e.strerror}): pass a YAML or JSON "
                                "file") from None
        except yaml.YAMLError:
            raise LlmpressError(f"--grid {args.grid} is not YAML or JSON: write a list of recipe names") from None
        listed = grid.get("recipes") if isinstance(grid, dict) else grid
        if not isinstance(listed, list) or not all(isinstance(r, str) for r in listed):
            raise LlmpressError(f"--grid {args.grid} must hold a list of recipe names (or {{recipes: [...]}})")
        names += listed
    if not names:
        raise LlmpressError("sweep needs recipes: pass --recipes A,B,C or --grid FILE")
    from .recipe import load_recipe

    for name in names:
        load_recipe(name)  # an unknown recipe is refused before any trial starts
    return list(dict.fromkeys(names))


def cmd_sweep(args) -> None:
    from .api import evaluate
    from .sweep import check_workers, sweep

    _check_windows(args)
    recipes = _sweep_recipes(args)
    check_workers(args.workers)
    if args.device != "cpu":
        raise LlmpressError(f"sweep runs its trials on the CPU: drop --device {args.device}, or compress and "
                            "evaluate on it one recipe at a time with 'llmpress compress' and 'llmpress eval'")
    _check_outputs(args)
    kw = _evaluate_kwargs(args)
    base = evaluate(args.model, name=f"{args.model} (base)", progress=not args.quiet, **kw)
    trials = sweep(args.model, recipes, evaluate_kwargs=kw, workers=args.workers, ray=args.ray,
                   progress=not args.quiet)
    failed = [r for r in trials if r.get("error")]
    for row in failed:
        print(f"llmpress: trial {row['name']} failed: {row['error']}", file=sys.stderr)
    _emit(args, [base] + [r for r in trials if not r.get("error")], failed=failed)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise LlmpressError(f"{flag} {text}: give comma-separated integers, e.g. {flag} 2,3,4") from None
    if not values:
        raise LlmpressError(f"{flag} is empty: give comma-separated integers, e.g. {flag} 2,3,4")
    return values


def cmd_auto(args) -> None:
    from .auto import auto, format_report, to_yaml
    from .paths import write_text_atomic
    from .save import check_new_path

    out = check_new_path(args.out, "--out", "recipe")
    _check_outputs(args)
    if args.table and not Path(args.table).expanduser().exists():
        check_new_path(args.table, "--table")
    if args.fisher_samples < 1:
        raise LlmpressError(f"--fisher-samples {args.fisher_samples} must be at least 1")
    result = auto(args.model, args.budget, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                  bits=_ints(args.bits, "--bits"), groups=_ints(args.groups, "--groups"),
                  sparsities=tuple(s.strip() for s in args.sparsities.split(",") if s.strip()),
                  dense=not args.no_dense, data=args.data, samples=args.samples, seq_len=args.seq_len,
                  seed=args.seed, fisher_samples=args.fisher_samples, device=args.device, progress=not args.quiet,
                  table=args.table, eval_data=args.eval_data, eval_windows=args.eval_windows or None,
                  rounds=args.rounds, embedding=not args.keep_embedding)
    write_text_atomic(out, to_yaml(result.recipe))
    if args.json:
        _write_json(Path(args.json).expanduser(), result.report)
    print(format_report(result.report))
    print(f"\nrecipe written to {out}: llmpress compress {args.model} --recipe {out} --out FOLDER")


def cmd_inspect(args) -> None:
    from .measure.inspect import compare, format_comparison, format_summary, summarize

    if len(args.folders) > 2:
        raise LlmpressError(f"inspect takes one folder, or two to compare; got {len(args.folders)}: "
                            "run it once per pair")
    _check_outputs(args)
    if len(args.folders) == 1:
        result = summarize(args.folders[0], args.top)
        print(format_summary(result))
    else:
        result = compare(*args.folders, top=args.top)
        print(format_comparison(result))
    if args.json:
        _write_json(Path(args.json).expanduser(), result)


def cmd_plan(args) -> None:
    from .api import plan

    _check_outputs(args)
    result = plan(args.model, args.recipe, data=args.data, samples=args.samples, seq_len=args.seq_len,
                  out=args.out, device=args.device)
    print(result.table())
    reason = result.fits()
    print(f"fits: {'no: ' + reason if reason else 'yes'}")
    if args.json:
        _write_json(Path(args.json).expanduser(), result.to_dict())


def cmd_recipes(_args) -> None:
    from .recipe import load_recipe
    from .registry import builtin_recipes

    for name in builtin_recipes():
        stages = " + ".join(f"{s.method}({', '.join(f'{k}={v}' for k, v in vars(s.config).items())})"
                            for s in load_recipe(name).stages)
        print(f"{name:28s} {stages}")


def cmd_fetch(_args) -> None:
    from .data import load_text
    from .models.loader import load_model

    load_model(DEFAULT_MODEL)
    load_text("austen:calib")
    print("default model and corpus are cached")


COMMANDS = {"compress": cmd_compress, "export": cmd_export, "eval": cmd_eval, "demo": cmd_demo, "compare": cmd_compare,
            "sweep": cmd_sweep, "auto": cmd_auto, "inspect": cmd_inspect, "plan": cmd_plan,
            "recipes": cmd_recipes, "fetch": cmd_fetch}


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit status (0, 1 for a bug, 2 for an error, 130 for Ctrl-C)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="llmpress: %(message)s")
    try:
        with silenced(quiet):
            if getattr(args, "device", None) is not None:
                from .api import resolve_device

                resolve_device(args.device)  # before anything is loaded
            COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        _close_bars()
        print("llmpress: error: interrupted (Ctrl-C); unfinished output was removed, except the finished blocks "
              "of a streamed compress (.OUT.partial), which the same command resumes", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        return _report(exc)
    return 0


def _report(exc: Exception) -> int:
    """Print the one line for ``exc``: our own errors and foreseeable failures exit 2, anything else is a bug."""
    if isinstance(exc, LlmpressError):
        message, code = str(exc), 2
    elif foreseeable(exc):
        message, code = describe_failure(exc), 2
    else:
        message, code = (f"internal error: {type(exc).__name__}: {first_line(exc)} "
                         "(run with --debug for the traceback, and please report it)"), 1
    _close_bars()  # a run that fails mid-way (a damaged block read while streaming) has a bar on the line
    print(f"llmpress: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _close_bars() -> None:
    """Close the progress bars still shown, so that the error line starts a line of its own."""
    from tqdm.auto import tqdm

    for shown in list(getattr(tqdm, "_instances", ())):
        shown.close()


if __name__ == "__main__":
    sys.exit(main())
