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
import os
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


def _add_eval_window_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="austen:eval", help="evaluation text (default austen:eval = Persuasion)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--max-windows", type=int, default=16, help="windows evaluated, 0 = all (default 16)")
    p.add_argument("--no-speed", action="store_true", help="skip the latency/throughput measurement")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmpress", description="Compress LLMs and measure what it cost.")
    _add_debug(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model with a recipe and save it")
    c.add_argument("model", help=f"alias ({DEFAULT_MODEL}), model folder, .gguf file or hub id")
    c.add_argument("--recipe", required=True, help="built-in recipe name or YAML file (see 'llmpress recipes')")
    c.add_argument("--out", required=True, help="output folder (must not exist; its parent folder must)")
    c.add_argument("--data", help="calibration text, overrides the recipe (e.g. austen:calib, text:FILE)")
    c.add_argument("--samples", type=int, help="calibration windows, overrides the recipe")
    c.add_argument("--seq-len", type=int, help="calibration window length, overrides the recipe")
    c.add_argument("--seed", type=int, help="calibration sampling seed, overrides the recipe")
    c.add_argument("--format", default="auto", choices=["auto", "compressed-tensors", "dense"],
                   help="auto (default): packed compressed-tensors when weights were quantized, else dense")
    _add_common(c)

    e = sub.add_parser("eval", help="perplexity, size, FLOPs, speed and memory of a model")
    e.add_argument("model", help=f"alias ({DEFAULT_MODEL}), model folder, .gguf file or hub id")
    _add_eval_window_args(e)
    e.add_argument("--base", help="also evaluate this base model on the same windows, side by side")
    e.add_argument("--kv-bits", type=int, choices=[2, 4, 8, 16],
                   help="quantize the KV cache to this many bits while evaluating "
                        "(16 = off; default: the model's recipe)")
    e.add_argument("--json", help="write the result (one JSON object) to this file")
    e.add_argument("--report", help="write report.json and report.md to this new folder")
    _add_common(e)

    d = sub.add_parser("demo", help="compress the default model with a few recipes and compare them to the base")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--recipes", default=",".join(DEMO_RECIPES), help="comma-separated recipe names or files")
    _add_eval_window_args(d)
    d.add_argument("--json", help="write the report (JSON) to this file")
    d.add_argument("--report", help="write report.json and report.md to this new folder")
    _add_common(d)

    r = sub.add_parser("recipes", help="list the built-in recipes")
    f = sub.add_parser("fetch", help="download the default model and corpus into the cache")
    _add_common(f)
    for p in (c, e, d, r, f):
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _evaluate_rows(args, models: list[tuple[str, object]]) -> list[dict]:
    from .api import evaluate

    rows = []
    for name, model in models:
        rows.append(evaluate(model, args.data, seq_len=args.seq_len, max_windows=args.max_windows or None,
                             device=args.device, measure_speed=not args.no_speed, progress=not args.quiet,
                             name=name, kv_cache=getattr(args, "kv_bits", None)))
    return rows


def _emit(args, rows: list[dict]) -> None:
    from .measure import build_report, report_markdown, write_report

    report = build_report(rows, base_name=rows[0]["name"])
    print(report_markdown(report))
    if getattr(args, "json", None):
        _write_json(Path(args.json).expanduser(), rows[0] if len(rows) == 1 else report)
    if getattr(args, "report", None):
        write_report(report, Path(args.report).expanduser())


def cmd_compress(args) -> None:
    from .api import compress

    result = compress(args.model, args.recipe, data=args.data, samples=args.samples, seq_len=args.seq_len,
                      seed=args.seed, out=args.out, device=args.device, progress=not args.quiet,
                      format=args.format)
    from .export import readers

    n = len(result.layers)
    print(f"compressed {n} linear layers with '{result.recipe.name}' in {result.seconds:.1f}s -> {result.out}")
    tools = readers(result.out)
    only = (" only (other tools refuse it; --format dense writes a folder every tool reads)"
            if tools == ["llmpress"] else "")
    print(f"readable by: {', '.join(tools)}{only}")


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


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "demo": cmd_demo, "recipes": cmd_recipes,
            "fetch": cmd_fetch}


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
        print("llmpress: error: interrupted (Ctrl-C); unfinished output was removed", file=sys.stderr)
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
    print(f"llmpress: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
