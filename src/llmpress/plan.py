"""A plan before the run: the peak RAM, device memory, disk and time a compression needs, and whether it fits.

A run that dies of memory after hours is the peers' most reported failure. The plan reads what the
checkpoint's headers say (block sizes, embeddings, dtypes) and times one probe block: block 0 compressed
with the recipe, streamed as the real run does (``llmpress.stream``), twice, on a few calibration windows,
so that the parts that grow with the calibration set (forward passes, activations) are fitted as
``a + b·samples`` and extrapolated to the recipe's calibration; the output is not kept. The same estimate
runs before ``llmpress compress``, which refuses to start, with the option to change, when the RAM or
the disk it needs is not free.

Estimates (bytes, seconds), for a streamed run of ``n`` blocks on ``N`` windows of ``L`` tokens:

- RAM: the process as it is now + the largest of: embedding the windows (the embedding table in the
  checkpoint's dtype + the activations), the probe block's own peak extrapolated to ``N`` windows, and
  copying the largest non-block tensors at the end;
- disk: the probe block's shard × ``n`` + the non-block tensors + two copies of the activations (the resume
  point, kept while its successor is written);
- time: the probe block's time extrapolated to ``N`` windows × ``n`` + copying the non-block tensors at
  the probe's read/write speed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .calib import block_prefix, calibration_dtype
from .errors import LlmpressError
from .measure.memory import PeakMemory, available_memory, current_rss
from .models.archs import arch_for, get_blocks
from .models.lazy import skeleton
from .models.loader import source_config
from .models.sources import open_checkpoint
from .recipe import Recipe
from .stream import (
    REST_SHARD_BYTES,
    _groups,
    _StreamPlacement,
    _Writer,
    block_dtype,
    embed_for_capture,
    packs,
    run_blocks,
)

log = logging.getLogger(__name__)

# the two probes calibrate on this many batches of windows: whole batches, so that the cost per window between
# them is the run's (with 2 and 4 windows, below one batch of 8, a 1B GPTQ block's cost per window came out 3x
# the run's, and its time 2.7x)
PROBE_BATCHES = (1, 2)


@dataclass
class Plan:
    model: str
    recipe: str
    blocks: int
    streamed: bool
    samples: int
    seq_len: int
    peak_ram_bytes: int
    device_bytes: int | None
    disk_bytes: int
    seconds: float
    free_ram_bytes: int
    free_disk_bytes: int | None
    probe: dict

    def fits(self) -> str | None:
        """None when the run fits this machine, else the one-line reason with what to change."""
        if self.peak_ram_bytes > self.free_ram_bytes:
            return (f"the run needs about {self.peak_ram_bytes / 1e9:.1f} GB of RAM and "
                    f"{self.free_ram_bytes / 1e9:.1f} GB is available: use fewer calibration windows (--samples) "
                    "or shorter ones (--seq-len), or free memory")
        if self.free_disk_bytes is not None and self.disk_bytes > self.free_disk_bytes:
            return (f"the run needs about {self.disk_bytes / 1e9:.1f} GB of disk beside --out and "
                    f"{self.free_disk_bytes / 1e9:.1f} GB is free: choose another --out or free space")
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [("peak RAM", f"{self.peak_ram_bytes / 1e9:.2f} GB (free: {self.free_ram_bytes / 1e9:.1f} GB)"),
                ("device memory", "– (cpu: the RAM above)" if self.device_bytes is None
                 else f"{self.device_bytes / 1e9:.2f} GB"),
                ("disk", f"{self.disk_bytes / 1e9:.2f} GB" + ("" if self.free_disk_bytes is None
                                                            else f" (free: {self.free_disk_bytes / 1e9:.1f} GB)")),
                ("time", "not estimated (no probe)" if math.isnan(self.seconds)
                 else f"{self.seconds:.0f} s ({self.seconds / 60:.1f} min)"),
                ("blocks", f"{self.blocks}, streamed from disk" if self.streamed else f"{self.blocks}, in memory"),
                ("calibration", f"{self.samples} x {self.seq_len}" if self.samples else "none")]
        return "\n".join(f"{k:>14}  {v}" for k, v in rows)


def _fit(xs: tuple[int, int], ys: tuple[float, float], x: int) -> float:
    """The line through (xs, ys) at x, never below the larger measured point's share."""
    slope = max(0.0, (ys[1] - ys[0]) / (xs[1] - xs[0]))
    return max(0.0, ys[1] + slope * (x - xs[1]))


class _Stop(Exception):
    pass


def _probe(source: Path, recipe: Recipe, samples: torch.Tensor | None, device: torch.device) -> dict:
    """Compress block 0 of ``source`` as the streamed run does, into a throwaway folder: seconds (block phase),
    peak RSS above the start, bytes of its shard, seconds reading and writing."""
    config = source_config(source)
    checkpoint = open_checkpoint(source, config)
    model = skeleton(config)
    arch = arch_for(model)
    blocks = get_blocks(model, arch)
    prefix = block_prefix(model, blocks)
    scratch = Path(tempfile.mkdtemp(prefix=".llmpress-plan-"))
    try:
        writer = _Writer(scratch, model, checkpoint, packs(recipe, "auto"))
        drop = embed_for_capture(model, checkpoint) if samples is not None else (lambda: None)
        timing = {"read": 0.0, "write": 0.0}

        class Timed(_StreamPlacement):
            def onload(self, block):
                began = time.perf_counter()
                super().onload(block)
                timing["read"] += time.perf_counter() - began

        compute = calibration_dtype(recipe.calibration.dtype, device)
        placement = Timed(model, checkpoint, prefix, device, drop, block_dtype(recipe, checkpoint, compute))
        results: dict = {}
        layers: dict = {}

        def after(i, block, hidden):
            began = time.perf_counter()
            writer.block(i, block, layers, results)
            timing["write"] += time.perf_counter() - began
            raise _Stop

        began = time.perf_counter()
        with PeakMemory("cpu") as mem:
            try:
                run_blocks(model, checkpoint, recipe, samples, device, compute, placement, scratch / "spill",
                           results=results, block_records={}, after_block=after, layers=layers)
            except _Stop:
                pass
        seconds = time.perf_counter() - began
        shard = scratch / writer.shard(0)
        return {"seconds": seconds, "peak_delta_bytes": mem.delta_bytes, "shard_bytes": shard.stat().st_size,
                "read_s": timing["read"], "write_s": timing["write"],
                "block_bytes": checkpoint.total_bytes(f"{prefix}0.")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def plan_streamed(source: Path, recipe: Recipe, samples: torch.Tensor | None, device: torch.device,
                  out: Path | None = None, name: str | None = None, probe: bool = True) -> Plan:
    """The :class:`Plan` of a streamed run of ``recipe`` on ``source`` (a model folder or a .gguf file) with
    calibration ``samples`` (N, L) or None.

    ``probe=False`` (what ``compress`` checks before it starts) skips the probe blocks: memory and disk from the
    sizes alone (a block's float32 weights three times: weights, originals, rewritten; three copies of the
    activations), no time."""
    config = source_config(source)
    checkpoint = open_checkpoint(source, config)
    model = skeleton(config)
    blocks = get_blocks(model, arch_for(model))
    prefix = block_prefix(model, blocks)
    n = len(blocks)
    hidden = config.get_text_config().hidden_size if hasattr(config, "get_text_config") else config.hidden_size
    base = current_rss()
    count, length = (0, 0) if samples is None else tuple(samples.shape)
    compute = calibration_dtype(recipe.calibration.dtype, device)
    act = count * length * hidden * (compute or torch.float32).itemsize
    block_bytes = checkpoint.total_bytes(f"{prefix}0.")
    block_fp32 = block_bytes * 4 // max(1, checkpoint.float_dtype().itemsize)
    if not probe:  # what compress checks before it starts: the sizes alone, no probe block
        probes = [{"seconds": math.nan, "peak_delta_bytes": 3 * block_fp32 + 3 * act, "shard_bytes": block_bytes,
                   "read_s": 1.0, "write_s": 0.0, "block_bytes": block_bytes}]
        seconds_block, delta = math.nan, probes[0]["peak_delta_bytes"]
    elif samples is None:
        probes = [_probe(source, recipe, None, device)]
        seconds_block, delta = probes[0]["seconds"], probes[0]["peak_delta_bytes"]
    else:
        sizes = tuple(min(count, k * recipe.calibration.batch_size) for k in PROBE_BATCHES)
        if sizes[0] == sizes[1]:
            sizes = (max(1, sizes[0] - 1), sizes[1])
        # a first probe pays one-time costs (kernels built for each new product shape: ~5 s of a 1B GPTQ block,
        # as much as its second batch of windows) and only warms up; the line runs through the two after it
        _probe(source, recipe, samples[:sizes[0]], device)
        probes = [_probe(source, recipe, samples[:k], device) for k in sizes]
        seconds_block = _fit(sizes, (probes[0]["seconds"], probes[1]["seconds"]), count)
        peaks = (probes[0]["peak_delta_bytes"], probes[1]["peak_delta_bytes"])
        delta = max(_fit(sizes, peaks, count), *peaks)  # never under what a probe needed
    last = probes[-1]
    rest = [n_ for n_ in checkpoint.names() if not n_.startswith(prefix)]
    rest_bytes = sum(checkpoint.nbytes(n_) for n_ in rest)
    largest_rest = max((sum(checkpoint.nbytes(x) for x in g) for g in _groups(rest, checkpoint)), default=0)
    embed = model.get_input_embeddings().weight
    capture = embed.numel() * checkpoint.float_dtype().itemsize + act if samples is not None else 0
    finish = 2 * min(largest_rest, max(REST_SHARD_BYTES, largest_rest))
    peak = base + max(capture, int(delta), finish)
    io_rate = (last["block_bytes"] + last["shard_bytes"]) / max(1e-6, last["read_s"] + last["write_s"])
    seconds = seconds_block * n + 2 * rest_bytes / io_rate
    disk = last["shard_bytes"] * n + rest_bytes + 2 * act
    where = (Path(out).expanduser().parent if out is not None else Path.cwd())
    free_disk = shutil.disk_usage(where).free if where.exists() else None
    device_bytes = None
    if device.type != "cpu":
        device_bytes = int(last["block_bytes"] * 4 / max(1, checkpoint.float_dtype().itemsize) + 3 * act)
    return Plan(name or str(source), recipe.name, n, True, count, length, int(peak), device_bytes, int(disk),
                float(seconds), available_memory() + base, free_disk,
                {"probes": probes, "base_rss_bytes": base, "activation_bytes": act, "rest_bytes": rest_bytes})


def write_json(plan: Plan, path: Path) -> None:
    path.write_text(json.dumps(plan.to_dict(), indent=2))


def check(plan: Plan) -> None:
    reason = plan.fits()
    if reason is not None:
        raise LlmpressError(reason)
