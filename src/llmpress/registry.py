"""One table from method name to (config class, pure function, statistics it needs).

A recipe stage names a method; the engine looks it up here, collects the
statistics it lists (see ``llmpress.stats``) and calls
``fn(weight, *statistics, config)``. Adding a method = one entry.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from .distill.stage import DistillConfig, distill_stage
from .errors import LlmpressError
from .lowrank.stage import ASVDConfig, SVDConfig, SVDLLMConfig, asvd_stage, svd_llm_stage, svd_stage
from .prune.magnitude import MagnitudeConfig, magnitude
from .prune.depth import DepthConfig, depth_prune
from .prune.structured import WidthConfig, width_prune
from .prune.owl import OWLConfig, owl
from .prune.sparsegpt import SparseGPTConfig, sparsegpt
from .prune.wanda import WandaConfig, wanda
from .quant.awq import AWQConfig, awq_block
from .quant.gptq import GPTQConfig, gptq
from .quant.kvcache import KVCacheConfig, kv_cache_stage
from .quant.rtn import RTNConfig, rtn
from .quant.smoothquant import SmoothQuantConfig, smoothquant_block


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    fn: Callable
    stats: tuple[str, ...] = ()
    kind: str = "quantize"  # "quantize" | "prune" | "block" (rewrites a whole block: smoothing)
    #                         | "runtime" (changes inference, not weights: KV-cache quantization)
    #                         | "model" (sees the whole model: depth pruning, global rank allocation)
    calibrated: bool | None = None  # whether it needs calibration data; None = decided by stats/kind
    # extra keyword inputs a "model" method wants from llmpress.api.compress: "teacher" (a copy of the model
    # taken before the first stage), "tokenizer", "layers" (per-layer meta so far), "results" (the engine's
    # Compressed per layer, which the method may rewrite)
    inputs: tuple[str, ...] = ()

    @property
    def needs_inputs(self) -> bool:
        """Whether the engine must run calibration data through the blocks for this method."""
        if self.calibrated is not None:
            return self.calibrated
        return bool(self.stats) or self.kind == "block"


METHODS: dict[str, Method] = {
    "rtn": Method("rtn", RTNConfig, rtn, (), "quantize"),
    "magnitude": Method("magnitude", MagnitudeConfig, magnitude, (), "prune"),
    "wanda": Method("wanda", WandaConfig, wanda, ("col_norm",), "prune"),
    "sparsegpt": Method("sparsegpt", SparseGPTConfig, sparsegpt, ("hessian",), "prune"),
    # non-uniform sparsity: all blocks' outlier ratios first, then Wanda/SparseGPT block by block
    "owl": Method("owl", OWLConfig, owl, (), "model", calibrated=True),
    # structured pruning: the matrices (width) or the block list (depth) really shrink
    "width": Method("width", WidthConfig, width_prune, (), "model", calibrated=True),
    "depth": Method("depth", DepthConfig, depth_prune, (), "model", calibrated=True),
    "gptq": Method("gptq", GPTQConfig, gptq, ("hessian",), "quantize"),
    # a runtime setting: weights untouched, applied by llmpress.evaluate from the recipe
    "kv-cache": Method("kv-cache", KVCacheConfig, kv_cache_stage, (), "runtime"),
    "awq": Method("awq", AWQConfig, awq_block, (), "block"),
    "smoothquant": Method("smoothquant", SmoothQuantConfig, smoothquant_block, (), "block"),
    # low-rank factorization: all layers' loss curves first, then one global rank allocation
    "svd": Method("svd", SVDConfig, svd_stage, (), "model", calibrated=False),
    "asvd": Method("asvd", ASVDConfig, asvd_stage, (), "model", calibrated=True),
    "svd-llm": Method("svd-llm", SVDLLMConfig, svd_llm_stage, (), "model", calibrated=True),
    # recovery: the model before the first stage teaches the compressed one (KD, QAT on the grid, LoRA/QLoRA)
    "distill": Method("distill", DistillConfig, distill_stage, (), "model", calibrated=False,
                      inputs=("teacher", "tokenizer", "layers", "results")),
}


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name lists the valid ones and the closest match."""
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(str(name), METHODS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise LlmpressError(f"unknown method '{name}'{hint}: valid methods are {', '.join(sorted(METHODS))}")
