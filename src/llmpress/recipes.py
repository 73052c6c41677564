"""Built-in recipes that chain methods of different modules; each method's own recipes are registered with it.

Imported by ``llmpress.registry.discover`` after every method module, so the recipes named here exist.
"""

from __future__ import annotations

from .registry import RECIPES, register_recipes


def chain(*names: str) -> dict:
    """The recipes ``names`` one after the other; the calibration of the first one that sets it."""
    calibration = next((RECIPES[n]["calibration"] for n in names if "calibration" in RECIPES[n]), None)
    stages = [stage for n in names for stage in RECIPES[n]["stages"]]
    return {"stages": stages} if calibration is None else {"calibration": calibration, "stages": stages}


register_recipes({
    "magnitude-50+rtn-w4-g64": chain("magnitude-50", "rtn-w4-g64"),
    "sparsegpt-50+rtn-w4-g64": chain("sparsegpt-50", "rtn-w4-g64"),
    # AWQ's scales and clips, then GPTQ on the same (asymmetric) grid
    "awq+gptq-w4-g64": {"calibration": RECIPES["gptq-w4-g64-asym"]["calibration"],
                        "stages": [RECIPES["awq-w4-g64"]["stages"][0], *RECIPES["gptq-w4-g64-asym"]["stages"]]},
    "svd-llm-80+rtn-w8": chain("svd-llm-80", "rtn-w8"),
    "sparsegpt-24+distill": chain("sparsegpt-24", "distill"),
    "gptq-w3-g64+qat": chain("gptq-w3-g64", "qat"),
    # 2 bits/weight: GPTVQ's codes, then the codebooks and norms distilled with the codes frozen (PV-tuning's
    # continuous step). 150 steps of 2×256 tokens, the codebooks at 0.3× the norms' lr: about 15 minutes on one
    # CPU thread; SmolLM2-135M with --samples 32: 110.8 → 57.3 at 2.09 bits/weight (README, "Two bits per weight").
    "gptvq-w2+qat": {**RECIPES["gptvq-w2"], "stages": [
        *RECIPES["gptvq-w2"]["stages"],
        {"method": "distill", "args": {**RECIPES["qat"]["stages"][0]["args"], "qat_lr_scale": 0.3, "steps": 150,
                                       "warmup": 2, "seq_len": 256, "batch_size": 2}}]},
    # W4A4 + KV4 with QAT (LLM-QAT): the GPTQ W4A4 model (every linear's input rotated online, norms unfolded)
    # trained with its int4 inputs and 4-bit keys and values fake-quantized (straight-through), the codes moving on
    # GPTQ's scales; 400 steps of 2 x 256 tokens drawn from 1024 windows. The latent weights at 3x a lr of 1e-4: at
    # 1e-3 x 3, Adam moved every weight by 0.16 of a median int4 g64 step (0.019) per step and the KL to the
    # teacher rose from 0.88 to 7.1 in two steps. Passing again over the same 256 windows fit them better and the
    # eval text worse (500 steps: last KL 0.29 against 0.51 at 200); 1024 windows over 400 steps took the
    # W4A4 + KV4 perplexity from 45.68 (200 steps, 256 windows) to 42.19. README, "Training for W4A4".
    "rotate+gptq-w4a4-g64+qat": {**RECIPES["rotate+gptq-w4a4-g64"], "stages": [
        *RECIPES["rotate+gptq-w4a4-g64"]["stages"],
        {"method": "distill", "args": {**RECIPES["qat"]["stages"][0]["args"], "lr": 1e-4, "qat_lr_scale": 3.0,
                                       "steps": 400, "warmup": 10, "seq_len": 256, "batch_size": 2,
                                       "samples": 1024, "kv_bits": 4}}]},
})
