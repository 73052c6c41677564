"""Truncated-SVD factorizations of one weight matrix: plain SVD, ASVD and SVD-LLM (pure tensor functions).

A linear layer's weight W (m×n) becomes U (m×k) · V (k×n); with k below the
break-even mn/(m+n) it saves parameters and FLOPs with no special kernel.

* :func:`svd_factorize` — Eckart–Young truncation of W itself (minimises ‖W−Ŵ‖_F).
* :func:`asvd_factorize` — ASVD (Yuan et al. 2023, arXiv:2312.05821): scale input
  channel j by S_jj = mean|X_j|^α, truncate W·S, fold S⁻¹ back into V.
* :func:`svd_llm_factorize` — SVD-LLM (Wang et al. 2024, arXiv:2403.07378): whiten
  with the Cholesky factor L of XᵀX (= L Lᵀ), truncate W·L, fold L⁻¹ back into V, so
  that ‖(W−Ŵ)X‖²_F is exactly the sum of the discarded squared singular values of W·L;
  optionally re-solve U by least squares given V.

The singular values are split evenly (√Σ into U and √Σ into V) so that both factors
have similar ranges, which suits quantizing them afterwards. Every function also has a
``*_curve`` twin that returns only the loss curve (singular values, no vectors), used
by the global rank allocation. Computation is in float64; factors come back in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from torch import Tensor

from ..config import Check, check_value
from ..errors import LlmpressError

DAMP_STEPS = (0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1e-1)  # relative to mean(diag(XᵀX)), tried in order


@dataclass
class Factorized:
    """U (m×k) and V (k×n), float32, with W ≈ U @ V.

    curve: float64 (r+1,), r = min(m, n): curve[j] = the method's loss when truncating to
    rank j (curve[0] = the loss of dropping the layer, curve[r] = 0); see each function.
    meta: JSON-able facts (method, rank, shape, damping used).
    """

    U: Tensor
    V: Tensor
    curve: Tensor
    meta: dict = field(default_factory=dict)


def tail_curve(sigma: Tensor, squared: bool = False) -> Tensor:
    """curve[j] = Σ_{i>j} σ_i² for j = 0..len(σ) (exact tail sums, float64); ``squared``: σ² given."""
    sq = sigma.double() if squared else sigma.double() ** 2
    tails = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])
    return torch.cat([tails, tails.new_zeros(1)])


def _check_rank(W: Tensor, rank: int) -> None:
    if W.dim() != 2:
        raise LlmpressError(f"weight must be a 2-D (out, in) matrix, got shape {tuple(W.shape)}")
    limit = Check(ge=1, le=min(W.shape), verdict=f"out of range for a {tuple(W.shape)} weight",
                  advice=f"use 1 to {min(W.shape)}")
    check_value("rank", rank, Annotated[int, limit])


def spectrum(M: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Squared singular values of M (descending, float64) and the matching right (or left) singular vectors.

    Computed from the eigendecomposition of the smaller Gram matrix (MᵀM when M is tall, else
    MMᵀ): several times faster on CPU than an SVD, and the truncation only needs the leading
    singular subspace, which is as accurate this way. Returns (σ², vectors as columns, right),
    ``right`` True when the vectors are M's right singular vectors.
    """
    right = M.shape[0] >= M.shape[1]
    G = M.T @ M if right else M @ M.T
    evals, evecs = torch.linalg.eigh((G + G.T) / 2)
    return evals.flip(0).clamp(min=0), evecs.flip(1), right


def _truncate(M: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_k √Σ_k, √Σ_k Vh_k, σ²) for the rank-k truncation of M (float64), via :func:`spectrum`.

    U_k √Σ_k = M V_k / √σ_k (or, from the left vectors, √Σ_k Vh_k = U_kᵀ M / √σ_k), so that
    U V = M V_k V_kᵀ exactly, whatever the accuracy of the small singular values.
    """
    sq, vecs, right = spectrum(M)
    root = sq[:rank].sqrt().clamp(min=1e-300).sqrt()  # √σ
    P = vecs[:, :rank]
    if right:
        return (M @ P) / root, root[:, None] * P.T, sq
    return P * root, (P.T @ M) / root[:, None], sq


def _result(U: Tensor, V: Tensor, sq: Tensor, meta: dict) -> Factorized:
    return Factorized(U.float().contiguous(), V.float().contiguous(), tail_curve(sq, squared=True), meta)


def svd_factorize(W: Tensor, rank: int) -> Factorized:
    """Plain truncated SVD of W (m×n): Ŵ = U V minimises ‖W−Ŵ‖_F (Eckart–Young).

    curve[j] = Σ_{i>j} σ_i(W)² = ‖W − Ŵ_j‖²_F, the weight-space error of rank j.
    """
    _check_rank(W, rank)
    U, V, sq = _truncate(W.double(), rank)
    return _result(U, V, sq, {"method": "svd", "rank": rank, "shape": list(W.shape)})


def svd_curve(W: Tensor) -> Tensor:
    """The loss curve of :func:`svd_factorize` without factorizing."""
    return tail_curve(spectrum(W.double())[0], squared=True)


def asvd_scale(act_scale: Tensor, alpha: float) -> Tensor:
    """S_jj = (mean|X_j|)^α, floored so that dead channels do not divide by zero."""
    s = act_scale.double().clamp(min=0) ** alpha
    floor = s.max().clamp(min=1e-30) * 1e-6
    return s.clamp(min=float(floor))


def asvd_factorize(W: Tensor, act_scale: Tensor, rank: int, alpha: float = 0.5) -> Factorized:
    """ASVD (Yuan et al. 2023, arXiv:2312.05821, Sec. 3.2): activation-aware truncated SVD.

    W (m×n); act_scale (n,) = mean |X_j| over the calibration tokens of input channel j.
    With S = diag(act_scale^α): W·S ≈ U_k Σ_k Vh_k, then V = √Σ_k Vh_k S⁻¹ (the scaling
    folded back), U = U_k √Σ_k. curve[j] = Σ_{i>j} σ_i(W·S)² = ‖(W−Ŵ_j)·S‖²_F.
    """
    _check_rank(W, rank)
    if act_scale.shape != (W.shape[1],):
        raise LlmpressError(f"act_scale has shape {tuple(act_scale.shape)}: it needs one entry per input "
                            f"({W.shape[1]})")
    s = asvd_scale(act_scale, alpha)
    U, V, sq = _truncate(W.double() * s, rank)
    meta = {"method": "asvd", "rank": rank, "shape": list(W.shape), "alpha": alpha}
    return _result(U, V / s, sq, meta)


def asvd_curve(W: Tensor, act_scale: Tensor, alpha: float = 0.5, XtX: Tensor | None = None) -> Tensor:
    """The loss curve of :func:`asvd_factorize` without factorizing.

    Without ``XtX``: Σ_{i>j} σ_i(W·S)², the scaled weight error. With ``XtX`` (n×n, Σ x xᵀ):
    the exact output error ‖(W−Ŵ_j)X‖²_F of ASVD's truncation, Σ_{i>j} σ_i² v_iᵀ S⁻¹ XtX S⁻¹ v_i
    (u_i orthonormal makes the cross terms vanish), which lets the rank allocation compare
    layers by what their truncation does to the outputs.
    """
    s = asvd_scale(act_scale, alpha)
    sq, vecs, right = spectrum(W.double() * s)
    if XtX is None:
        return tail_curve(sq, squared=True)
    H = XtX.double()
    if right:  # vecs = V: σ_i² v_iᵀ C v_i with C = S⁻¹ H S⁻¹
        C = H / s[:, None] / s[None, :]
        terms = sq * ((C @ vecs) * vecs).sum(0)
    else:  # vecs = U: σ_i² v_iᵀ C v_i = u_iᵀ (W H Wᵀ) u_i
        Wd = W.double()
        terms = (((Wd @ H @ Wd.T) @ vecs) * vecs).sum(0)
    return tail_curve(terms.clamp(min=0), squared=True)


def whitening(XtX: Tensor) -> tuple[Tensor, float]:
    """Lower-triangular L with L Lᵀ = XᵀX + d·mean(diag)·I (float64), and the relative damping d used.

    d is the first of ``DAMP_STEPS`` for which the Cholesky factorization succeeds (0 when
    XᵀX is positive definite).
    """
    H = XtX.double()
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise LlmpressError(f"XtX must be a square (in, in) matrix, got shape {tuple(H.shape)}")
    H = (H + H.T) / 2
    mean_diag = float(H.diagonal().mean().clamp(min=1e-30))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for d in DAMP_STEPS:
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if int(info) == 0:
            return L, d
    raise LlmpressError("XtX is not positive semi-definite even with 10% damping: check the calibration statistics")


def svd_llm_factorize(W: Tensor, XtX: Tensor, rank: int, update_u: bool = False) -> Factorized:
    """SVD-LLM (Wang et al. 2024, arXiv:2403.07378, Sec. 3.1, Alg. 1): truncation-aware whitening.

    W (m×n); XtX (n×n) = Σ_t x_t x_tᵀ over calibration inputs (any positive multiple works:
    the loss curve scales with it). With L Lᵀ = XtX (damped when not positive definite, see
    :func:`whitening`): W·L ≈ U_k Σ_k Vh_k, U = U_k √Σ_k, V = √Σ_k Vh_k L⁻¹.
    curve[j] = Σ_{i>j} σ_i(W·L)² = ‖(W−Ŵ_j) X‖²_F exactly (for the damped XtX when damped).
    ``update_u``: then re-solve U = W XtX Vᵀ (V XtX Vᵀ)⁻¹, the least-squares U given V on
    the undamped statistics (the paper's parameter update in its closed form; it changes U
    only where damping was needed, since without damping the truncation is already optimal).
    """
    _check_rank(W, rank)
    if XtX.shape != (W.shape[1], W.shape[1]):
        raise LlmpressError(f"XtX has shape {tuple(XtX.shape)}: it must be (in, in) = {(W.shape[1],) * 2}")
    L, damp = whitening(XtX)
    U, A, sq = _truncate(W.double() @ L, rank)
    V = torch.linalg.solve_triangular(L, A, upper=False, left=False)  # A L⁻¹
    if update_u:
        U = least_squares_u(W, XtX, V)
    meta = {"method": "svd-llm", "rank": rank, "shape": list(W.shape), "damp": damp, "update_u": update_u}
    return _result(U, V, sq, meta)


def svd_llm_curve(W: Tensor, XtX: Tensor) -> tuple[Tensor, float]:
    """The loss curve of :func:`svd_llm_factorize` without factorizing, and the damping used."""
    L, damp = whitening(XtX)
    return tail_curve(spectrum(W.double() @ L)[0], squared=True), damp


def least_squares_u(W: Tensor, XtX: Tensor, V: Tensor) -> Tensor:
    """argmin_U ‖(W − U V) X‖_F = W XtX Vᵀ (V XtX Vᵀ)⁻¹ (float64); W (m×n), XtX (n×n), V (k×n)."""
    H, Vd = XtX.double(), V.double()
    G = Vd @ H @ Vd.T
    rhs = W.double() @ H @ Vd.T
    G = (G + G.T) / 2
    ridge = 1e-12 * float(G.diagonal().mean().clamp(min=1e-30))
    G = G + ridge * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G, rhs.T).T
