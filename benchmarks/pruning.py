"""Pruning benchmark: magnitude, Wanda, SparseGPT, OWL and structured pruning on SmolLM2-135M, llm-compressor beside it.

    python benchmarks/pruning.py [--recipes a,b] [--seeds 0,1,2] [--peer-python /path/to/python-with-llmcompressor]

Same calibration (128 x 512, austen:calib, seed 0 unless --seed) and evaluation windows (austen:eval, 16 x 1024) as the
quantization benchmark. Prints one Markdown table (perplexity, bits per weight of the compressed linears and
the compressed size as ``llmpress.measure.size_report`` counts it, compression wall time, peak memory; and,
where llm-compressor is installed, its WandaPruningModifier / SparseGPTModifier with the same settings on the
same windows, refused when the two toolkits changed different parameters), then a second table with what each
model really takes on disk when saved (``compressed-tensors``: sparse-bitmask / sparse-24-bitmask for pruned models,
pack-quantized for quantized ones; structured pruning saves smaller dense matrices). Folders are written in the
model's dtype (fp32 here).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import llmpress
from _common import Bench, main
from llmpress.measure import perplexity, size_report
from llmpress.measure.size import folder_bytes

RECIPES = ["magnitude-50", "magnitude-24", "magnitude-48", "wanda-50", "wanda-24", "wanda-48",
           "sparsegpt-50", "sparsegpt-24", "sparsegpt-48", "sparsegpt-50-w4", "sparsegpt-50+gptq-w4",
           "sparsegpt-50+rtn-w4-g64", "owl-wanda-50", "owl-sparsegpt-50", "wanda-70", "owl-wanda-70", "width-20",
           "depth-20"]
PEERS = {
    "wanda-50": {"kind": "wanda", "sparsity": 0.5, "mask_structure": "0:0"},
    "wanda-24": {"kind": "wanda", "sparsity": 0.5, "mask_structure": "2:4"},
    "wanda-48": {"kind": "wanda", "sparsity": 0.5, "mask_structure": "4:8"},
    "sparsegpt-50": {"kind": "sparsegpt", "sparsity": 0.5, "mask_structure": "0:0"},
    "sparsegpt-24": {"kind": "sparsegpt", "sparsity": 0.5, "mask_structure": "2:4"},
    "sparsegpt-48": {"kind": "sparsegpt", "sparsity": 0.5, "mask_structure": "4:8"},
}
# llmpress's true-sequential variants do the same job as the plain recipe: the same peer row beside them
PEERS.update({f"{name}-ts": PEERS[name] for name in ("wanda-50", "wanda-24", "sparsegpt-50", "sparsegpt-24")})
# The harness's old, unequal setting (llm-compressor prunes the tied head, so half the embeddings): kept so that
# ``--recipes wanda-50-head`` shows the benchmark refusing that side by side.
PEERS["wanda-50-head"] = {**PEERS["wanda-50"], "targets": ["Linear"], "ignore": ["lm_head"], "recipe": "wanda-50"}
# llm-compressor 0.14's own figures on this protocol (shared/assets.md; calibration seed 0, the head left alone)
PUBLISHED = {"wanda-50": 63.74, "wanda-24": 169.27, "sparsegpt-50": 50.19, "sparsegpt-24": 76.93}
PUBLISHED.update({f"{name}-ts": figure for name, figure in PUBLISHED.items()})  # the peer's job is the same
# methods whose results the compressed-tensors exporter stores (sparse or packed); others are saved as they are
_STORABLE = {"magnitude", "wanda", "sparsegpt", "owl", "rtn", "gptq"}


class PruningBench(Bench):
    """Bench, plus each compressed model saved once to measure its real size on disk."""

    def run(self, name: str) -> dict:
        recipe, fresh = self.prepare(name)
        if recipe is None:
            return fresh
        storable = all(s.method in _STORABLE for s in recipe.stages)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp, "model")
            start = time.perf_counter()
            result = llmpress.compress(fresh, recipe, samples=self.args.samples, seq_len=self.args.seq_len,
                                       seed=self.seed, progress=not self.args.quiet, out=out,
                                       format="compressed-tensors" if storable else "auto")
            wall = time.perf_counter() - start
            disk = folder_bytes(out)
            saved_as = json.loads((out / "llmpress.json").read_text()).get("export", {}).get(
                "compression_format", "dense")
        ppl = perplexity(result.model, self.eval)["perplexity"]
        size = size_report(result.model, result.layers)
        layers = result.layers.values()
        numel = sum(m["shape"][0] * m["shape"][1] for m in layers if m.get("shape"))
        zeros = sum(m.get("sparsity", 0) * m["shape"][0] * m["shape"][1] for m in layers if m.get("shape"))
        return {"recipe": name, "perplexity": ppl, "seconds": result.seconds, "save_seconds": wall - result.seconds,
                "peak_bytes": result.peak_memory_bytes, "bits_per_weight": size["linear_bits_per_weight"],
                "size_bytes": size["size_bytes"], "compression_ratio": size["compression_ratio"],
                "params": size["params"]["total"], "disk_bytes": disk, "saved_as": saved_as,
                "linear_sparsity": zeros / numel if numel else None, **self.changes(result)}


def disk_table(rows: list[dict], base_disk: int, base_params: int) -> str:
    lines = ["| recipe | saved as | params | sparsity of pruned linears | disk MB (fp32 values) | vs base |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error"):
            continue
        sparsity = "–" if r["linear_sparsity"] is None else f"{r['linear_sparsity']:.4f}"
        lines.append(f"| {r['recipe']} | {r['saved_as']} | {r['params'] / 1e6:.1f}M | {sparsity} | "
                     f"{r['disk_bytes'] / 1e6:,.1f} | {r['disk_bytes'] / base_disk:.3f} |")
    lines.append(f"| base | dense | {base_params / 1e6:.1f}M | – | {base_disk / 1e6:,.1f} | 1.000 |")
    return "\n".join(lines)


def disk_sizes(rows: list[dict], bench: PruningBench) -> str:
    """The on-disk table, against the base folder."""
    base_params = sum(p.numel() for p in bench.base.model.parameters())
    return disk_table(rows, folder_bytes(bench.base.folder), base_params)


if __name__ == "__main__":
    main(__doc__.splitlines()[0], RECIPES, PEERS, PruningBench, disk_sizes, PUBLISHED)
