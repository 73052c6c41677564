"""Low-rank benchmark: SVD, ASVD and SVD-LLM at 90/80/70% of the model kept, on SmolLM2-135M.

    python benchmarks/lowrank.py [--recipes svd-80,asvd-80] [--samples 128 --seq-len 512] [--json rows.json]

Prints one Markdown table: perplexity (austen:eval 16x1024), parameters and FLOPs per token
(measured on the factorized model, at the evaluation length) as a fraction of the base's,
how many linears were factorized, and the wall time of the stage (loss curves, rank allocation,
factorization) plus, for ASVD and SVD-LLM, the calibration statistics pass. That pass (XᵀX and
mean |X| of every linear's input, from the base model) does not depend on the budget or the
method, so it runs once and is shared: ``llmpress.compress`` with one of these recipes runs it
itself, and takes about the sum shown. Calibration: 128 x 512 tokens
of austen:calib, seed 0, as in the other benchmarks. The budget of an NN recipe applies
to the whole model (parameters and FLOPs per token, embeddings included).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from _common import Bench, _f, parser
from llmpress.lowrank import LowRankLinear
from llmpress.lowrank.stage import collect_input_stats, lowrank_model
from llmpress.measure import PeakMemory, count_params, flops_per_token, perplexity
from llmpress.models.archs import arch_for
from llmpress.recipe import load_recipe

RECIPES = [f"{m}-{k}" for k in (90, 80, 70) for m in ("svd", "asvd", "svd-llm")]


def shared_stats(bench: Bench) -> tuple[dict, float]:
    """XᵀX and mean |X| of every block linear's input, from the base model, once for all recipes."""
    start = time.perf_counter()
    stats = collect_input_stats(bench.base.model, arch_for(bench.base.model), bench.calib, xtx=True, absmean=True,
                                progress=not bench.args.quiet)
    return stats, time.perf_counter() - start


def run(bench: Bench, name: str, stats: dict) -> dict:
    """One single-stage low-rank recipe on a fresh copy, reusing the shared statistics.

    The statistics do not depend on the budget, so every recipe can share them.
    """
    stage = load_recipe(name).stages[0]
    model = copy.deepcopy(bench.base.model)
    with PeakMemory() as mem:
        start = time.perf_counter()
        meta = lowrank_model(stage.method, model, arch_for(model), bench.calib, stage.config,
                             stats=None if stage.method == "svd" else stats)
        seconds = time.perf_counter() - start
    return {"recipe": name, "perplexity": perplexity(model, bench.eval)["perplexity"], "seconds": seconds,
            "calibrated": stage.method != "svd", "peak_bytes": mem.peak_bytes, "params": count_params(model)["total"],
            "flops_per_token": flops_per_token(model.config, bench.args.eval_seq_len, model=model)["flops_per_token"],
            "factorized": sum(isinstance(m, LowRankLinear) for m in model.modules()), "linears": len(meta),
            "ranks": {n: m["rank"] for n, m in meta.items()}}


def table(rows: list[dict], base: dict, stats_s: float) -> str:
    """compress s = factorization + (for ASVD / SVD-LLM) the shared statistics pass."""
    head = ["recipe", "ppl", "Δppl %", "params", "params %", "GFLOPs/token", "FLOPs %", "factorized",
            "compress s", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
             f"| base (dequantized Q4_1) | {base['perplexity']:.2f} | – | {base['params'] / 1e6:.1f}M | 100.0 | "
             f"{base['flops_per_token'] / 1e9:.3f} | 100.0 | – | – | – |"]
    for r in rows:
        cells = [r["recipe"], f"{r['perplexity']:.2f}", f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}",
                 f"{r['params'] / 1e6:.1f}M", _f(100 * r["params"] / base["params"], 1),
                 f"{r['flops_per_token'] / 1e9:.3f}", _f(100 * r["flops_per_token"] / base["flops_per_token"], 1),
                 f"{r['factorized']}/{r['linears']}",
                 _f(r["seconds"] + (stats_s if r["calibrated"] else 0), 1), _f(r["peak_bytes"] / 1e6, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parser(__doc__.splitlines()[0], RECIPES).parse_args()
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    bench = Bench(args)
    model = bench.base.model
    base = {"perplexity": bench.base_ppl, "params": count_params(model)["total"],
            "flops_per_token": flops_per_token(model.config, args.eval_seq_len, model=model)["flops_per_token"]}
    stats, stats_s = shared_stats(bench)
    print(f"statistics pass: {stats_s:.1f}s", file=sys.stderr, flush=True)
    rows = []
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        rows.append(run(bench, name, stats))
        shown = {k: v for k, v in rows[-1].items() if k != "ranks"}
        print(f"done {name}: {json.dumps(shown)}", file=sys.stderr, flush=True)
    print(f"threads={torch.get_num_threads()}  calibration {args.samples}x{args.seq_len} austen:calib seed 0; "
          f"evaluation {args.eval_windows}x{args.eval_seq_len} austen:eval; statistics pass {stats_s:.1f}s, "
          "shared by the calibrated recipes and included in their compress s")
    print(table(rows, base, stats_s))
    if args.json:
        Path(args.json).write_text(json.dumps({"base": base, "stats_s": stats_s, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
