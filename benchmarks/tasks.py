"""Downstream-task benchmark: the two built-in local tasks (lm-eval-harness) on the base and compressed models.

    python benchmarks/tasks.py [--recipes gptq-w4-g64,rtn-w4-g64,magnitude-50] [--limit N] [--folders DIR]
                               [--check-hf] [--json FILE]

Each recipe is compressed from SmolLM2-135M with its default calibration (or reused from ``--folders DIR/NAME``
when that folder exists) and evaluated with ``llmpress.evaluate(..., tasks=...)`` on ``llmpress_lastword`` and
``llmpress_nextsent`` built from ``austen:eval2``. The first table gives each model's accuracy with lm-eval's
standard error and the wall time of the task evaluation; the second compares neighbours in the recipe order
*paired* (same documents: the mean difference of per-document scores and its standard error), which is what
says whether one model is really ahead of the next.

``--check-hf`` also runs lm-eval's own ``hf`` backend (``from_pretrained`` on the base folder, float32, the
same task files, limit and batch size) and prints both results side by side, at the digits lm-eval prints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import llmpress
from llmpress.data import load_text
from llmpress.data.tasks import DEFAULT_TASK_DATA, LOCAL_TASKS, local_task_folder
from llmpress.measure.tasks import paired_difference, summarize
from llmpress.models.loader import load_model
from llmpress.progress import silenced


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default="gptq-w4-g64,rtn-w4-g64,magnitude-50")
    p.add_argument("--tasks", default=",".join(LOCAL_TASKS))
    p.add_argument("--task-data", default=DEFAULT_TASK_DATA)
    p.add_argument("--limit", type=int, help="documents per task (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--folders", help="folder of compressed models to reuse (DIR/RECIPE) and to save new ones in")
    p.add_argument("--check-hf", action="store_true", help="also run lm-eval's own hf backend on the base folder")
    p.add_argument("--json")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args()


def _model(args, recipe: str | None):
    """The base (alias) or a compressed model: reused from --folders, else compressed (and saved there)."""
    if recipe is None:
        return args.model, None
    folder = Path(args.folders) / recipe if args.folders else None
    if folder is not None and folder.is_dir():
        return str(folder), None
    start = time.perf_counter()
    result = llmpress.compress(args.model, recipe, out=folder, progress=not args.quiet)
    return (str(folder) if folder else result), time.perf_counter() - start


def evaluate(args, name: str, model) -> dict:
    start = time.perf_counter()
    row = llmpress.evaluate(model, "austen:eval", max_windows=16, measure_speed=False, name=name,
                            tasks=args.tasks.split(","), limit=args.limit, task_data=args.task_data,
                            task_batch_size=args.batch_size, progress=not args.quiet)
    row["task_seconds"] = time.perf_counter() - start
    return row


def hf_backend(args) -> tuple[dict, float]:
    """lm-eval's own hf backend on the base folder, the same task files."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = load_model(args.model).folder
    include = local_task_folder(args.task_data, load_text(args.task_data))
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", device="cpu",
                                  tasks=args.tasks.split(","), limit=args.limit, batch_size=args.batch_size,
                                  task_manager=TaskManager(include_path=[str(include)]), log_samples=True)
    return summarize(out, out.get("samples")), time.perf_counter() - start


def main(args: argparse.Namespace) -> int:
    tasks = args.tasks.split(",")
    recipes = [r for r in args.recipes.split(",") if r]
    rows, seconds = [], {}
    for recipe in [None, *recipes]:
        name = f"{args.model} (base)" if recipe is None else recipe
        model, compress_s = _model(args, recipe)
        row = evaluate(args, name, model)
        row["compress_seconds"] = compress_s
        rows.append(row)
        seconds[name] = row["task_seconds"]
        print(f"done {name}: " + ", ".join(f"{t} {row['tasks'][t]['value']:.4f}" for t in tasks), file=sys.stderr)

    head = "| model | ppl (austen:eval) | size MB | " + " | ".join(
        f"{t} {rows[0]['tasks'][t]['metric']} ± se" for t in tasks) + " | task eval s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = [f"{r['tasks'][t]['value']:.4f} ± {r['tasks'][t]['stderr']:.4f}" for t in tasks]
        print(f"| {r['name']} | {r['perplexity']:.2f} | {r['size_bytes'] / 1e6:.1f} | {' | '.join(cells)} | "
              f"{r['task_seconds']:.0f} |")
    n = {t: rows[0]["tasks"][t]["n"] for t in tasks}
    print(f"\n{', '.join(f'{t}: {n[t]} documents' for t in tasks)}; data {args.task_data}\n")

    # z = Δ / se; "docs for z=2": how many documents this difference would need to stand 2 standard errors
    # out (the se shrinks as 1/sqrt(n)), which says what size a test set needs to tell the two apart.
    print("| pair (paired, same documents) | " + " | ".join(f"{t} Δ ± se (z; docs for z=2)" for t in tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    pairs = []
    for a, b in zip(rows, rows[1:]):
        cells = []
        for t in tasks:
            mean, se = paired_difference(a["tasks"][t]["per_doc"], b["tasks"][t]["per_doc"])
            z = mean / se if se > 0 else math.inf
            docs = len(a["tasks"][t]["per_doc"])
            needed = math.ceil(docs * (2 * se / mean) ** 2) if mean != 0 else math.inf
            cells.append(f"{mean:+.4f} ± {se:.4f} ({z:+.1f}; {f'{needed:,}' if math.isfinite(needed) else '–'})")
            pairs.append({"a": a["name"], "b": b["name"], "task": t, "diff": mean, "se": se,
                          "docs_for_z2": needed if math.isfinite(needed) else None})
        print(f"| {a['name']} − {b['name']} | " + " | ".join(cells) + " |")

    hf = None
    if args.check_hf:
        got, hf_s = hf_backend(args)
        print("\n| task | metric | llmpress (model object in lm-eval's HFLM) | lm-eval `--model hf` | same |")
        print("|---|---|---:|---:|---|")
        for t in tasks:
            for metric, ours in rows[0]["tasks"][t]["metrics"].items():
                theirs = got[t]["metrics"][metric]
                same = (f"{ours['value']:.4f}" == f"{theirs['value']:.4f}"
                        and f"{ours['stderr'] or 0:.4f}" == f"{theirs['stderr'] or 0:.4f}")
                print(f"| {t} | {metric} | {ours['value']:.4f} ± {ours['stderr'] or 0:.4f} | "
                      f"{theirs['value']:.4f} ± {theirs['stderr'] or 0:.4f} | {'yes' if same else 'NO'} |")
        print(f"\ntask evaluation time: llmpress {seconds[rows[0]['name']]:.0f} s (with 16 perplexity windows), "
              f"lm-eval hf {hf_s:.0f} s")
        hf = {"tasks": got, "seconds": hf_s}
    if args.json:
        for r in rows:
            for t in r["tasks"].values():
                t.pop("per_doc", None)
        Path(args.json).write_text(json.dumps({"rows": rows, "pairs": pairs, "hf": hf, "limit": args.limit},
                                              indent=2, default=str))
    return 0


if __name__ == "__main__":
    arguments = _args()
    with silenced(arguments.quiet):
        sys.exit(main(arguments))
