"""What each part of a saved W4A4 model costs: perplexity with parts switched off, and per-layer errors.

    python benchmarks/w4a4_parts.py FOLDER [--variants saved,kv16,...] [--windows 16] [--layers]

FOLDER is a folder written by ``llmpress compress ... --recipe rotate+gptq-w4a4`` (or ``gptq-w4a4``). Each
variant loads it afresh, changes one runtime setting, and evaluates austen:eval (16 x 1024 by default, as
the README's figures):

- ``saved``: as saved, KV cache int4 (``llmpress eval FOLDER --kv-bits 4``; the KV Hadamard as the model asks)
- ``kv16``: no KV quantization (W4A4 alone)
- ``kv4-nohad``: KV int4 without the KV Hadamard
- ``clip1``: activations clipped at the absmax (act_clip 1.0 instead of 0.9), KV int4
- ``a8``: int8 activations (W4A8), KV int4
- ``a16``: float activations (the int4 weights alone, W4A16), no KV quantization

``--layers`` also prints each W4A4 linear's relative output error against the float product of its own
dequantized weight and unquantized input (the activation rounding alone), on the first 1024-token window,
summarised per linear type.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import llmpress
from llmpress.models.loader import load_model
from llmpress.quant.w4a4 import W4A4Linear
from llmpress.rotate.online import add_input_hadamard, has_input_hadamard

VARIANTS = ("saved", "kv16", "kv4-nohad", "clip1", "a8", "a16")


def _float_weights(model: nn.Module) -> None:
    """Every W4A4Linear becomes an nn.Linear with its dequantized weight (its online Hadamard kept)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, W4A4Linear):
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None)
            linear.weight.data.copy_(module.dequantized_weight())
            if module.bias is not None:
                linear.bias.data.copy_(module.bias)
            if has_input_hadamard(module):
                add_input_hadamard(linear)
            model.set_submodule(name, linear)


def variant(folder: str, name: str, windows: int) -> float:
    loaded = load_model(folder)
    kv: dict | int = 4
    layers = [m for m in loaded.model.modules() if isinstance(m, W4A4Linear)]
    if name == "kv16":
        kv = 16
    elif name == "kv4-nohad":
        kv = {"bits": 4, "hadamard": False}
    elif name == "clip1":
        for m in layers:
            m.act_clip = 1.0
    elif name == "a8":
        for m in layers:
            m.act_bits = 8
    elif name == "a16":
        _float_weights(loaded.model)
        kv = 16
    report = llmpress.evaluate(loaded, "austen:eval", seq_len=1024, max_windows=windows, measure_speed=False,
                               kv_cache=kv)
    return report["perplexity"]


@torch.no_grad()
def layer_errors(folder: str) -> dict[str, list[float]]:
    """Relative output error of each W4A4 linear's activation rounding, by linear type."""
    from llmpress.data.windows import eval_windows

    loaded = load_model(folder)
    ids = eval_windows(loaded.tokenizer, "austen:eval", 1024, 1)[:1]
    errors: dict[str, list[float]] = {}

    def hook(name: str):
        def fn(module, args, output):
            x = args[0].reshape(-1, module.in_features).float()
            exact = x @ module.dequantized_weight().T + (module.bias.float() if module.bias is not None else 0)
            errors.setdefault(name.rpartition(".")[2], []).append(
                float((output.reshape(exact.shape) - exact).norm() / exact.norm()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in loaded.model.named_modules() if isinstance(m, W4A4Linear)]
    loaded.model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--layers", action="store_true")
    args = p.parse_args()
    print(f"| {args.folder} variant | perplexity austen:eval ({args.windows} x 1024) |\n|---|---:|")
    for name in args.variants.split(","):
        if name:
            print(f"| {name} | {variant(args.folder, name, args.windows):.2f} |", flush=True)
    if args.layers:
        print("\n| linear | median rel. error | max | worst layer |\n|---|---:|---:|---:|")
        for kind, values in layer_errors(args.folder).items():
            t = torch.tensor(values)
            print(f"| {kind} | {t.median():.3f} | {t.max():.3f} | {int(t.argmax())} |")


if __name__ == "__main__":
    main()
