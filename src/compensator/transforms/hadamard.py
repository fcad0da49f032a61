"""Orthogonal matrices for rotations: Hadamard where one is known, random orthogonal otherwise.

A Hadamard matrix of order n exists only for n = 1, 2 or a multiple of 4, and none is known
by a single formula for every such n. We build n = K * 2^m as a Kronecker product of a
Paley matrix of order K (K - 1 a prime = 3 mod 4, or K / 2 - 1 a prime = 1 mod 4) and
Sylvester's matrix of order 2^m (scipy's). That covers the widths of the common model
families (576 = 36 x 16, 1536 = 12 x 128, 2048, 4096, 11008 = 172 x 64 ...). The result
stays a pair of factors: applying H = L (x) R to an input costs O(n (a + b)) instead of n^2.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.linalg
import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if r in squares else -1 for r in range(1, q)])
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley(order: int) -> np.ndarray | None:
    """A +-1 Hadamard matrix of ``order`` by Paley's construction I or II, else None."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:  # construction I: H = I + S, S skew
        s = np.zeros((order, order), dtype=np.int64)
        s[0, 1:], s[1:, 0] = 1, -1
        s[1:, 1:] = _jacobsthal(q)
        return np.eye(order, dtype=np.int64) + s
    if order % 2 == 0:
        q = order // 2 - 1
        if _is_prime(q) and q % 4 == 1:  # construction II from a symmetric conference matrix
            c = np.zeros((q + 1, q + 1), dtype=np.int64)
            c[0, 1:], c[1:, 0] = 1, 1
            c[1:, 1:] = _jacobsthal(q)
            one = np.array([[1, 1], [1, -1]])
            two = np.array([[1, -1], [-1, -1]])
            return np.kron(c, one) + np.kron(np.eye(q + 1, dtype=np.int64), two)
    return None


@lru_cache(maxsize=64)
def _hadamard_pm1(n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """+-1 factors (K x K, 2^m x 2^m) with the largest power of two that works."""
    m = (n & -n).bit_length() - 1  # largest power of two dividing n
    for p in range(m, -1, -1):
        k = n >> p
        left = np.ones((1, 1), dtype=np.int64) if k == 1 else _paley(k)
        if left is not None:
            return left, scipy.linalg.hadamard(1 << p).astype(np.int64)
    return None


def hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Orthonormal (L, R) with L (x) R a Hadamard matrix of order n divided by sqrt(n);
    None when no construction here reaches n."""
    pm = _hadamard_pm1(n)
    if pm is None:
        return None
    left, right = pm
    return (
        torch.from_numpy(left / np.sqrt(left.shape[0])).float(),
        torch.from_numpy(right / np.sqrt(right.shape[0])).float(),
    )


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal matrix (QR of a Gaussian with the signs of R fixed)."""
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))[None, :]).float()


def random_rotation(n: int, generator: torch.Generator) -> torch.Tensor:
    """Dense n x n orthogonal: a Hadamard matrix with random column signs (QuaRot's
    randomized Hadamard) when one exists for n, else a random orthogonal matrix."""
    factors = hadamard_factors(n)
    if factors is None:
        return random_orthogonal(n, generator)
    left, right = factors
    signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    return torch.kron(left.double(), right.double()).float() * signs[None, :]
