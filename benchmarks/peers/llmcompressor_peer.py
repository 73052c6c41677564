"""Run one recipe through llm-compressor on the exact calibration and evaluation windows llmpress used.

Invoked by benchmarks/*.py in a Python that has llmcompressor installed (possibly another venv):
    python llmcompressor_peer.py MODEL_DIR WINDOWS.pt SPEC.json OUT.json
WINDOWS.pt holds {"calib": LongTensor (n, L), "eval": LongTensor (w, T)}; SPEC.json names the
recipe ({"kind": "rtn"|"gptq"|"awq"|"smoothquant"|"wanda"|"sparsegpt", ...}). Writes
{"seconds", "perplexity", "peak_rss_bytes", "error", "touched", "zeros_added"} to OUT.json (the last two from
``param_check.changes``: which parameters the run changed). Only the oneshot call is timed.

Every modifier leaves the head alone the way llmpress does. The quantization modifiers match
``ignore=["lm_head"]`` by module name; llm-compressor 0.14's pruning modifiers do not (with
``targets=["Linear"], ignore=["lm_head"]`` they prune the head, and on a tied model half the
embeddings with it), so they get the regex form ``re:.*lm_head`` and their default targets.
"""

import json
import math
import resource
import sys
import time

import torch

from param_check import changes, snapshot


def weight_scheme(bits, group, sym):
    strategy = {"strategy": "group", "group_size": group} if group > 0 else {"strategy": "channel"}
    return {"num_bits": bits, "type": "int", "symmetric": sym, **strategy}


def modifiers(spec):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    kind = spec["kind"]
    groups = {"group_0": {"targets": ["Linear"], "weights": weight_scheme(spec.get("bits", 4), spec.get("group_size", 64),
                                                                          spec.get("sym", True))}}
    if kind == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if kind == "gptq":
        # llm-compressor's own default act-order ("static") unless the spec names one
        extra = {"actorder": spec["actorder"]} if "actorder" in spec else {}
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=spec.get("damp", 0.01),
                             block_size=128, **extra)]
    if kind == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return [AWQModifier(config_groups=groups, ignore=["lm_head"])]
    if kind == "smoothquant":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=spec.get("alpha", 0.5)),
                QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=["lm_head"])]
    if kind in ("wanda", "sparsegpt"):
        from llmcompressor.modifiers.pruning import WandaPruningModifier
        from llmcompressor.modifiers.obcq import SparseGPTModifier

        cls = WandaPruningModifier if kind == "wanda" else SparseGPTModifier
        # "targets"/"ignore" in the spec override these (e.g. to show the refusal of an unequal job)
        where = {"targets": spec.get("targets", ["Linear"]), "ignore": spec.get("ignore", ["re:.*lm_head"])}
        return [cls(sparsity=spec["sparsity"], mask_structure=spec.get("mask_structure", "0:0"), **where)]
    raise ValueError(f"no llm-compressor mapping for {kind}")


@torch.inference_mode()
def perplexity(model, windows):
    total, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=w.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").double().item()
        count += w.numel() - 1
    return math.exp(total / count)


def main():
    model_dir, windows_file, spec_file, out_file = sys.argv[1:5]
    spec = json.loads(open(spec_file).read())
    data = torch.load(windows_file)
    result = {"seconds": None, "perplexity": None, "peak_rss_bytes": None, "error": None, "touched": None,
              "zeros_added": None}
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        before = snapshot(model)
        calib = data["calib"]
        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        start = time.perf_counter()
        oneshot(model=model, dataset=ds, recipe=modifiers(spec), max_seq_length=calib.shape[1],
                num_calibration_samples=calib.shape[0])
        result["seconds"] = time.perf_counter() - start
        result.update(changes(before, model))
        del before
        result["perplexity"] = perplexity(model, data["eval"])
    except Exception as exc:  # a peer's refusal is a result to report, not a crash
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    open(out_file, "w").write(json.dumps(result))


if __name__ == "__main__":
    main()
