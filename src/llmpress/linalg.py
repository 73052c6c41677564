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
from collections.abc import Callable, Iterator
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
    _check_hessian(H, W)
    H = H.clone()
    return H, _damp_diagonal_(H.diagonal(), W, damp)


def _check_hessian(H: Tensor, W: Tensor | None) -> None:
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"Hessian must be square (in, in), got {tuple(H.shape)}")
    if W is not None and W.shape[1] != H.shape[0]:
        raise ValueError(f"weight {tuple(W.shape)} does not match Hessian {tuple(H.shape)}")


def _damp_diagonal_(diag: Tensor, W: Tensor | None, damp: float) -> Tensor:
    """``diag`` (a Hessian's diagonal, or a copy of it) with its dead entries set to 1 and λ = damp·mean added, in
    place; W's dead columns zeroed in place. Returns the dead mask."""
    dead = diag == 0
    diag[dead] = 1.0
    if W is not None:
        W[:, dead] = 0
    diag.add_(damp * diag.mean())
    return dead



def damped_hessian(hessian: Tensor, W: Tensor | None, damp: float,
                   act_order: bool = False) -> tuple[Tensor, Tensor | None]:
    """The damped Hessian (:func:`prepare_hessian`, zeroing W's dead columns in place) and, with ``act_order``,
    the permutation by decreasing diagonal, the matrix already in that order (else None).

    A wide Hessian (``REVERSED_MIN`` columns and more) is damped on its diagonal alone and gathered in order in one
    copy: two (in, in) matrices at most, with the caller's (three before: the damped copy, the rows in order, the
    columns in order). Narrower ones take the reference steps, so their results stay bit for bit what they were.
    The values are the same either way. GPTQ, SparseGPT, GPTVQ and SqueezeLLM / GPTQ-LUT all start here.
    """
    if hessian.shape[0] < REVERSED_MIN:
        H, _dead = prepare_hessian(hessian, W, damp)
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
        return (H if perm is None else H[perm][:, perm]), perm
    _check_hessian(hessian, W)
    diag = hessian.diagonal().clone()
    _damp_diagonal_(diag, W, damp)
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    H = hessian.clone() if perm is None else hessian[perm[:, None], perm]
    H.diagonal().copy_(diag if perm is None else diag[perm])
    return H, perm

# Hessians at least this wide are factorised through the reversed matrix (:func:`_reversed_factor`): LAPACK's
# cholesky_inverse (potri) runs mostly on one core, 23 s of the 27 s the three-step route took for an 8192-wide
# down_proj on this 2-core CPU; narrower ones keep the three steps (the default model's widths: its results stay
# bit for bit what they were)
REVERSED_MIN = 2048
TRIANGULAR_BASE = 512  # below this size, a triangular block is inverted by one triangular solve


def inverse_cholesky_upper(H: Tensor, rebuild: Callable[[], Tensor] | None = None) -> Tensor:
    """Upper-triangular U with H⁻¹ = UᵀU.

    H: (in, in) symmetric, already damped (see :func:`prepare_hessian`). If it is
    not positive definite, more damping (``RETRY_DAMPING`` × mean(diag H)) is
    tried, with a warning; if that fails too, raises LlmpressError.
    Below ``REVERSED_MIN`` columns: cholesky → cholesky_inverse → upper cholesky (GPTQ's reference code);
    from there on the same U without forming H⁻¹ (:func:`_reversed_factor`). ``rebuild``: a function that makes
    H again; given it, a wide H is factorised in its own memory (U is then H's storage: no second (in, in)
    matrix, 268 MB for an 8192-wide down_proj) and a retry asks ``rebuild`` for a fresh one.
    """
    if not torch.isfinite(H.sum()):  # one reduction: much cheaper than isfinite(H).all() on 1536²
        raise LlmpressError("the Hessian has NaN or infinite entries: check the calibration data "
                            "and the model's activations for overflow")
    scale = H.diagonal().mean()
    wide = H.shape[0] >= REVERSED_MIN
    in_place = wide and rebuild is not None
    for extra in (0.0, *RETRY_DAMPING):
        if extra and in_place:  # the last try consumed H
            H = rebuild()
        damped = H
        if extra:  # H + extra·scale·I, without an (in, in) identity matrix (268 MB for an 8192-wide layer)
            damped = H if in_place else H.clone()
            damped.diagonal().add_(extra * scale)
        if wide:
            U = _reversed_factor(damped, overwrite=in_place)
        else:
            U = None
            L, info = torch.linalg.cholesky_ex(damped)
            if info.item() == 0:
                inverse = torch.cholesky_inverse(L)
                del L
                U, info = torch.linalg.cholesky_ex(inverse, upper=True)
                del inverse
                U = U if info.item() == 0 else None
        del damped
        if U is not None:
            if extra:
                log.warning("Hessian not positive definite; factorised with extra damping %.2g·mean(diag)", extra)
            return U
    raise LlmpressError("the Hessian is not positive definite even with extra damping: "
                        "increase damp (e.g. damp=0.1) or use more calibration samples")


def _reversed_factor(H: Tensor, overwrite: bool = False) -> Tensor | None:
    """U upper with H⁻¹ = UᵀU, or None when H is not positive definite.

    With J the order-reversing permutation, the Cholesky factor of J·H·J is lower, L = J·R·J for the upper R
    with H = R·Rᵀ; so H⁻¹ = R⁻ᵀR⁻¹ and, by the uniqueness of the Cholesky factor, U = R⁻¹ = J·L⁻¹·J. Costs one
    Cholesky (n³/3) and one blocked triangular inverse (:func:`tril_inverse_`, matrix products) instead of
    two Cholesky factorisations and the inverse. ``overwrite``: work in H's own memory (H is lost, also on
    failure); else on one copy. The factorisation runs on the column-major view of the (symmetric) matrix, where
    LAPACK needs no copy of its own.
    """
    F = _rotate_(H) if overwrite else torch.flip(H, (0, 1))  # J·H·J
    if F.device.type == "cpu" and F.dtype in (torch.float32, torch.float64):
        if not _lapack_factor_inverse_(F.mT):  # F symmetric: F.mT is the same matrix, column-major
            return None
        L = F.mT.tril_()  # LAPACK leaves the upper triangle as it was
    else:
        info = torch.empty((), dtype=torch.int32, device=F.device)
        torch.linalg.cholesky_ex(F.mT, out=(F.mT, info))
        if info.item() != 0:
            return None
        L = F.mT.tril_()
        tril_inverse_(L)
    _rotate_(F)  # F.mT = J·L⁻¹·J = U, so F = Uᵀ
    return _transpose_(F)


def _lapack_factor_inverse_(A: Tensor) -> bool:
    """The lower triangle of the column-major, symmetric positive definite CPU matrix ``A`` becomes L⁻¹ for
    A = L·Lᵀ, in place, through LAPACK ``?potrf`` and ``?trtri`` (scipy's OpenBLAS: for 8192 columns here 1.1 s and
    1.0 s, against 1.7-2.0 s for torch's Cholesky and 2.8 s for :func:`tril_inverse_`); the strict upper triangle
    is left as it was. False, with ``A`` spoilt, when it is not positive definite."""
    from scipy.linalg import lapack

    from .stats import write_back_

    a = A.numpy()
    if not a.flags.f_contiguous:
        raise ValueError("_lapack_factor_inverse_ needs a column-major matrix")
    potrf, trtri = (lapack.spotrf, lapack.strtri) if A.dtype == torch.float32 else (lapack.dpotrf, lapack.dtrtri)
    factor, info = potrf(a, lower=1, overwrite_a=1, clean=0)
    if info != 0:
        return False
    write_back_(a, factor)
    inverse, info = trtri(a, lower=1, overwrite_c=1)
    write_back_(a, inverse)
    return info == 0


def _rotate_(M: Tensor, chunk: int = 1 << 22) -> Tensor:
    """Reverse the order of rows and of columns of the contiguous square ``M`` in place (J·M·J): the flattened
    matrix read backwards, swapped a chunk at a time."""
    v = M.view(-1)
    n = v.numel()
    for a in range(0, n // 2, chunk):
        b = min(a + chunk, n // 2)
        front = v[a:b].clone()
        v[a:b] = v[n - b:n - a].flip(0)
        v[n - b:n - a] = front.flip(0)
    return M


def _transpose_(M: Tensor, block: int = 1024) -> Tensor:
    """Transpose the contiguous square ``M`` in place, a pair of blocks at a time."""
    n = M.shape[0]
    for i in range(0, n, block):
        M[i:i + block, i:i + block] = M[i:i + block, i:i + block].T.clone()
        for j in range(i + block, n, block):
            upper = M[i:i + block, j:j + block].clone()
            M[i:i + block, j:j + block] = M[j:j + block, i:i + block].T
            M[j:j + block, i:i + block] = upper.T
    return M


def tril_inverse_(L: Tensor, base: int = TRIANGULAR_BASE) -> Tensor:
    """Invert the lower-triangular ``L`` (zeros above the diagonal) in place and return it.

    Blocked by halves: for L = [[A, 0], [B, C]], L⁻¹ = [[A⁻¹, 0], [−C⁻¹·B·A⁻¹, C⁻¹]]; blocks of at most ``base``
    rows are inverted by one triangular solve. The off-diagonal blocks are plain matrix products, which use
    every core (LAPACK's trtri/potri mostly run on one here).
    """
    n = L.shape[0]
    if n <= base:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        L.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return L
    k = n // 2
    tril_inverse_(L[:k, :k], base)
    tril_inverse_(L[k:, k:], base)
    T = L[k:, :k] @ L[:k, :k]  # B·A⁻¹
    L[k:, :k] = L[k:, k:] @ T  # C⁻¹·B·A⁻¹
    L[k:, :k].neg_()
    return L


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
