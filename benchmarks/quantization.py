"""Quantization benchmark: every built-in quantization recipe on SmolLM2-135M, llm-compressor beside it.

    python benchmarks/quantization.py [--recipes a,b] [--peer-python /path/to/python-with-llmcompressor]

Prints one Markdown table: perplexity (austen:eval 16x1024), bits per weight of the quantized
linears (scale overhead included), compressed bytes, compression wall time and peak memory; and,
where llm-compressor is installed, the same recipe through it on the same windows, with the ratio
of times and the perplexity difference.
"""

from _common import main

RECIPES = ["rtn-w4-g64", "rtn-w4-g64-asym", "gptq-w4-g64", "gptq-w4-g64-asym", "gptq-w3-g64", "gptq-w4-g64-classic",
           "gptq-w4-g64-mse", "awq-w4-g64", "awq+gptq-w4-g64", "smoothquant-w8a8"]
# llm-compressor with the same settings; its GPTQModifier defaults to static act-order (no "actorder" key = default),
# which our GPTQ recipes use too; -classic (no act-order) is compared with actorder=None.
PEERS = {
    "rtn-w4-g64": {"kind": "rtn", "bits": 4, "group_size": 64, "sym": True},
    "rtn-w4-g64-asym": {"kind": "rtn", "bits": 4, "group_size": 64, "sym": False},
    "gptq-w4-g64": {"kind": "gptq", "bits": 4, "group_size": 64, "sym": True},
    "gptq-w4-g64-asym": {"kind": "gptq", "bits": 4, "group_size": 64, "sym": False},
    "gptq-w3-g64": {"kind": "gptq", "bits": 3, "group_size": 64, "sym": True},
    "gptq-w4-g64-classic": {"kind": "gptq", "bits": 4, "group_size": 64, "sym": True, "actorder": None},
    "awq-w4-g64": {"kind": "awq", "bits": 4, "group_size": 64, "sym": False},
    "smoothquant-w8a8": {"kind": "smoothquant", "alpha": 0.5},
}

# llm-compressor 0.14's own figures on this protocol (shared/assets.md, calibration seed 0)
PUBLISHED = {"rtn-w4-g64": 45.00, "rtn-w4-g64-asym": 41.79, "gptq-w4-g64": 38.04}

if __name__ == "__main__":
    main(__doc__.splitlines()[0], RECIPES, PEERS, published=PUBLISHED)
