"""QAT settings for a saved W4A4 model: train it as ``+qat`` would, then its perplexity with a 4-bit KV cache.

    python benchmarks/w4a4_qat.py FOLDER [--steps 400] [--lr 1e-4] [--qat-lr-scale 3] [--warmup 10]
                                         [--kv-bits 4]
                                         [--samples 1024] [--seed 0] [--json FILE]

FOLDER is a folder written by ``llmpress compress smollm2-135m --recipe rotate+gptq-w4a4-g64 --out FOLDER``
(or ``rotate(online=true)+gptq-w4a4-g64``, QuaRot's folded rotation). Each run loads it, trains it with
``llmpress.distill.stage.distill_model`` (the ``qat`` stage's loss and trainable set: forward KL to the float
model, every W4A4 layer's latent weight on its grid with its inputs fake-quantized, norms; 2 x 256-token
batches of ``austen:calib``; ``--kv-bits`` fake-quantizes the student's KV cache, 16 = off; the defaults are
the ``rotate+gptq-w4a4-g64+qat`` recipe's), and evaluates austen:eval 16 x 1024 with ``--kv-bits 4`` at
evaluation, as ``llmpress eval DIR --kv-bits 4 --no-speed`` does. Several settings from one GPTQ run, without
repeating it: the README's table of QAT settings ("Training for W4A4") was measured with it. Prints one
Markdown row and writes it as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import llmpress
from _common import provenance
from llmpress.distill.stage import DistillConfig, distill_model
from llmpress.models.archs import arch_for
from llmpress.models.loader import load_model
from llmpress.registry import builtin_recipes


def main() -> None:
    recipe = builtin_recipes()["rotate+gptq-w4a4-g64+qat"]["stages"][-1]["args"]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--steps", type=int, default=recipe["steps"])
    p.add_argument("--lr", type=float, default=recipe["lr"])
    p.add_argument("--qat-lr-scale", type=float, default=recipe["qat_lr_scale"])
    p.add_argument("--warmup", type=int, default=recipe["warmup"])
    p.add_argument("--kv-bits", type=int, default=recipe["kv_bits"], choices=[2, 4, 8, 16],
                   help="KV cache while training")
    p.add_argument("--samples", type=int, default=recipe["samples"], help="training windows of 256 tokens (cycled)")
    p.add_argument("--seed", type=int, default=0, help="the training windows drawn and their order")
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    student = load_model(args.folder)
    teacher = load_model("smollm2-135m").model
    cfg = DistillConfig(loss="forward_kl", train="all", lr=args.lr, qat_lr_scale=args.qat_lr_scale, steps=args.steps,
                        warmup=args.warmup, seq_len=recipe["seq_len"], batch_size=recipe["batch_size"],
                        samples=args.samples, kv_bits=args.kv_bits, seed=args.seed)
    start = time.perf_counter()
    _, history = distill_model(student.model, arch_for(student.model), cfg, teacher=teacher,
                               tokenizer=student.tokenizer, layers={}, results={})
    seconds = time.perf_counter() - start
    report = llmpress.evaluate(student.model, tokenizer=student.tokenizer, measure_speed=False, kv_cache=4)
    row = {"steps": args.steps, "lr": args.lr, "qat_lr_scale": args.qat_lr_scale, "kv_bits_training": args.kv_bits,
           "samples": args.samples, "seed": args.seed, "train_seconds": round(seconds, 1), "last_loss": history["loss"],
           "perplexity_kv4": report["perplexity"], **provenance()}
    print("| steps | lr | latent × | KV bits in training | train s | last KL | W4A4 + KV4 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.steps} | {args.lr:g} | {args.qat_lr_scale:g} | {args.kv_bits} | {seconds:.0f} | "
          f"{history['loss']:.3f} | {report['perplexity']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
