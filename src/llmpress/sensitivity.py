"""Per-layer sensitivity: the predicted loss increase of each candidate setting of each linear layer.

The estimate is the second-order Taylor term of the loss in the layer's *outputs*, with the Hessian
replaced by the diagonal of the empirical Fisher — the score of HAWQ (arXiv:1905.03696) and of
ModelOpt's AutoQuantize, written in output space as in Optimal Brain Compression (arXiv:2208.11580):
for a layer ``y = W x`` whose weight becomes ``W + ΔW``,

    ΔL ≈ ½ · Σ_o F_o · (ΔW H ΔWᵀ)_oo,    F_o = mean over tokens of (∂L/∂y_o)²,   H = mean of x xᵀ,

where ``L`` is the sum of the tokens' negative log-likelihoods, so that ΔL is the increase of the mean
NLL per token (nats; the predicted perplexity ratio is exp(Σ ΔL)). ``H`` is the Gram matrix GPTQ and
SparseGPT already collect; ``F`` takes one backward pass of the dense model on a few calibration
windows. ΔW is what the candidate method itself does to the weight on those statistics (GPTQ's
error feedback included), so the estimate sees a method's real error, not RTN's.

Also returned, for comparison, the plain Hessian-weighted output error ``‖ΔW X‖² / ‖W X‖²`` (the
layer-local measure the engine records): it ranks settings within a layer but not across layers,
which the Fisher weights do. ``benchmarks/auto.py --check`` measures how well each predicts the
perplexity change of compressing one layer alone (Spearman's rank correlation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .calib import block_prefix, block_stats
from .measure.size import layer_bytes
from .models.archs import Arch, block_linears, get_blocks, linear_weight
from .progress import bar
from .registry import WEIGHT_KINDS, get_method

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One setting a layer may get: a weight method and its config, or ``method=None``: left dense."""

    method: str | None
    config: Any = None

    @property
    def label(self) -> str:
        if self.method is None:
            return "dense"
        bits, group = getattr(self.config, "bits", None), getattr(self.config, "group_size", None)
        short = [f"w{bits}" if bits else "", f"g{group}" if bits and group is not None else "",
                 "" if getattr(self.config, "sym", True) else "asym"]
        pattern = getattr(self.config, "pattern", None)
        sparse = pattern if pattern not in (None, "unstructured") else getattr(self.config, "sparsity", None)
        return "-".join([self.method, *[s for s in short if s], *([f"s{sparse}"] if sparse else [])])


@dataclass
class Sensitivity:
    """Per layer (rows, in the model's order) and candidate (columns): ``cost`` the predicted increase of
    the mean NLL (nats/token), ``error`` the relative output error on the calibration inputs, ``bytes``
    the layer's stored size (``llmpress.measure.size.layer_bytes``, scales included)."""

    layers: list[str]
    shapes: list[tuple[int, int]]
    candidates: list[Candidate]
    cost: Tensor
    error: Tensor
    bytes: Tensor

    def to_dict(self) -> dict:
        return {"layers": self.layers, "shapes": [list(s) for s in self.shapes],
                "candidates": [c.label for c in self.candidates], "cost": self.cost.tolist(),
                "error": self.error.tolist(), "bytes": self.bytes.tolist()}

    @classmethod
    def from_dict(cls, data: dict, candidates: list[Candidate]) -> Sensitivity:
        """The table :meth:`to_dict` wrote, for these ``candidates`` (their labels must match the saved ones)."""
        if data.get("candidates") != [c.label for c in candidates]:
            raise ValueError(f"it was measured for the candidates {data.get('candidates')}, not "
                             f"{[c.label for c in candidates]}")
        table = {k: torch.tensor(data[k], dtype=torch.float64) for k in ("cost", "error", "bytes")}
        return cls(list(data["layers"]), [tuple(s) for s in data["shapes"]], candidates, **table)


def output_fisher(model: nn.Module, arch: Arch, samples: Tensor, batch_size: int = 4,
                  device: torch.device | str = "cpu", progress: bool = False) -> dict[str, Tensor]:
    """Per block linear (full name): F_o, the mean over tokens of (∂L/∂y_o)² for each output channel, L the
    sum of the windows' token NLLs; one forward and backward pass per batch of ``samples`` (n, L) ids.
    Only activations need gradients: the weights' are never formed."""
    blocks = get_blocks(model, arch)
    prefix = block_prefix(model, blocks)
    sums: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(_module, _args, output):
            def grad(g: Tensor) -> None:
                g2 = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
                sums[name] = g2 if name not in sums else sums[name] + g2
            output.register_hook(grad)
        return hook

    handles = [module.register_forward_hook(keep(f"{prefix}{i}.{n}"))
               for i, block in enumerate(blocks) for n, module in block_linears(block, arch).items()]
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    tokens = _backward_passes(model, samples, batch_size, handles, device, progress, "fisher")
    return {name: s / tokens for name, s in sums.items()}


def _backward_passes(model: nn.Module, samples: Tensor, batch_size: int, handles: list, device, progress: bool,
                     label: str) -> int:
    """Backward of the summed token NLL over ``samples`` in batches, with the parameters frozen (the hooks in
    ``handles`` collect what is wanted, and are removed at the end); returns the number of tokens seen."""
    required = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    model.to(device)
    tokens = 0
    try:
        for start in bar(range(0, len(samples), batch_size), progress, label):
            ids = samples[start:start + batch_size].to(device)
            out = model(input_ids=ids, labels=ids)
            (out.loss * ids.shape[0] * (ids.shape[1] - 1)).backward()  # the sum of the token NLLs
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), required):
            p.requires_grad_(r)
    return tokens


def candidate_grid(methods: list[str], bits: list[int], groups: list[int], sparsities: list[str],
                   base: dict[str, dict] | None = None, dense: bool = True) -> list[Candidate]:
    """Candidates: each quantization method at every (bits, group size), each pruning method at every
    sparsity ("0.5" or "2:4"), with ``base[method]`` args under them (e.g. act_order for GPTQ); plus
    "dense" when ``dense``."""
    out = [Candidate(None)] if dense else []
    for name in methods:
        method = get_method(name)
        if method.kind not in WEIGHT_KINDS:
            raise ValueError(f"{name} is a {method.kind} method, not a per-layer one")
        args = dict((base or {}).get(name, {}))
        if method.kind == "quantize":
            out += [Candidate(name, method.config(**{**args, "bits": b, "group_size": g}))
                    for b in bits for g in groups]
        else:
            for s in sparsities:
                setting = {"pattern": s} if ":" in str(s) else {"sparsity": float(s)}
                out.append(Candidate(name, method.config(**{**args, **setting})))
    return out


def sensitivity(model: nn.Module, arch: Arch, samples: Tensor, candidates: list[Candidate],
                fisher: dict[str, Tensor], batch_size: int = 8, device: torch.device | str = "cpu",
                progress: bool = False) -> Sensitivity:
    """The cost of every candidate on every block linear, each layer on the dense model's inputs (one
    read-only pass: ``llmpress.calib.block_stats``). ``fisher`` from :func:`output_fisher`."""
    needs = tuple(dict.fromkeys(["hessian", *[s for c in candidates if c.method for s in get_method(c.method).stats]]))
    blocks = get_blocks(model, arch)
    prefix = block_prefix(model, blocks)
    layers, shapes, cost, error, size = [], [], [], [], []
    for i, block, stats in block_stats(model, arch, samples, needs, torch.device(device), batch_size,
                                       progress, "sensitivity"):
        for name, module in block_linears(block, arch).items():
            full = f"{prefix}{i}.{name}"
            W = linear_weight(module, arch).detach().float()
            H = stats[name]["hessian"].float()  # 2/n · XᵀX
            F = fisher[full].to(W.device)
            scale = float(((W @ H) * W).sum()) or 1.0
            row_c, row_e, row_b = [], [], []
            for cand in candidates:
                if cand.method is None:
                    row_c.append(0.0)
                    row_e.append(0.0)
                    row_b.append(layer_bytes({"shape": list(W.shape)}))
                    continue
                method = get_method(cand.method)
                result = method.fn(W.clone(), *[stats[name][s] for s in method.stats], cand.config)
                dW = result.weight.float() - W
                per_row = ((dW @ H) * dW).sum(1)  # 2 · mean ‖Δy_o‖² per output channel
                row_c.append(float(0.25 * (per_row * F).sum()))
                row_e.append(float(per_row.sum()) / scale)
                row_b.append(layer_bytes(dict(result.record(), shape=list(W.shape))))  # as eval sizes it
            layers.append(full)
            shapes.append(tuple(W.shape))
            cost.append(row_c)
            error.append(row_e)
            size.append(row_b)
    log.debug("sensitivity of %d layers x %d candidates", len(layers), len(candidates))
    return Sensitivity(layers, shapes, candidates, torch.tensor(cost, dtype=torch.float64),
                       torch.tensor(error, dtype=torch.float64), torch.tensor(size, dtype=torch.float64))


@dataclass
class EmbeddingSensitivity:
    """The input embedding's row of the table: per candidate (``dense`` first, then the embedding quantizer's
    settings) the predicted increase of the mean NLL, its two terms (``lookup``: the input lookup's; ``head``:
    the tied head's, 0 when untied) and the stored bytes, as eval counts them."""

    layer: str
    shape: tuple[int, int]
    tied: bool
    candidates: list[Candidate]
    cost: list[float]
    lookup: list[float]
    head: list[float]
    bytes: list[float]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "shape": list(self.shape), "tied": self.tied,
                "candidates": [c.label for c in self.candidates], "cost": self.cost, "lookup": self.lookup,
                "head": self.head, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, data: dict, candidates: list[Candidate]) -> EmbeddingSensitivity:
        if data.get("candidates") != [c.label for c in candidates]:
            raise ValueError(f"its embedding was measured for the candidates {data.get('candidates')}, not "
                             f"{[c.label for c in candidates]}")
        return cls(data["layer"], tuple(data["shape"]), bool(data["tied"]), candidates,
                   *[[float(v) for v in data[k]] for k in ("cost", "lookup", "head", "bytes")])


def embedding_candidates(bits: list[int], groups: list[int]) -> list[Candidate]:
    """"dense", then the embedding quantizer (``llmpress.quant.embedding``) at every (bits, group size)."""
    config = get_method("embedding").config
    return [Candidate(None)] + [Candidate("embedding", config(bits=b, group_size=g)) for b in bits for g in groups]


def embedding_statistics(model: nn.Module, samples: Tensor, batch_size: int = 4,
                         device: torch.device | str = "cpu", progress: bool = False) -> dict[str, Tensor]:
    """What the embedding's cost needs, from one forward and backward pass of the dense model on ``samples``
    (L the sum of the token NLLs, means over all tokens, as :func:`output_fisher`): ``lookup`` (hidden,) the
    mean of (∂L/∂e_j)² over the looked-up vectors e; ``head`` (vocab,) the mean of (∂L/∂z_o)² over the logits z;
    ``gram`` (hidden, hidden) the mean of h hᵀ over the head's inputs h."""
    sums: dict[str, Tensor] = {}

    def add(key: str, value: Tensor) -> None:
        sums[key] = value if key not in sums else sums[key] + value

    def squared(key: str):
        return lambda g: add(key, g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0))

    def lookup_hook(_m, _a, out):
        out.requires_grad_(True)
        out.register_hook(squared("lookup"))

    def head_hook(_m, args, out):
        h = args[0].detach().float().reshape(-1, args[0].shape[-1])
        add("gram", h.T @ h)
        out.register_hook(squared("head"))

    handles = [model.get_input_embeddings().register_forward_hook(lookup_hook),
               model.get_output_embeddings().register_forward_hook(head_hook)]
    tokens = _backward_passes(model, samples, batch_size, handles, device, progress, "embedding")
    return {key: value / tokens for key, value in sums.items()}


def embedding_sensitivity(model: nn.Module, samples: Tensor, fisher_samples: int, candidates: list[Candidate],
                          device: torch.device | str = "cpu", progress: bool = False) -> EmbeddingSensitivity:
    """The cost of every candidate on the input embedding W (vocab, hidden), comparable to the block linears':
    the same second-order term in the outputs of each use of W, with the diagonal empirical Fisher.

    The lookup is a linear layer whose inputs are one-hot tokens: its Gram is diag(p), p the tokens'
    frequencies in ``samples``, so its term is ½ Σ_j F_j Σ_v p_v ΔW_vj² with F_j the mean of (∂L/∂e_j)².
    A tied head computes z = W h: its term is ½ Σ_o F_o (ΔW H ΔWᵀ)_oo with F_o the mean of (∂L/∂z_o)² and
    H the mean of h hᵀ (``embedding_statistics`` on the first ``fisher_samples`` windows). The cost is their
    sum, in nats per token like :func:`sensitivity`'s."""
    from .quant.embedding import embedding_module, quantize_embedding

    name, module, tied = embedding_module(model)
    stats = embedding_statistics(model, samples[:max(1, fisher_samples)], device=device, progress=progress)
    W = module.weight.detach().float().to(device)
    freq = torch.bincount(samples.reshape(-1), minlength=W.shape[0])[:W.shape[0]].to(W).div_(samples.numel())
    lookup, head, size = [], [], []
    for cand in candidates:
        if cand.method is None:
            lookup.append(0.0)
            head.append(0.0)
            size.append(layer_bytes({"shape": list(W.shape)}))
            continue
        result = quantize_embedding(W, cand.config)
        dW = result.weight - W
        lookup.append(float(0.5 * (freq @ dW.pow(2)) @ stats["lookup"].to(W)))
        head.append(float(0.5 * (((dW @ stats["gram"].to(W)) * dW).sum(1) @ stats["head"].to(W))) if tied else 0.0)
        size.append(layer_bytes(dict(result.record(), shape=list(W.shape))))
    cost = [a + b for a, b in zip(lookup, head)]
    return EmbeddingSensitivity(name, tuple(W.shape), tied, candidates, cost, lookup, head, [float(s) for s in size])
