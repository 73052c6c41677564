"""Shared second-order math of GPTQ and SparseGPT: damped Hessians and inverse Cholesky factors.

Both methods (Frantar et al., GPTQ arXiv:2210.17323; SparseGPT arXiv:2301.00774)
solve a layer-wise least-squares problem with H = 2/n·XᵀX. They need H to be
invertible (dead input channels are removed, the diagonal is damped) and then
only the rows of the upper Cholesky factor U of H⁻¹ = UᵀU: row i of U is,
up to the factor U_ii, row i of the inverse Hessian of the columns not yet
processed, which is what the column-by-column error feedback uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .errors import LlmpressError

log = logging.getLogger(__name__)

# Extra damping (relative to mean(diag H)) tried, in order, when the Cholesky factorisation fails.
RETRY_DAMPING: tuple[float, ...] = (0.01, 0.1, 1.0)


def prepare_hessian(H: Tensor, W: Tensor | None, damp: float) -> tuple[Tensor, Tensor]:
    """Make H safely invertible; returns (a damped copy of H, dead-column mask).

    H: (in, in) Hessian, 2/n·XᵀX. A dead input channel (H_ii == 0: the input was
    always zero) gets H_ii = 1 and, when W (out, in) is given, its weight column
    is set to zero **in place** (pass your working copy): the channel never
    contributes, so zero is exact and keeps the grid's zero point. Then
    λ = damp·mean(diag H) (dead entries counted as 1, as in the reference
    GPTQ code) is added to the diagonal. The mask is bool (in,).
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"Hessian must be square (in, in), got {tuple(H.shape)}")
    if W is not None and W.shape[1] != H.shape[0]:
        raise ValueError(f"weight {tuple(W.shape)} does not match Hessian {tuple(H.shape)}")
    H = H.clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    if W is not None:
        W[:, dead] = 0
    diag.add_(damp * diag.mean())
    return H, dead


def inverse_cholesky_upper(H: Tensor) -> Tensor:
    """Upper-triangular U with H⁻¹ = UᵀU (cholesky → cholesky_inverse → upper cholesky).

    H: (in, in) symmetric, already damped (see :func:`prepare_hessian`). If it is
    not positive definite, more damping (``RETRY_DAMPING`` × mean(diag H)) is
    tried, with a warning; if that fails too, raises LlmpressError.
    """
    if not torch.isfinite(H.sum()):  # one reduction: much cheaper than isfinite(H).all() on 1536²
        raise LlmpressError("the Hessian has NaN or infinite entries: check the calibration data "
                            "and the model's activations for overflow")
    scale = H.diagonal().mean()
    for extra in (0.0, *RETRY_DAMPING):
        damped = H
        if extra:  # H + extra·scale·I, without an (in, in) identity matrix (268 MB for an 8192-wide layer)
            damped = H.clone()
            damped.diagonal().add_(extra * scale)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0:
                if extra:
                    log.warning("Hessian not positive definite; factorised with extra damping %.2g·mean(diag)", extra)
                return U
    raise LlmpressError("the Hessian is not positive definite even with extra damping: "
                        "increase damp (e.g. damp=0.1) or use more calibration samples")


# weights of at least this many elements are solved on every thread: their column loop's ops are large enough
# (an 8B down_proj row block is 4096 x 128) that the OpenMP regions pay, and the lazy-batch updates are GEMMs
MANY_THREADS_ELEMENTS = 1 << 22


@contextmanager
def single_threaded(elements: int | None = None) -> Iterator[None]:
    """Run torch on one intra-op thread inside the block, restoring the count after; threads by size: a weight of
    ``elements`` ≥ :data:`MANY_THREADS_ELEMENTS` keeps every thread.

    GPTQ/SparseGPT's column loop is thousands of small ops per layer, each
    (above 32k elements) its own OpenMP region; on a busy machine every region
    waits for a descheduled thread. Measured on a 2-core CPU shared with other
    jobs: one SmolLM2 block's seven GPTQ solves took 6–16 s with 2 threads and
    about 2 s with 1 (0.4 s of CPU time). An 8B ``down_proj`` (4096 x 14336) took
    141 s on one core; there the ops are large and the cores pay.
    """
    threads = torch.get_num_threads()
    if threads == 1 or (elements is not None and elements >= MANY_THREADS_ELEMENTS):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
