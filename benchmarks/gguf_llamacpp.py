"""GGUF in llama.cpp: llmpress's calibrated exports against llama.cpp's own quantizer, measured by llama.cpp.

(Not named gguf.py: a script there would shadow the gguf package for everything it imports.)

    python benchmarks/gguf_llamacpp.py [--recipes rtn-q4_0,gptq-q4_0,gptq-q5_0,gptq-q8_0,rtn-q4_1]
                              [--llamacpp Q4_0,Q4_0+imatrix,Q4_K_M,Q4_K_M+imatrix,Q5_0,Q8_0]
                              [--eval austen:eval,austen:eval2] [--work DIR] [--json FILE] [--rows FILE ...]

Needs llama.cpp's bindings (``pip install 'llmpress[llamacpp]'``). From SmolLM2-135M (the default model):

* the base written by llmpress as F32 and F16 GGUF (``llmpress export --dense-type F32|F16``);
* llama.cpp's own files made from the F32 one with ``llama_model_quantize`` (its per-tensor choices and
  fallbacks: on SmolLM2, 576-wide rows take no K-quant, so Q4_K_M writes them as Q5_0), with and without an
  importance matrix (``+imatrix``: llama-imatrix's statistic, the mean squared input of each column, collected
  on the calibration windows below);
* llmpress's recipes compressed with ``--format gguf`` (each linear's own codes; the embedding as Q8_0, as
  llama.cpp's quantizer writes it in these files).

Calibration (GPTQ and the importance matrix): 128 windows x 512 tokens of ``austen:calib``, seed 0, the
README's. Every file's perplexity is computed from llama.cpp's logits on the first 16 windows x 1024 tokens of
each ``--eval`` text (the first is the README's; ``austen:eval2`` is held out). Speed is batch 1, llama.cpp
on all cores: prefill of 512 tokens and 64 decode steps; every file is timed once in each of
``--speed-rounds`` interleaved rounds (default 5) and the medians reported, measured again in every run,
never reused from ``--rows``. For ``--check`` recipes (default rtn-q4_0) the in-memory perplexity of the
model llmpress compressed is printed beside llama.cpp's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

import llmpress
from _common import split_list
from llmpress.data import calibration_samples, eval_windows
from llmpress.export.gguf_write import linear_names, write_gguf
from llmpress.measure import llamacpp, perplexity
from llmpress.models.loader import load_model, source_gguf
from llmpress.progress import silenced


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default="rtn-q4_0,gptq-q4_0,rtn-q4_1,gptq-q5_0,gptq-q8_0")
    p.add_argument("--llamacpp", default="Q4_0,Q4_0+imatrix,Q4_K_M,Q4_K_M+imatrix,Q5_0,Q5_0+imatrix,Q8_0",
                   help="llama.cpp file types made by its own quantizer (+imatrix: with an importance matrix)")
    p.add_argument("--layouts", default="Q4_K_M",
                   help="llama.cpp files whose per-tensor types llmpress's GPTQ copies (same types, same size)")
    p.add_argument("--check", default="rtn-q4_0", help="recipes whose in-memory perplexity is printed too")
    p.add_argument("--eval", default="austen:eval,austen:eval2", help="evaluation texts (the first is the README's)")
    p.add_argument("--work", help="folder for the GGUF files (kept; default: a temporary folder, removed)")
    p.add_argument("--json", help="write every row (JSON) to this file, rewritten after each row")
    p.add_argument("--rows", nargs="+", default=[], help="earlier --json files: their rows are reused, not rerun")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--speed-rounds", type=int, default=5, help="interleaved timing rounds over all files (median)")
    p.add_argument("--threads", type=int, help="llama.cpp threads for perplexity (default: all cores; speed always "
                   "uses all cores)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args()


# the GPTQ grid (args of a gptq stage) that gives a llama.cpp tensor type exactly: the legacy types (groups of 32)
# and the K-quants (super-blocks of 256; ``kquant``)
GRIDS = {"Q4_0": {"bits": 4, "group_size": 32, "sym": True}, "Q4_1": {"bits": 4, "group_size": 32, "sym": False},
         "Q5_0": {"bits": 5, "group_size": 32, "sym": True}, "Q5_1": {"bits": 5, "group_size": 32, "sym": False},
         "Q8_0": {"bits": 8, "group_size": 32, "sym": True},
         "Q4_K": {"bits": 4, "group_size": 32, "sym": False, "kquant": "Q4_K"},
         "Q6_K": {"bits": 6, "group_size": 16, "sym": True, "kquant": "Q6_K"}}


def layout_recipe(path: Path, model, name: str):
    """A GPTQ recipe giving each linear the type llama.cpp's file ``path`` gave it (per-layer overrides), so the
    two files hold the same types tensor for tensor and differ only in the codes and scales chosen."""
    from collections import Counter

    from gguf import GGUFReader

    from llmpress.quant.gptq import gptq_recipe
    from llmpress.recipe import Recipe

    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    chosen = {layer: types[tensor] for layer, tensor in linear_names(model).items()}
    missing = sorted({t for t in chosen.values() if t not in GRIDS})
    if missing:
        raise SystemExit(f"{path.name}: no GPTQ grid gives {', '.join(missing)}")
    def args(kind: str) -> dict:  # GPTQ's MSE scale search on the legacy grids; K-quants choose their own scales
        return {**GRIDS[kind], "mse": "kquant" not in GRIDS[kind]}

    common = Counter(chosen.values()).most_common(1)[0][0]
    recipe = gptq_recipe(**args(common))
    recipe["stages"][0]["overrides"] = [
        {"targets": sorted(n for n, t in chosen.items() if t == kind), "args": args(kind)}
        for kind in sorted(set(chosen.values()) - {common})]
    return Recipe.from_dict(recipe, name=name)


def _measure(row: dict, path: Path, windows: dict, args) -> dict:
    """Fill in what ``row`` lacks (a row from --rows keeps its figures): size and perplexities."""
    row["bytes"], row["file"] = path.stat().st_size, path.name
    for name, w in windows.items():
        if f"ppl {name}" not in row:
            row[f"ppl {name}"] = llamacpp.perplexity(path, w, n_threads=args.threads,
                                                     progress=not args.quiet)["perplexity"]
    return row


def _speed(rows: list[dict], work: Path, prompt: list[int], args) -> None:
    """Every file timed again in this run (speed is never reused from --rows), in ``--speed-rounds`` interleaved
    rounds (file 1, file 2, ..., then again), so that a busy spell of a shared machine slows every file alike
    instead of one; each round is one warm-up and one timed pass; the figures are the medians over rounds."""
    times: dict[str, list[dict]] = {r["name"]: [] for r in rows}
    for _ in tqdm(range(args.speed_rounds), desc="llama.cpp speed rounds", disable=args.quiet):
        for r in rows:
            times[r["name"]].append({**llamacpp.speed(work / r["file"], prompt, repeats=1),
                                     "load_average": os.getloadavg()[0]})
    for r in rows:
        got = times[r["name"]]
        for key in ("prefill_tok_s", "decode_tok_s"):
            values = [t[key] for t in got]
            r[key], r[key.replace("_tok_s", "_range")] = statistics.median(values), [min(values), max(values)]
        r["speed_rounds"], r["load_average"] = len(got), max(t["load_average"] for t in got)
        r["threads"], r["prompt_tokens"], r["decode_tokens"] = got[0]["threads"], len(prompt), got[0]["decode_tokens"]


def main() -> int:
    args = _args()
    if not llamacpp.available():
        print(f"llama.cpp's bindings are not installed: {llamacpp.INSTALL}", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="llmpress-gguf-"))
    work.mkdir(exist_ok=True)
    done = {r["name"]: r for f in args.rows for r in json.loads(Path(f).read_text())["rows"]}
    rows: list[dict] = []

    def keep(row: dict) -> None:
        rows.append(row)
        print(f"  {row['name']}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("ppl")),
              file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))

    with silenced(args.quiet):
        base = load_model(args.model)
        tok = base.tokenizer
        windows = {name: eval_windows(tok, name, 1024, 16) for name in args.eval.split(",")}
        prompt = [int(t) for t in next(iter(windows.values()))[0, :512]]
        source = source_gguf(base)
        for dense in ("F32", "F16"):
            path = work / f"base-{dense}.gguf"
            if not path.exists():
                write_gguf(base.model, tok, path, dense=dense, embedding=dense, source_gguf=source)
            row = done.get(f"base {dense}") or {"name": f"base {dense}", "by": "llmpress export", "type": dense}
            keep(_measure(row, path, windows, args))
        imatrix = None
        for spec in [s for s in args.llamacpp.split(",") if s]:
            ftype, weighted = spec.removesuffix("+imatrix"), spec.endswith("+imatrix")
            name = f"llama.cpp {spec}"
            path = work / f"llamacpp-{spec.replace('+', '-')}.gguf"
            if name in done and path.exists():
                keep(_measure(done[name], path, windows, args))
                continue
            if not path.exists():
                if weighted and imatrix is None:
                    ids = calibration_samples(tok, "austen:calib", 128, 512, 0)
                    imatrix = llamacpp.importance_matrix(base.model, ids, linear_names(base.model),
                                                         progress=not args.quiet)
                llamacpp.quantize(work / "base-F32.gguf", path, ftype, imatrix if weighted else None)
            keep(_measure({"name": name, "by": "llama.cpp quantizer", "type": ftype}, path, windows, args))
        recipes: list = split_list(args.recipes)
        for i, ftype in enumerate(f for f in args.layouts.split(",") if f):  # each after the first recipe
            recipes.insert(1 + i, layout_recipe(work / f"llamacpp-{ftype}.gguf", base.model,
                                                f"gptq-{ftype.lower()}-layout"))
        for recipe in recipes:
            label = recipe if isinstance(recipe, str) else recipe.name
            name = f"llmpress {label}"
            path = work / f"llmpress-{label}.gguf"
            if name in done and path.exists():
                keep(_measure(done[name], path, windows, args))
                continue
            row = {"name": name, "by": "llmpress --format gguf", "recipe": label}
            model = load_model(args.model)
            start = time.perf_counter()
            result = llmpress.compress(model, recipe, out=None if path.exists() else path, format="gguf",
                                       progress=not args.quiet)
            row["compress_s"] = time.perf_counter() - start
            if result.gguf is not None:  # a layout recipe has many types: the llama.cpp file type it copies
                row["type"] = result.gguf.file_type if isinstance(recipe, str) else label.split("-")[1].upper()
            if label in args.check.split(","):
                row["in-memory ppl"] = perplexity(result.model, windows[args.eval.split(",")[0]])["perplexity"]
            keep(_measure(row, path, windows, args))
        if not args.no_speed:
            _speed(rows, work, prompt, args)
            if args.json:
                Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    _table(rows, args)
    return 0


def _table(rows: list[dict], args) -> None:
    names = args.eval.split(",")
    speed = not args.no_speed
    head = ["file", "type", "MB", *[f"ppl {n}" for n in names], *(["prefill tok/s", "decode tok/s"] if speed else [])]
    print(f"llama.cpp {llamacpp.threads()} threads; perplexity from llama.cpp's logits, 16 x 1024 windows")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(head) - 2))
    for r in rows:
        cells = [r["name"], r.get("type", ""), f"{r['bytes'] / 1e6:.1f}", *[f"{r[f'ppl {n}']:.2f}" for n in names]]
        if speed:
            cells += [f"{r['prefill_tok_s']:,.0f}", f"{r['decode_tok_s']:,.1f}"]
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if "in-memory ppl" in r:
            ours, theirs = r["in-memory ppl"], r[f"ppl {names[0]}"]
            print(f"{r['name']}: in memory {ours:.3f}, in llama.cpp {theirs:.3f} ({100 * (theirs / ours - 1):+.2f}%)")
    by = {r["name"]: r for r in rows}
    if speed and "base F16" in by:
        for r in rows:
            if r.get("type") == "Q4_0":
                print(f"{r['name']}: decode {r['decode_tok_s'] / by['base F16']['decode_tok_s']:.2f}x base F16")


if __name__ == "__main__":
    sys.exit(main())
