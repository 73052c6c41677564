"""llm-compressor's documented workflow on a checkpoint folder, as one process that benchmarks/scale.py measures.

Run in a Python that has llmcompressor installed (e.g. /tmp/lc-venv/bin/python):
    python scale_peer.py MODEL_DIR WINDOWS.pt SPEC.json OUT.json [SAVE_DIR]

The steps of llm-compressor's examples (examples/quantization_w4a16): the whole model loaded with
``AutoModelForCausalLM.from_pretrained(dir, dtype="auto")`` (the checkpoint's dtype, bfloat16 here;
``torch_dtype`` is transformers 5's deprecated name for ``dtype``), ``oneshot`` on the calibration
windows of WINDOWS.pt (the same token ids llmpress calibrates on; ``{"calib": None}`` for RTN, which
llm-compressor's docs run without a dataset), then
``model.save_pretrained(SAVE_DIR, save_compressed=True)`` and the tokenizer beside it.

The modifiers are the quantization benchmark's (``peers/llmcompressor_peer.py: modifiers(spec)``),
imported, not copied: e.g. ``GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights":
{4 bits, int, symmetric, group, group_size 64}}}, ignore=["lm_head"])``, which is the W4A16 preset with its
group size (128) set to llmpress's 64. This script lives outside ``peers/`` because those files' bytes key
``benchmarks/peer-cache``.

No snapshot of the parameters is taken (it would double the memory being measured). For the same-job
check, OUT.json lists the modules llm-compressor attached a quantization scheme to and the distinct
weight arguments it used, beside the W4A16 preset's arguments. Writes {"load_seconds", "oneshot_seconds",
"save_seconds", "quantized", "weights", "w4a16_preset", "peak_rss_bytes", "error"}.
"""

import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from llmcompressor_peer import modifiers  # noqa: E402  (the quantization benchmark's mapping)


def _weights(module) -> dict | None:
    scheme = getattr(module, "quantization_scheme", None)
    weights = getattr(scheme, "weights", None)
    return None if weights is None else json.loads(weights.model_dump_json())


def main():
    model_dir, windows_file, spec_file, out_file = sys.argv[1:5]
    save_dir = sys.argv[5] if len(sys.argv) > 5 else None
    spec = json.loads(Path(spec_file).read_text())
    from safetensors.torch import load_file

    calib = load_file(windows_file)["calib"]
    result = {"load_seconds": None, "oneshot_seconds": None, "save_seconds": None, "quantized": None,
              "weights": None, "w4a16_preset": None, "peak_rss_bytes": None, "error": None}
    try:
        from compressed_tensors.quantization import preset_name_to_scheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from transformers import AutoModelForCausalLM, AutoTokenizer

        result["w4a16_preset"] = json.loads(preset_name_to_scheme("W4A16", ["Linear"]).weights.model_dump_json())
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=spec.get("dtype", "auto"))
        result["load_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        if calib is None:  # a recipe without calibration (RTN): the docs' data-free call
            oneshot(model=model, recipe=modifiers(spec))
        else:
            ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
            oneshot(model=model, dataset=ds, recipe=modifiers(spec), max_seq_length=calib.shape[1],
                    num_calibration_samples=calib.shape[0])
        result["oneshot_seconds"] = time.perf_counter() - start
        found = {name: _weights(m) for name, m in model.named_modules() if _weights(m) is not None}
        result["quantized"] = sorted(found)
        result["weights"] = [json.loads(w) for w in sorted({json.dumps(w, sort_keys=True) for w in found.values()})]
        if save_dir:
            start = time.perf_counter()
            model.save_pretrained(save_dir, save_compressed=True)
            AutoTokenizer.from_pretrained(model_dir).save_pretrained(save_dir)
            result["save_seconds"] = time.perf_counter() - start
    except Exception as exc:  # a peer's failure is a result to report, not a crash
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out_file).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
