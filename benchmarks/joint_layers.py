"""Joint SparseGPT + int4 against SparseGPT then GPTQ, one layer at a time, on the same real Hessian.

    python benchmarks/joint_layers.py [--blocks 3,15,27] [--samples 32] [--sparsity 0.5] [--bits 4] [--heldout-seed 7]

The pruning benchmark compares the two at the model level, where the sequential recipe's second
pass also measures fresh Hessians through the pruned model. This isolates the solver: for each
chosen block of SmolLM2-135M it takes H = 2/n·XᵀX of q_proj, o_proj, up_proj and down_proj from
``--samples`` × 512 windows of austen:calib (seed 0) through the dense model, and reports the
output error tr(ΔHΔᵀ), Δ = W − Ŵ, of joint SparseGPT (``bits``), of SparseGPT then GPTQ on its
mask (``keep_zeros``) and of SparseGPT then round-to-nearest, each relative to pruning alone.
With ``--heldout-seed`` the last column also scores joint against then-GPTQ on the Hessian of
other windows (that calibration seed), which neither solver saw. Prints one Markdown table.
"""

from __future__ import annotations

import argparse

import torch

import llmpress
from llmpress.data import calibration_samples
from llmpress.primitives import compute_qparams, dequantize, quantize
from llmpress.prune.sparsegpt import SparseGPTConfig, sparsegpt
from llmpress.stats import HessianStats

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - W_hat).double()
    return float((D @ H.double() * D).sum())


def hessians(model, tokenizer, blocks: list[int], samples: int, seed: int) -> dict:
    """H = 2/n·XᵀX of each chosen linear from ``samples`` × 512 austen:calib windows (``seed``)."""
    ids = calibration_samples(tokenizer, "austen:calib", samples, 512, seed)
    stats, hooks = {}, []
    for b in blocks:
        for name in LINEARS:
            stats[b, name] = HessianStats()
            module = model.model.layers[b].get_submodule(name)
            hooks.append(module.register_forward_pre_hook(lambda _m, a, k=(b, name): stats[k].add_batch(a[0])))
    with torch.no_grad():
        for i in range(0, len(ids), 8):
            model(input_ids=ids[i:i + 8], use_cache=False)
    for h in hooks:
        h.remove()
    return {k: acc.result() for k, acc in stats.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--blocks", default="3,15,27")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--heldout-seed", type=int, default=None)
    args = p.parse_args()
    loaded = llmpress.load_model(args.model)
    model, blocks = loaded.model, [int(b) for b in args.blocks.split(",")]
    stats = hessians(model, loaded.tokenizer, blocks, args.samples, 0)
    heldout = None if args.heldout_seed is None else hessians(model, loaded.tokenizer, blocks, args.samples,
                                                               args.heldout_seed)
    quant = {"bits": args.bits, "group_size": args.group_size}
    print(f"SparseGPT {args.sparsity:.0%} + int{args.bits} g{args.group_size}; output error tr(ΔHΔᵀ) relative to "
          f"pruning alone; H from {args.samples}x512 austen:calib windows through the dense model")
    extra = "" if heldout is None else f" joint vs then-GPTQ, held-out H (seed {args.heldout_seed}) |"
    print("| block | linear | pruning alone | joint | SparseGPT, then GPTQ | SparseGPT, then RTN | joint vs then-GPTQ |"
          + extra)
    print("|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if extra else ""))
    for (b, name), H in stats.items():
        W = model.model.layers[b].get_submodule(name).weight.detach().float()
        pruned = sparsegpt(W, H, SparseGPTConfig(sparsity=args.sparsity))
        joint = sparsegpt(W, H, SparseGPTConfig(sparsity=args.sparsity, **quant))
        then_gptq = sparsegpt(pruned.weight, H, SparseGPTConfig(sparsity=0.0, keep_zeros=True, **quant))
        scale, zero = compute_qparams(pruned.weight, args.bits, args.group_size, True)
        then_rtn = dequantize(quantize(pruned.weight, scale, zero, args.bits, args.group_size), scale, zero,
                              args.group_size)
        base = output_error(W, pruned.weight, H)
        j, g, r = (output_error(W, w, H) / base for w in (joint.weight, then_gptq.weight, then_rtn))
        row = f"| {b} | {name} | {base:.4g} | {j:.4f} | {g:.4f} | {r:.4f} | {100 * (j / g - 1):+.1f}% |"
        if heldout is not None:
            Hh = heldout[b, name]
            row += f" {100 * (output_error(W, joint.weight, Hh) / output_error(W, then_gptq.weight, Hh) - 1):+.1f}% |"
        print(row)


if __name__ == "__main__":
    main()
