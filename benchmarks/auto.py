"""Automatic mixed precision against uniform GPTQ: the size/perplexity frontier, held out, and the sensitivity check.

    python benchmarks/auto.py [--budgets 2.5,3,3.25,3.5,4,4.25] [--uniform w3-g128,w3-g64,w4-g64]
                              [--check 60] [--sensitivity FILE] [--json FILE] [--plot FILE.png]

One sensitivity pass (``llmpress.auto``: Fisher-weighted GPTQ error of every candidate on every block linear,
on ``austen:calib`` — saved to / reused from ``--sensitivity``) serves every budget. Each budget's recipe and
each uniform GPTQ recipe (act-order, true-sequential, as ``gptq-w4-g64``) is compressed from SmolLM2-135M
and evaluated on ``austen:eval`` (16 x 1024, the README's windows) and on ``austen:eval2`` (held out: neither
the calibration nor the choice saw it). Bits/weight are eval's own count over the linears, scales included.

``--check N`` measures, for N (layer, setting) pairs drawn at random, the increase of the mean NLL on 4
windows of ``austen:eval`` with that one layer compressed, and prints Spearman's rank correlation of the
measured increase with the predicted cost and with the plain relative output error.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

import llmpress
from llmpress.allocate import allocate
from llmpress.auto import build_recipe, method_defaults
from llmpress.calib import block_stats
from llmpress.data import calibration_samples, eval_windows
from llmpress.models.archs import arch_for, block_linears, linear_weight, set_linear_weight
from llmpress.models.loader import load_model
from llmpress.progress import silenced
from llmpress.quant.gptq import gptq_recipe
from llmpress.registry import get_method
from llmpress.sensitivity import Sensitivity, candidate_grid, output_fisher, sensitivity


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", default="2.5,3,3.25,3.5,4,4.25", help="bits/weight over the linears")
    p.add_argument("--uniform", default="w3-g128,w3-g64,w4-g64", help="uniform GPTQ settings")
    p.add_argument("--eval", default="austen:eval,austen:eval2", help="evaluation texts (the first is the README's)")
    p.add_argument("--check", type=int, default=0, help="(layer, setting) pairs measured one by one")
    p.add_argument("--sensitivity", help="JSON file: reuse the sensitivity table if it exists, else write it")
    p.add_argument("--json", help="write every row (JSON) to this file, rewritten after each row")
    p.add_argument("--rows", nargs="+", default=[], help="earlier --json files: their rows are reused, not rerun")
    p.add_argument("--plot", help="write the frontier plot (PNG) to this file")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args()


def _sensitivity(model, tok, args) -> tuple[Sensitivity, dict, torch.Tensor]:
    args_gptq, calib = method_defaults("gptq")
    ids = calibration_samples(tok, calib["data"], calib["samples"], calib["seq_len"], calib["seed"])
    cands = candidate_grid(["gptq"], [2, 3, 4, 8], [32, 64, 128], [], {"gptq": args_gptq})
    path = Path(args.sensitivity) if args.sensitivity else None
    if path is not None and path.exists():
        return Sensitivity.from_dict(json.loads(path.read_text()), cands), calib, ids
    start = time.perf_counter()
    arch = arch_for(model)
    fisher = output_fisher(model, arch, ids[:16], progress=not args.quiet)
    sens = sensitivity(model, arch, ids, cands, fisher, progress=not args.quiet)
    print(f"sensitivity: {len(sens.layers)} layers x {len(cands)} candidates in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    if path is not None:
        path.write_text(json.dumps({**sens.to_dict(), "seconds": time.perf_counter() - start}))
    return sens, calib, ids


def _row(name: str, recipe, texts: list[str], quiet: bool) -> dict:
    start = time.perf_counter()
    result = llmpress.compress("smollm2-135m", recipe, progress=not quiet)
    seconds = time.perf_counter() - start
    row = {"name": name, "compress_s": seconds}
    for text in texts:
        ev = llmpress.evaluate(result, data=text, measure_speed=False, progress=not quiet)
        row[f"ppl {text}"] = ev["perplexity"]
        row.update(size_mb=ev["size_bytes"] / 1e6, bpw=ev["linear_bits_per_weight"])
    print(f"{name}: {json.dumps(row)}", file=sys.stderr)
    return row


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return torch.tensor(r)

    ra, rb = ranks(a), ranks(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _check(model, tok, sens: Sensitivity, ids: torch.Tensor, n: int, quiet: bool) -> dict:
    """Measured ΔNLL (4 x 1024 tokens of austen:eval) of n random (layer, setting) pairs, one layer at a time."""
    rng = random.Random(0)
    pairs = sorted(rng.sample([(r, c) for r in range(len(sens.layers)) for c in range(1, len(sens.candidates))], n))
    windows = eval_windows(tok, "austen:eval", 1024, max_windows=4)

    def nll() -> float:
        with torch.no_grad():
            return float(model(input_ids=windows, labels=windows).loss)

    base = nll()
    arch = arch_for(model)
    wanted = {sens.layers[r] for r, _ in pairs}
    measured = {}
    method = get_method("gptq")
    for i, block, stats in block_stats(model, arch, ids, ("hessian",), torch.device("cpu"), 8, not quiet, "check"):
        for name, module in block_linears(block, arch).items():
            full = f"model.layers.{i}.{name}"
            if full not in wanted:
                continue
            W = linear_weight(module, arch).detach().clone()
            for r, c in [p for p in pairs if sens.layers[p[0]] == full]:
                set_linear_weight(module, arch, method.fn(W.clone(), stats[name]["hessian"],
                                                          sens.candidates[c].config).weight)
                measured[(r, c)] = nll() - base
            set_linear_weight(module, arch, W)
    predicted = [float(sens.cost[r, c]) for r, c in pairs]
    errors = [float(sens.error[r, c]) for r, c in pairs]
    got = [measured[p] for p in pairs]
    return {"pairs": len(pairs), "base_nll": base,
            "spearman_fisher": _spearman(predicted, got), "spearman_output_error": _spearman(errors, got),
            "rows": [{"layer": sens.layers[r], "setting": sens.candidates[c].label, "predicted": p, "error": e,
                      "measured": m} for (r, c), p, e, m in zip(pairs, predicted, errors, got)]}


def _plot(rows: list[dict], texts: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4))
    for ax, text in zip(axes if len(texts) > 1 else [axes], texts):
        for kind, marker in (("auto", "o-"), ("uniform", "s--")):
            pts = sorted((r["bpw"], r[f"ppl {text}"]) for r in rows if r["kind"] == kind)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=f"{kind} GPTQ")
        ax.set_xlabel("bits/weight over the linears (scales included)")
        ax.set_ylabel(f"perplexity ({text})")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M: llmpress auto vs uniform GPTQ")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = _args()
    texts = [t.strip() for t in args.eval.split(",") if t.strip()]
    with silenced(args.quiet):
        loaded = load_model(args.model)
        model, tok = loaded.model, loaded.tokenizer
        sens, calib, ids = _sensitivity(model, tok, args)
        check = _check(model, tok, sens, ids, args.check, args.quiet) if args.check else None
        if check:
            print(f"check: {json.dumps({k: v for k, v in check.items() if k != 'rows'})}", file=sys.stderr)
        numel = sum(o * i for o, i in sens.shapes)
        saved = {r["name"]: r for f in args.rows for r in json.loads(Path(f).read_text())["rows"]}
        rows = []

        def add(row: dict) -> None:
            rows.append(row)
            if args.json:
                Path(args.json).write_text(json.dumps({"rows": rows, "check": check, "calibration": calib}, indent=2))

        for budget in [float(b) for b in args.budgets.split(",") if b.strip()]:
            choice = allocate(sens.cost.tolist(), sens.bytes.tolist(), budget * numel / 8)
            recipe = build_recipe(sens, choice, calib, name=f"auto-{budget:g}bpw")
            predicted = float(sum(sens.cost[r, c] for r, c in enumerate(choice)))
            name = f"auto {budget:g}bpw"
            add(saved.get(name) or {"kind": "auto", "predicted_nll_increase": predicted,
                                    **_row(name, recipe, texts, args.quiet)})
        for setting in [s.strip() for s in args.uniform.split(",") if s.strip()]:
            bits, group = (int(v) for v in setting.replace("w", "").split("-g"))
            name = f"gptq-{setting}"
            add(saved.get(name) or {"kind": "uniform", **_row(name, gptq_recipe(bits, group), texts, args.quiet)})
    print("| recipe | bits/weight (linears) | size MB | " + " | ".join(f"ppl {t}" for t in texts)
          + " | predicted ppl ratio | compress s |")
    print("|---|---:|---:|" + "---:|" * len(texts) + "---:|---:|")
    for r in sorted(rows, key=lambda r: r["bpw"]):
        predicted = f"x{math.exp(r['predicted_nll_increase']):.3f}" if "predicted_nll_increase" in r else "–"
        print(f"| {r['name']} | {r['bpw']:.3f} | {r['size_mb']:.1f} | "
              + " | ".join(f"{r[f'ppl {t}']:.2f}" for t in texts) + f" | {predicted} | {r['compress_s']:.0f} |")
    if check:
        print(f"\nsensitivity check, {check['pairs']} (layer, setting) pairs, one layer compressed at a time: "
              f"Spearman rank correlation with the measured NLL increase: Fisher-weighted cost "
              f"{check['spearman_fisher']:.3f}, plain relative output error {check['spearman_output_error']:.3f}")
    if args.plot:
        _plot(rows, texts, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "check": check, "calibration": calib}, indent=2))


if __name__ == "__main__":
    main()
