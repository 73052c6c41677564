"""Shared by the benchmark scripts: the same windows for every method, llmpress vs a peer, one table.

Protocol (shared/assets.md): calibration = 128 windows x 512 tokens at seeded random offsets in
austen:calib; evaluation = the first 16 consecutive 1024-token windows of austen:eval.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmpress
from llmpress.data import calibration_samples, eval_windows
from llmpress.measure import PeakMemory, perplexity, size_report
from llmpress.models.loader import LoadedModel, load_model
from llmpress.progress import silenced
from llmpress.recipe import load_recipe
from llmpress.registry import METHODS

PEER_SCRIPT = Path(__file__).parent / "peers" / "llmcompressor_peer.py"


def parser(description: str, recipes: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default=",".join(recipes), help="comma-separated recipe names")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="calibration seed (windows at seeded random offsets)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=1024)
    p.add_argument("--peer-python", default="auto",
                   help="a Python with llmcompressor installed; 'auto' = this one if it has it, 'off' = skip")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--quiet", action="store_true")
    return p


def peer_python(choice: str) -> str | None:
    if choice == "off":
        return None
    if choice != "auto":
        return choice
    probe = subprocess.run([sys.executable, "-c", "import llmcompressor"], capture_output=True)
    return sys.executable if probe.returncode == 0 else None


class Bench:
    """Loads the base once; runs each recipe on a fresh copy with the shared windows."""

    def __init__(self, args) -> None:
        self.args = args
        self.base = load_model(args.model)
        tok = self.base.tokenizer
        self.seed = getattr(args, "seed", 0)
        self.calib = calibration_samples(tok, "austen:calib", args.samples, args.seq_len, seed=self.seed)
        self.eval = eval_windows(tok, "austen:eval", args.eval_seq_len, args.eval_windows)
        self.base_ppl = perplexity(self.base.model, self.eval)["perplexity"]

    def prepare(self, name: str):
        """(recipe, a fresh copy of the base) for ``name``, or (None, an error row) when a method is missing."""
        recipe = load_recipe(name)
        missing = [s.method for s in recipe.stages if s.method not in METHODS]
        if missing:
            return None, {"recipe": name, "error": f"method {missing[0]} not available"}
        return recipe, LoadedModel(copy.deepcopy(self.base.model), self.base.tokenizer, self.base.source)

    def run(self, name: str) -> dict:
        recipe, fresh = self.prepare(name)
        if recipe is None:
            return fresh
        with PeakMemory() as mem:
            start = time.perf_counter()
            result = llmpress.compress(fresh, recipe, samples=self.args.samples, seq_len=self.args.seq_len,
                                       seed=self.seed, progress=not self.args.quiet)
            seconds = time.perf_counter() - start
        ppl = perplexity(result.model, self.eval)["perplexity"]
        size = size_report(result.model, result.layers)
        return {"recipe": name, "perplexity": ppl, "seconds": seconds, "peak_bytes": mem.peak_bytes,
                "bits_per_weight": size["linear_bits_per_weight"], "size_bytes": size["size_bytes"],
                "compression_ratio": size["compression_ratio"]}

    def run_peer(self, python: str, spec: dict) -> dict:
        folder = Path(self.base.folder or llmpress.models.smollm2.ensure_smollm2())
        with tempfile.TemporaryDirectory() as tmp:
            windows, spec_file, out = Path(tmp, "w.pt"), Path(tmp, "spec.json"), Path(tmp, "out.json")
            torch.save({"calib": self.calib, "eval": self.eval}, windows)
            spec_file.write_text(json.dumps(spec))
            env = {**os.environ, "TQDM_DISABLE": "1"}
            proc = subprocess.run([python, str(PEER_SCRIPT), str(folder), str(windows), str(spec_file), str(out)],
                                  capture_output=True, text=True, env=env)
            if not out.exists():
                return {"error": (proc.stderr.strip().splitlines() or ["peer crashed"])[-1][:300]}
            return json.loads(out.read_text())


def table(rows: list[dict], base_ppl: float, peer: bool) -> str:
    head = ["recipe", "ppl", "Δppl %", "bits/weight", "size MB", "ratio", "compress s", "peak MB"]
    if peer:
        head += ["llm-compressor ppl", "llm-compressor s", "speed-up", "ppl diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
             f"| base (dequantized Q4_1) | {base_ppl:.2f} | – | 16.00 | – | – | – | – |" + (" – |" * 4 if peer else "")]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['recipe']} | {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [r["recipe"], f"{r['perplexity']:.2f}", f"{100 * (r['perplexity'] / base_ppl - 1):+.1f}",
                 _f(r.get("bits_per_weight")), _f(r["size_bytes"] / 1e6, 1), _f(r.get("compression_ratio")) + "×",
                 _f(r["seconds"], 1), _f(r["peak_bytes"] / 1e6, 0)]
        if peer:
            p = r.get("peer") or {}
            if p.get("error") or not p:
                cells += [p.get("error", "no mapping")[:80], "–", "–", "–"]
            else:
                cells += [f"{p['perplexity']:.2f}", f"{p['seconds']:.1f}", f"{p['seconds'] / r['seconds']:.1f}×",
                          f"{r['perplexity'] - p['perplexity']:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _f(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def main(description: str, recipes: list[str], peer_specs: dict[str, dict], bench_class: type = Bench,
         extra_table=None) -> None:
    """Run each recipe (and its peer) with ``bench_class``, print the table; ``extra_table(rows, bench)``
    returns a second Markdown table printed after it."""
    args = parser(description, recipes).parse_args()
    with silenced(args.quiet):
        _run(args, recipes, peer_specs, bench_class, extra_table)


def _run(args, recipes, peer_specs, bench_class, extra_table) -> None:
    python = peer_python(args.peer_python)
    bench = bench_class(args)
    rows = []
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        row = bench.run(name)
        if python and name in peer_specs and not row.get("error"):
            row["peer"] = bench.run_peer(python, peer_specs[name])
        rows.append(row)
        print(f"done {name}: {json.dumps({k: v for k, v in row.items() if k != 'peer'})}", file=sys.stderr)
    print(f"threads={torch.get_num_threads()}  calibration {args.samples}x{args.seq_len} austen:calib seed {args.seed}; "
          f"evaluation {args.eval_windows}x{args.eval_seq_len} austen:eval")
    print(table(rows, bench.base_ppl, python is not None))
    if extra_table is not None:
        print()
        print(extra_table(rows, bench))
    if args.json:
        Path(args.json).write_text(json.dumps({"base_perplexity": bench.base_ppl, "rows": rows}, indent=2))
