"""QuaRot's online Hadamard transforms: the rotations a model computes at run time, not folded into weights.

The offline rotations of :mod:`.fold` leave three places where activations are not rotated (QuaRot,
arXiv:2404.00456, §4): the MLP's inner activations (the input of ``down_proj``, after the elementwise
product of gate and up), the attention output across heads (the input of ``o_proj``: each head's values are
rotated offline, but not the heads against each other), and the keys after RoPE. Quantizing those to 4 bits
needs them rotated too (``o_proj``'s input as ``down_proj``'s below, with n = heads·head_dim):

- **down_proj's input**: x ← x·H/√n (n the MLP width), with the inverse absorbed offline into the weight,
  W ← W·H/√n (:func:`absorb_input_hadamard`): y = x·Wᵀ = (x·H/√n)(W·H/√n)ᵀ since H·Hᵀ = n·I. A forward
  pre-hook (:class:`InputHadamard`) applies it, so the linear itself (and every statistic a later stage
  collects on its input, such as GPTQ's Hessian) sees the rotated activations.
- **keys and values in a quantized KV cache**: per head, rotate → quantize → dequantize → rotate back
  (``llmpress.quant.kvgrid``). Attention is unchanged by the pair of rotations, exactly as rotating q and k
  (q·kᵀ = (q·H)(k·H)ᵀ/n), so only the rounding happens in the rotated basis.

H is the integer Hadamard matrix :func:`online_hadamard` (no random signs): kron(hadamard(m), Sylvester 2^k)
with the smallest such m, as QuaRot's kernels choose (a stored order 12, 20, 28, … times a fast Walsh–Hadamard
transform): for SmolLM2's MLP width 1536 = 12·128. :func:`hadamard_transform` applies the factors as small GEMMs,
n·(12 + 128) multiply-adds per row instead of n² (a butterfly in PyTorch ops measured slower than the GEMM).

A model carries its online transforms in its config (:data:`CONFIG_KEY`, saved in ``config.json``):
``{"input_hadamard": [module names], "kv_hadamard": true}``; :func:`install` puts the hooks back after a
load (``llmpress.export.rotated``), and the KV-cache runtime reads ``kv_hadamard``. What an engine must do
to run such a model: multiply each listed module's input by ``online_hadamard(n)/√n`` before the matmul,
and (only when it quantizes the KV cache) quantize ``k·H/√d`` and ``v·H/√d`` per head (d = head_dim) and
rotate back after dequantizing, or equivalently rotate q and k after RoPE.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .hadamard import hadamard, has_hadamard

CONFIG_KEY = "llmpress_online_rotations"


@functools.cache
def online_split(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m·2^k, m the smallest order :func:`hadamard` builds for which n/m is a power of two:
    the online transform is a dense m×m product plus Sylvester's 2^k (1536: (12, 128); 576: (36, 16); powers of
    two: (1, n)). Raises ValueError when there is none."""
    power = n & -n  # the largest power of two dividing n
    for p in (power >> i for i in range(power.bit_length())):
        if has_hadamard(n // p):
            return n // p, p
    raise ValueError(f"no Hadamard matrix of order {n} is constructed here as (a built order)·2^k")


@functools.cache
def online_hadamard(n: int) -> Tensor:
    """The integer Hadamard matrix of the online transforms: kron(hadamard(m), hadamard(2^k)) for
    (m, 2^k) = :func:`online_split` (n), hadamard(2^k) being Sylvester's. Entries ±1, H·Hᵀ = n·I.

    Not :func:`~llmpress.rotate.hadamard.hadamard` (n) itself: for 1536 that is kron(4, Paley 384), whose dense
    384×384 factor costs as much as the linear it precedes; kron(Paley 12, Sylvester 128) costs a third of it."""
    m, p = online_split(n)
    return torch.kron(hadamard(m), hadamard(p))


MAX_FACTOR = 128  # Sylvester parts above this are applied as several Kronecker factors


@functools.lru_cache(maxsize=64)
def _factors(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """Matrices whose Kronecker product, in order, is :func:`online_hadamard` (n): hadamard(m), then Sylvester
    factors of order at most :data:`MAX_FACTOR` (Sylvester matrices are Kronecker products of smaller ones)."""
    m, p = online_split(n)
    orders = [m] if m > 1 else []
    while p > 1:
        orders.append(min(p, MAX_FACTOR))
        p //= orders[-1]
    with torch.inference_mode(False):  # cached: usable by a later training forward even if first made in inference
        return tuple(hadamard(k).to(dtype=dtype, device=device) for k in orders or [1])


def hadamard_transform(x: Tensor, inverse: bool = False) -> Tensor:
    """``x·H/√n`` over the last dim (n = x.shape[-1], H = :func:`online_hadamard` (n)): the orthonormal Hadamard
    rotation of each row; ``inverse``: ``x·Hᵀ/√n``, which undoes it (H is not symmetric for Paley orders).

    Row viewed as (n₁, …, n_k) along H's Kronecker factors, each axis multiplied by its factor (one GEMM each:
    1536 = 12·128 costs 1536·(12 + 128) multiply-adds per row instead of 1536²). Same dtype and device as
    ``x``; equal to ``x @ online_hadamard(n) / √n`` up to float rounding.
    """
    n = x.shape[-1]
    factors = _factors(n, x.dtype, x.device)
    lead = x.shape[:-1]
    y = x.reshape(-1, *(f.shape[0] for f in factors))
    last = len(factors)
    for axis, factor in enumerate(factors, start=1):
        factor = factor.T if inverse else factor
        y = y @ factor if axis == last else torch.movedim(torch.movedim(y, axis, -1) @ factor, -1, axis)
    return (y * n ** -0.5).reshape(*lead, n)


def absorb_input_hadamard(weight: Tensor) -> Tensor:
    """W·H/√n (H = :func:`online_hadamard` (n)) for an (out, n) weight, in float64: the weight that, fed
    ``x·H/√n``, computes ``x·Wᵀ``."""
    n = weight.shape[1]
    return weight.to(torch.float64) @ online_hadamard(n).to(torch.float64).to(weight.device) / n ** 0.5


class InputHadamard:
    """A forward pre-hook: the module's first input becomes :func:`hadamard_transform` of it."""

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (hadamard_transform(args[0]), *args[1:])


def has_input_hadamard(module: nn.Module) -> bool:
    """Whether ``module`` rotates its input by :class:`InputHadamard`."""
    return any(isinstance(h, InputHadamard) for h in module._forward_pre_hooks.values())


def add_input_hadamard(module: nn.Module) -> None:
    """Make ``module`` rotate its input first (before any other pre-hook, e.g. a statistics hook); idempotent."""
    if not has_input_hadamard(module):
        module.register_forward_pre_hook(InputHadamard(), prepend=True)


def remove_input_hadamard(module: nn.Module) -> bool:
    """Take ``module``'s :class:`InputHadamard` off (a wrapper around it rotates the input instead); returns
    whether it had one."""
    keys = [key for key, hook in module._forward_pre_hooks.items() if isinstance(hook, InputHadamard)]
    for key in keys:
        del module._forward_pre_hooks[key]
    return bool(keys)


def replacing(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new``, about to take ``old``'s place in the model, with ``old``'s online Hadamard on its input when it
    had one (a stage that swaps a rotated linear for its quantized layer keeps the transform)."""
    if has_input_hadamard(old):
        add_input_hadamard(new)
    return new


def online_record(config) -> dict:
    """The online transforms a model config asks for: ``{"input_hadamard": [...], "kv_hadamard": bool}`` ({}: none).

    ``config`` is a transformers config or its dict (``config.json``)."""
    entry = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    return dict(entry) if isinstance(entry, dict) else {}


def kv_hadamard(config) -> bool:
    """Whether the model asks for its keys and values to be Hadamard-rotated where the KV cache is quantized."""
    return bool(online_record(config).get("kv_hadamard"))


def record(model: nn.Module, input_hadamard: list[str], kv: bool) -> None:
    """Write the online transforms into ``model.config`` (saved with it in ``config.json``)."""
    entry = online_record(model.config)
    names = list(dict.fromkeys([*entry.get("input_hadamard", []), *input_hadamard]))
    setattr(model.config, CONFIG_KEY, {"input_hadamard": names, "kv_hadamard": bool(kv or entry.get("kv_hadamard"))})


def install(model: nn.Module) -> list[str]:
    """Add the :class:`InputHadamard` hooks ``model.config`` records (after loading, or after a stage replaced a
    module); returns the names it was missing from."""
    added = []
    for name in online_record(model.config).get("input_hadamard", []):
        module = model.get_submodule(name)
        if not has_input_hadamard(module):
            add_input_hadamard(module)
            added.append(name)
    return added


def missing(model: nn.Module) -> list[str]:
    """The modules ``model.config`` says rotate their input but whose hook is gone (a stage replaced them)."""
    return [name for name in online_record(model.config).get("input_hadamard", [])
            if not has_input_hadamard(model.get_submodule(name))]
