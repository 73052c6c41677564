"""Shared by the benchmark scripts: the same windows for every method, llmpress vs a peer, one table.

Protocol (shared/assets.md): calibration = 128 windows x 512 tokens at seeded random offsets in
austen:calib; evaluation = the first 16 consecutive 1024-token windows of austen:eval.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import llmpress
from llmpress.data import calibration_samples, eval_windows
from llmpress.measure import PeakMemory, perplexity, size_report
from llmpress.models.loader import LoadedModel, load_model
from llmpress.progress import silenced
from llmpress.recipe import load_recipe
from llmpress.registry import methods

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from param_check import changes, difference  # noqa: E402  (plain torch, shared with the peer script)

PEER_SCRIPT = Path(__file__).parent / "peers" / "llmcompressor_peer.py"


def split_list(text: str) -> list[str]:
    """``a,b(x=1, y=2),c`` -> ``["a", "b(x=1, y=2)", "c"]``: commas inside parentheses or brackets belong to a
    recipe's arguments, not to the list."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    return [item for item in items if item]


def parser(description: str, recipes: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default=",".join(recipes), help="comma-separated recipe names")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="calibration seed (windows at seeded random offsets)")
    p.add_argument("--seeds", help="comma-separated calibration seeds: one table per seed, then the means")
    p.add_argument("--peer-parallel", action="store_true",
                   help="run the peer at the same time as llmpress, each on one thread (needs two free cores)")
    p.add_argument("--peer-cache", help="folder of peer results to reuse (keyed by windows, spec and peer scripts)")
    p.add_argument("--peer-only", action="store_true", help="run only the peer (to fill --peer-cache)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=1024)
    p.add_argument("--peer-python", default="auto",
                   help="a Python with llmcompressor installed; 'auto' = this one if it has it, 'off' = skip")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="take llmpress's rows from these earlier --json files (same recipes and seeds) instead of "
                        "running them again: the peer runs (or comes from --peer-cache) and the tables are printed "
                        "as usual; each row keeps the llmpress commit and threads it was measured with")
    p.add_argument("--quiet", action="store_true")
    return p


def provenance() -> dict:
    """What a row was measured with: the llmpress commit (and whether src/ had uncommitted changes), threads."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "src_modified": bool(git("status", "--porcelain", "src")), "threads": torch.get_num_threads()}


def saved_rows(files: list[str]) -> dict[tuple[int, str], dict]:
    """(seed, recipe) -> row from earlier ``--json`` outputs; a later file wins over an earlier one."""
    rows = {}
    for file in files:
        for row in json.loads(Path(file).read_text())["rows"]:
            rows[row["seed"], row["recipe"]] = row
    return rows


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
        self.eval = eval_windows(tok, "austen:eval", args.eval_seq_len, args.eval_windows)
        self.use_seed(getattr(args, "seed", 0))
        self.base_ppl = perplexity(self.base.model, self.eval)["perplexity"]

    def use_seed(self, seed: int) -> None:
        """Calibrate the following runs (llmpress's and the peer's) on the windows of this seed."""
        self.seed = seed
        self.calib = calibration_samples(self.base.tokenizer, "austen:calib", self.args.samples, self.args.seq_len,
                                         seed=seed)

    def changes(self, result) -> dict:
        """Which parameters of the base this llmpress run changed (``param_check.changes``): packed layers no
        longer hold a float weight, so every layer the run reports counts as changed."""
        base = dict(self.base.model.named_parameters())
        return changes(base, result.model, also=tuple(f"{name}.weight" for name in result.layers
                                                      if f"{name}.weight" in base))

    def prepare(self, name: str):
        """(recipe, a fresh copy of the base) for ``name``, or (None, an error row) when a method is missing."""
        recipe = load_recipe(name)
        missing = [s.method for s in recipe.stages if s.method not in methods()]
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
                "compression_ratio": size["compression_ratio"], **self.changes(result)}

    def peer(self, python: str, spec: dict, seed: int, threads: int | None = None,
             cache: str | None = None) -> dict:
        """The peer's result for ``spec`` calibrated on seed ``seed``'s windows (run in ``python``, a subprocess).

        ``cache``: a folder of earlier peer results, keyed by everything that decides one (the windows,
        the spec, the peer scripts); a hit is returned without running the peer again.
        """
        calib = calibration_samples(self.base.tokenizer, "austen:calib", self.args.samples, self.args.seq_len,
                                    seed=seed)
        key = _peer_key(calib, self.eval, spec)
        hit = Path(cache, f"{key}.json") if cache else None
        if hit is not None and hit.exists():
            return json.loads(hit.read_text())
        folder = Path(self.base.folder or llmpress.models.smollm2.ensure_smollm2())
        with tempfile.TemporaryDirectory() as tmp:
            windows, spec_file, out = Path(tmp, "w.pt"), Path(tmp, "spec.json"), Path(tmp, "out.json")
            torch.save({"calib": calib, "eval": self.eval}, windows)
            spec_file.write_text(json.dumps(spec))
            env = {**os.environ, "TQDM_DISABLE": "1"}
            if threads is not None:
                env["OMP_NUM_THREADS"] = str(threads)
            proc = subprocess.run([python, str(PEER_SCRIPT), str(folder), str(windows), str(spec_file), str(out)],
                                  capture_output=True, text=True, env=env)
            if not out.exists():
                return {"error": (proc.stderr.strip().splitlines() or ["peer crashed"])[-1][:300]}
            result = json.loads(out.read_text())
        if hit is not None and not result.get("error"):
            hit.parent.mkdir(parents=True, exist_ok=True)
            hit.write_text(json.dumps(result))
        return result


def _peer_key(calib: torch.Tensor, windows: torch.Tensor, spec: dict) -> str:
    digest = hashlib.sha256()
    for tensor in (calib, windows):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(json.dumps(spec, sort_keys=True).encode())
    for script in sorted(PEER_SCRIPT.parent.glob("*.py")):  # sorted: the same key in every clone
        digest.update(script.read_bytes())
    return digest.hexdigest()[:24]


def check_same_job(row: dict, spec: dict) -> None:
    """Refuse the side by side (the peer cell becomes the reason) when the peer changed other parameters.

    Pruning peers (a spec with a sparsity) must also have zeroed the same parameters; quantization
    peers only changed the same ones (llmpress's rounding makes some weights exactly zero, while
    llm-compressor's RTN keeps the float weight and rounds in the forward)."""
    peer = row.get("peer")
    if not peer or peer.get("error") or peer.get("touched") is None:
        return
    pruning = "sparsity" in spec

    def job(side: dict) -> dict:
        return {"touched": side["touched"], "zeros_added": side["zeros_added"] if pruning else {}}

    reason = difference(job(row), job(peer))
    if reason:
        row["peer"] = {"error": f"refused: {reason}", "refused": True, "perplexity_unfair": peer["perplexity"]}


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
         extra_table=None, published: dict[str, float] | None = None) -> None:
    """Run each recipe (and its peer) with ``bench_class``, print the table; ``extra_table(rows, bench)``
    returns a second Markdown table printed after it. ``published``: the peer's own figure for a recipe
    (``shared/assets.md``, seed-0 protocol), shown beside the peer's means so a reader sees it reproduced.
    Exits 1 when some side by side was refused because the toolkits changed different parameters."""
    args = parser(description, recipes).parse_args()
    with silenced(args.quiet):
        refused = _run(args, recipes, peer_specs, bench_class, extra_table, published or {})
    if refused:
        print(f"side by side refused for {', '.join(refused)}: the toolkits changed different parameters",
              file=sys.stderr)
        sys.exit(1)


def _run(args, recipes, peer_specs, bench_class, extra_table, published) -> list[str]:
    python = peer_python(args.peer_python)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    names = split_list(args.recipes)
    jobs = [(seed, name) for seed in seeds for name in names if python and name in peer_specs]
    if args.peer_parallel:
        torch.set_num_threads(1)
    bench = bench_class(args)
    peers: dict = {}

    def run_peers():
        for seed, name in jobs:
            peers[seed, name] = bench.peer(python, peer_specs[name], seed, threads=1 if args.peer_parallel else None,
                                           cache=args.peer_cache)
            print(f"peer done {name} seed {seed}: {json.dumps(_brief(peers[seed, name]))}", file=sys.stderr)

    if args.peer_only:
        run_peers()
        return []
    saved = saved_rows(args.from_json) if args.from_json else None
    if saved is not None:
        missing = [f"{name} seed {seed}" for seed in seeds for name in names if (seed, name) not in saved]
        if missing:
            print(f"error: no saved row for {', '.join(missing)} in the --from-json files; run those first",
                  file=sys.stderr)
            sys.exit(2)
    worker = threading.Thread(target=run_peers) if args.peer_parallel else None
    if worker:
        worker.start()
    per_seed = {}
    for seed in seeds:
        bench.use_seed(seed)
        rows = []
        for name in names:
            if saved is not None:
                rows.append(dict(saved[seed, name]))
                continue
            row = bench.run(peer_specs.get(name, {}).get("recipe", name))  # a spec may name the llmpress recipe
            row.update(recipe=name, seed=seed, **provenance())
            rows.append(row)
            shown = {k: v for k, v in row.items() if k not in ("touched", "zeros_added")}
            print(f"done {name}: {json.dumps(shown)}", file=sys.stderr)
        per_seed[seed] = rows
    if worker:
        worker.join()
    elif jobs:
        run_peers()
    for seed, rows in per_seed.items():
        for row in rows:
            if (seed, row["recipe"]) in peers and not row.get("error"):
                row["peer"] = peers[seed, row["recipe"]]
                check_same_job(row, peer_specs[row["recipe"]])
        measured = ("llmpress rows from --from-json: " + ", ".join(sorted(
            {f"{r.get('commit') or '?'}{'+' if r.get('src_modified') else ''} threads={r.get('threads', '?')}"
             for r in rows})) + "; ") if saved is not None else ""
        print(f"{measured}threads={torch.get_num_threads()}{' each, peer in parallel' if args.peer_parallel else ''}  "
              f"calibration {args.samples}x{args.seq_len} austen:calib seed {seed}; "
              f"evaluation {args.eval_windows}x{args.eval_seq_len} austen:eval")
        print(table(rows, bench.base_ppl, python is not None))
        print()
        if extra_table is not None:
            print(extra_table(rows, bench))
            print()
    if len(seeds) > 1:
        print(seed_table(per_seed, python is not None, published))
    all_rows = [r for rows in per_seed.values() for r in rows]
    if args.json:
        Path(args.json).write_text(json.dumps({"base_perplexity": bench.base_ppl, "rows": all_rows}, indent=2))
    return sorted({f"{r['recipe']} (seed {r['seed']})" for r in all_rows if (r.get("peer") or {}).get("refused")})


def _brief(peer: dict | None) -> dict | None:
    return None if peer is None else {k: v for k, v in peer.items() if k not in ("touched", "zeros_added")}


def seed_table(per_seed: dict[int, list[dict]], peer: bool, published: dict[str, float]) -> str:
    """Perplexity per seed and the mean, llmpress and (where it ran on the same job) the peer."""
    seeds = list(per_seed)
    head = ["recipe", *(f"llmpress s{s}" for s in seeds), "llmpress mean"]
    if peer:
        head += [*(f"llm-compressor s{s}" for s in seeds), "llm-compressor mean", "llm-compressor published",
                 "mean diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name in [r["recipe"] for r in per_seed[seeds[0]]]:
        rows = [next(r for r in per_seed[s] if r["recipe"] == name) for s in seeds]
        ours = [r.get("perplexity") for r in rows]
        cells = [name, *(_f(v) for v in ours), _f(_mean(ours))]
        if peer:
            theirs = [None if (r.get("peer") or {}).get("error") else (r.get("peer") or {}).get("perplexity")
                      for r in rows]
            diff = None if None in ours or None in theirs else _mean(ours) - _mean(theirs)
            cells += [*(_f(v) for v in theirs), _f(_mean(theirs)), _f(published.get(name)),
                      "–" if diff is None else f"{diff:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(values: list) -> float | None:
    return None if not values or None in values else sum(values) / len(values)
