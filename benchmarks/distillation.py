"""Distillation / QAT benchmark: how much of the perplexity lost to hard compression does training recover?

    python benchmarks/distillation.py --budget-seconds 1800          # acceptance: 30 min of training per variant
    python benchmarks/distillation.py --budget-seconds 20 --starts sparsegpt-24 --losses forward_kl \\
        --trainable all --seq-len 128 --batch-size 2 --calib-samples 16 --eval-windows 4     # smoke run

The base model (default SmolLM2-135M) is compressed once per starting point (``--starts``, built-in recipes:
SparseGPT 2:4 and GPTQ int3 group 64 by default; calibration ``--calib-samples`` x ``--calib-seq-len`` of
austen:calib, seed 0) and kept; every variant trains a deep copy of it, with the base as teacher, for
``--budget-seconds`` of training (the LR schedule's horizon is fixed from the speed of the first steps) on
windows of austen:calib (``--train-samples`` x ``--seq-len``, seed 1), one row per loss (``--losses``) and
trainable-parameter choice (``--trainable``: all = full weights, QAT for quantized ones; lora = LoRA/QLoRA;
norms). Perplexity is measured on austen:eval (``--eval-windows`` x ``--eval-seq-len``, the first 16 x 1024 by
default) before and after; "gap closed" = (before - after) / (before - base). Checks per row: N:M layers
still N:M with every pruned weight still zero; quantized layers saved as compressed-tensors, reloaded with
``llmpress.load_model``, equal to the trained model and on the starting grid (same scales and zero points),
with the share of integer codes training changed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmpress
from _common import Bench
from llmpress.data import calibration_samples
from llmpress.distill.stage import SOURCES, DistillConfig, distill_model, training_ids
from llmpress.export.compressed_tensors import save_compressed_tensors
from llmpress.measure import perplexity
from llmpress.models.archs import arch_for
from llmpress.primitives import dequantize, quantize
from llmpress.progress import silenced

STARTS = ["sparsegpt-24", "gptq-w3-g64"]
LOSSES = ["forward_kl", "reverse_kl", "jsd"]
TRAINABLE = ["all", "lora", "norms"]
DEFAULT_LR = {"all": 1e-3, "lora": 1e-3, "norms": 1e-3}  # 1e-3 beat 1e-4 for "all" in 60 s runs from both starts


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--starts", default=",".join(STARTS), help="built-in recipes to recover from")
    p.add_argument("--losses", default=",".join(LOSSES), help="forward_kl, reverse_kl, jsd, ce")
    p.add_argument("--trainable", default=",".join(TRAINABLE), help="all, lora, norms")
    p.add_argument("--pairs", help="TRAINABLE:LOSS pairs instead of the product of --trainable and --losses")
    p.add_argument("--budget-seconds", type=float, default=20.0, help="training time per variant")
    p.add_argument("--max-steps", type=int, default=100_000, help="upper bound on optimizer steps")
    p.add_argument("--seq-len", type=int, default=512, help="training window length")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, help=f"learning rate (default per trainable choice: {DEFAULT_LR})")
    p.add_argument("--qat-lr-scales", default="1",
                   help="learning-rate multipliers for the QAT layers' latent weights, comma-separated; each is "
                        "a variant of trainable 'all' on a quantized start")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--train-samples", type=int, default=2048, help="training windows (epochs repeat them)")
    p.add_argument("--source", default="data", choices=SOURCES, help="data: austen:calib; generated / "
                   "data-free: text the base writes first (black-box), trained with every --losses entry")
    p.add_argument("--dtype", default="auto", help="autocast of the training forwards: auto, float32, bfloat16")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (e.g. 1 per run when two runs share the machine)")
    p.add_argument("--save-dir", help="keep the saved compressed-tensors folders here (default: temporary)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args()


def _variants(args) -> list[tuple[str, str]]:
    """(trainable, loss) pairs: ``--pairs all:jsd,lora:forward_kl`` as given, else every trainable × every loss."""
    if args.pairs:
        pairs = [tuple(p.split(":", 1)) for p in _names(args.pairs)]
        if any(len(p) != 2 for p in pairs):
            raise SystemExit("--pairs: write TRAINABLE:LOSS pairs, e.g. all:jsd,lora:forward_kl")
        return pairs
    return [(t, loss) for t in _names(args.trainable) for loss in _names(args.losses)]


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def compress_start(bench: Bench, name: str, args) -> dict:
    """The starting point, compressed once: its CompressResult, perplexity and compression time."""
    recipe, fresh = bench.prepare(name)
    result = llmpress.compress(fresh, recipe, samples=args.calib_samples, seq_len=args.calib_seq_len,
                               progress=not args.quiet, device=args.device)
    ppl = evaluate(result.model, bench, args.device)
    print(f"start {name}: ppl {ppl:.2f}, compressed in {result.seconds:.1f}s", file=sys.stderr)
    return {"result": result, "perplexity": ppl, "compress_seconds": result.seconds}


def evaluate(model, bench: Bench, device: str) -> float:
    ppl = perplexity(model.to(device), bench.eval, device)["perplexity"]
    model.to("cpu")
    return ppl


def nm_check(start, model, layers: dict) -> str | None:
    """"2:4 ok" when every N:M layer has at most N nonzeros in each group of M inputs and every weight the
    start pruned (its mask; weights that were merely zero may train) is still exactly zero."""
    nm_layers = {n: m["n:m"] for n, m in layers.items() if m.get("n:m")}
    if not nm_layers:
        return None
    groups_bad, pruned_bad = [], []
    for name, (n, m) in nm_layers.items():
        W = model.get_submodule(name).weight
        kept = start.results[name].mask if start.results.get(name) is not None else None
        if kept is None:
            kept = start.model.get_submodule(name).weight != 0
        if not bool(((W.reshape(W.shape[0], -1, m) != 0).sum(-1) <= n).all()):
            groups_bad.append(name)
        if not bool((W[~kept] == 0).all()):
            pruned_bad.append(name)
    pattern = "{}:{}".format(*next(iter(nm_layers.values())))
    if not groups_bad and not pruned_bad:
        return f"{pattern} ok ({len(nm_layers)} layers)"
    return f"{pattern} BROKEN: {len(groups_bad)} layers off pattern, {len(pruned_bad)} with pruned weights regrown"


def grid_check(start, model, layers: dict, results: dict, tokenizer, folder: Path) -> tuple[str | None, float | None]:
    """Save as compressed-tensors, reload with llmpress.load_model; (verdict, share of codes changed)."""
    quantized = {n: m for n, m in layers.items() if m.get("bits") and results.get(n) is not None}
    if not quantized:
        return None, None
    save_compressed_tensors(model, tokenizer, layers, results, folder, {"benchmark": "distillation"})
    loaded = llmpress.load_model(folder).model
    bad, changed, total = [], 0, 0
    for name, meta in quantized.items():
        s0, z0 = start.results[name].scale, start.results[name].zero
        group = meta.get("group_size", -1)
        group = None if group is None or group <= 0 else group
        W = loaded.get_submodule(name).weight.detach().float()
        on_grid = torch.equal(W, dequantize(quantize(W, s0, z0, meta["bits"], group), s0, z0, group))
        if not on_grid or not torch.equal(W, model.get_submodule(name).weight.detach().float()):
            bad.append(name)
        changed += int((results[name].qweight != start.results[name].qweight).sum())
        total += results[name].qweight.numel()
    verdict = "reloaded, on grid" if not bad else f"OFF GRID / reload differs in {len(bad)} layers"
    return verdict, changed / total


def run_variant(bench: Bench, start_name: str, start: dict, trainable: str, loss: str, ids, args,
                qat_lr_scale: float = 1.0) -> dict:
    base = start["result"]
    model, results = copy.deepcopy(base.model), copy.deepcopy(base.results)
    cfg = DistillConfig(train=trainable, loss=loss, lr=args.lr or DEFAULT_LR[trainable], steps=args.max_steps,
                        max_seconds=args.budget_seconds, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        warmup=args.warmup, seq_len=args.seq_len, samples=len(ids), seed=args.seed,
                        dtype=args.dtype, log_every=1, qat_lr_scale=qat_lr_scale)
    wall = time.perf_counter()
    meta, history = distill_model(model, arch_for(model), cfg, teacher=bench.base.model,
                                  tokenizer=bench.base.tokenizer, layers=base.layers, results=results,
                                  device=args.device, progress=not args.quiet, ids=ids)
    wall = time.perf_counter() - wall
    layers = {n: {**m, **meta.get(n, {})} for n, m in base.layers.items()}
    ppl = evaluate(model, bench, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.save_dir) if args.save_dir else Path(tmp)
        folder = root / f"{start_name}-{trainable}-{loss}"
        grid, codes_changed = grid_check(base, model, layers, results, bench.base.tokenizer, folder)
    before, gap = start["perplexity"], start["perplexity"] - bench.base_ppl
    return {"start": start_name, "trainable": trainable, "loss": loss, "lr": cfg.lr, "qat_lr_scale": cfg.qat_lr_scale,
            "ppl_before": before, "ppl_after": ppl, "gap_closed": (before - ppl) / gap if gap > 0 else None,
            "steps": history["steps"], "tokens": history["tokens"], "tokens_per_s": history["tokens_per_s"],
            "train_seconds": history["seconds"], "wall_seconds": wall, "first_loss": history["log"][0]["loss"],
            "last_loss": history["loss"], "sparsity_check": nm_check(base, model, layers), "grid_check": grid,
            "codes_changed": codes_changed}


def table(rows: list[dict], base_ppl: float) -> str:
    head = ["start", "trains", "loss", "lr", "ppl before", "ppl after", "gap closed", "steps", "tokens", "tok/s",
            "train s", "wall s", "train loss first → last", "checks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 10 + ["---"]) + "|",
             f"| base (dequantized Q4_1) | – | – | – | – | {base_ppl:.2f} | – |" + " – |" * 7]
    for r in rows:
        checks = "; ".join(c for c in (r["sparsity_check"], r["grid_check"]) if c)
        if r["codes_changed"] is not None:
            checks += f" ({100 * r['codes_changed']:.2f}% codes changed)"
        gap = "–" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.1f}%"
        lr = f"{r['lr']:g}" + (f" (QAT ×{r['qat_lr_scale']:g})" if r["qat_lr_scale"] != 1 else "")
        lines.append(f"| {r['start']} | {r['trainable']} | {r['loss']} | {lr} | {r['ppl_before']:.2f} | "
                     f"{r['ppl_after']:.2f} | {gap} | {r['steps']} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} | "
                     f"{r['train_seconds']:.1f} | {r['wall_seconds']:.1f} | {r['first_loss']:.4f} → "
                     f"{r['last_loss']:.4f} | {checks} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with silenced(args.quiet):
        _main(args)


def _main(args) -> None:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    bench = Bench(argparse.Namespace(model=args.model, samples=args.calib_samples, seq_len=args.calib_seq_len,
                                     eval_seq_len=args.eval_seq_len, eval_windows=args.eval_windows))
    tokenizer = bench.base.tokenizer
    if args.source == "data":
        ids = calibration_samples(tokenizer, "austen:calib", args.train_samples, args.seq_len, seed=1)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = DistillConfig(source=args.source, samples=args.train_samples, seq_len=args.seq_len, seed=1)
            ids = training_ids(cfg, tokenizer, bench.base.model, Path(tmp), device=torch.device(args.device),
                               progress=not args.quiet)
    rows, starts = [], {}
    for start_name in _names(args.starts):
        start = compress_start(bench, start_name, args)
        starts[start_name] = {k: v for k, v in start.items() if k != "result"}
        quantized = any(m.get("bits") for m in start["result"].layers.values())
        for trainable, loss in _variants(args):
            scales = [float(k) for k in _names(args.qat_lr_scales)] if trainable == "all" and quantized else [1.0]
            for scale in scales:
                row = run_variant(bench, start_name, start, trainable, loss, ids, args, scale)
                rows.append(row)
                print(f"done {json.dumps(row)}", file=sys.stderr)
        del start
    print(f"threads={torch.get_num_threads()} device={args.device}; compression: {args.calib_samples}x"
          f"{args.calib_seq_len} austen:calib seed 0; training: {args.budget_seconds:g}s per variant, "
          f"{len(ids)}x{args.seq_len} windows of {'austen:calib seed 1' if args.source == 'data' else args.source} "
          f"text, batch {args.batch_size}x{args.grad_accum}, dtype {args.dtype}; evaluation: {args.eval_windows}x"
          f"{args.eval_seq_len} austen:eval")
    for name, s in starts.items():
        print(f"start {name}: ppl {s['perplexity']:.2f} (base {bench.base_ppl:.2f}), compressed in "
              f"{s['compress_seconds']:.1f}s")
    print(table(rows, bench.base_ppl))
    if args.json:
        Path(args.json).write_text(json.dumps({"base_perplexity": bench.base_ppl, "args": vars(args),
                                               "starts": starts, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
