"""Hadamard matrices for the widths models use, and the random orthogonal rotations built from them.

A Hadamard matrix H of order n has entries ±1 and H·Hᵀ = n·I, so H/√n is orthogonal. Orders that are a
power of two come from Sylvester's doubling; model widths often are not (SmolLM2: hidden 576 = 2⁶·9,
MLP 1536 = 2⁹·3), so :func:`hadamard` also uses Paley's constructions from a prime q (order q + 1 when
q ≡ 3 mod 4, order 2(q + 1) when q ≡ 1 mod 4) and Kronecker products of smaller orders: 576 = 8·72
(Paley I, q = 71), 1536 = 4·384 (Paley I, q = 383). QuaRot (arXiv:2404.00456) rotates with
H·D/√n, D a random ±1 diagonal (:func:`random_hadamard`); SpinQuant (arXiv:2405.16406) also uses
random orthogonal matrices (:func:`random_orthogonal`), which exist for every order.

Pure functions: integers or float64 tensors in, tensors out; nothing here knows about models.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % p for p in range(2, int(n ** 0.5) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = χ(j − i) over GF(q), q prime: the Legendre symbol, 0 on the diagonal."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=torch.int64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley1(q: int) -> Tensor:
    """Order q + 1 for a prime q ≡ 3 (mod 4): I + S, S = [[0, 1ᵀ], [−1, Q]] skew-symmetric."""
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = _jacobsthal(q)
    return S + torch.eye(n, dtype=torch.int64)


def _paley2(q: int) -> Tensor:
    """Order 2(q + 1) for a prime q ≡ 1 (mod 4): the symmetric conference matrix C = [[0, 1ᵀ], [1, Q]]
    with each 0 replaced by [[1, −1], [−1, −1]] and each ±1 by ±[[1, 1], [1, −1]]."""
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = _jacobsthal(q)
    A = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    B = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(C, A) + torch.kron(torch.eye(n, dtype=torch.int64), B)


@cache
def _plan(n: int) -> tuple[tuple[str, int], ...] | None:
    """How to build order ``n``: Kronecker factors ("two", 2) / ("paley1", q) / ("paley2", q), None if none found."""
    if n == 1:
        return ()
    if n == 2:
        return (("two", 2),)
    if n % 4:
        return None  # no Hadamard matrix of order > 2 that is not a multiple of 4 exists
    if n & (n - 1) == 0:  # a power of two: Sylvester's doubling
        return (("two", 2),) * (n.bit_length() - 1)
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return (("paley1", n - 1),)
    if _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return (("paley2", n // 2 - 1),)
    for a in [d for d in range(2, int(n ** 0.5) + 1) if n % d == 0]:  # smallest factor first: 2 is Sylvester's step
        left, right = _plan(a), _plan(n // a)
        if left is not None and right is not None:
            return left + right
    return None


_FACTORS = {"two": lambda _: torch.tensor([[1, 1], [1, -1]], dtype=torch.int64), "paley1": _paley1, "paley2": _paley2}


def hadamard(n: int) -> Tensor:
    """An integer (n, n) Hadamard matrix: entries ±1, H·Hᵀ = n·I.

    Raises ValueError when no construction here reaches ``n`` (every order > 2 that is not a multiple of 4,
    and a few multiples of 4 such as 188): use :func:`random_orthogonal` there.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a Hadamard order must be a positive integer, got {n!r}")
    plan = _plan(n)
    if plan is None:
        raise ValueError(f"no Hadamard matrix of order {n} is constructed here (Sylvester, Paley I/II and "
                         "Kronecker products of them)")
    H = torch.ones(1, 1, dtype=torch.int64)
    for kind, q in plan:
        H = torch.kron(H, _FACTORS[kind](q))
    return H


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard` can build order ``n``."""
    return isinstance(n, int) and n >= 1 and _plan(n) is not None


def random_signs(n: int, seed: int) -> Tensor:
    """A float64 vector of n random ±1, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int) -> Tensor:
    """QuaRot's randomized Hadamard rotation: the orthogonal float64 (n, n) matrix D·H/√n, D = diag(±1)."""
    return random_signs(n, seed)[:, None] * hadamard(n).to(torch.float64) / n ** 0.5


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A Haar-random orthogonal float64 (n, n) matrix: Q of the QR factorization of a Gaussian, signs fixed by R."""
    generator = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def rotation(n: int, kind: str, seed: int) -> Tensor:
    """An orthogonal float64 (n, n) matrix: ``kind`` "hadamard" (:func:`random_hadamard`) or "random"."""
    if kind == "hadamard":
        return random_hadamard(n, seed)
    if kind == "random":
        return random_orthogonal(n, seed)
    raise ValueError(f"unknown rotation kind {kind!r}: use hadamard or random")
