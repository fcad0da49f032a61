"""Small linear-algebra helpers shared by the maths and the runtime (torch only)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class NotPositiveDefinite(ValueError):
    """A Gram matrix stayed indefinite under the largest damping the caller allows."""


def damped_cholesky(
    gram: torch.Tensor,
    damp: float = 0.0,
    *,
    floor: float = 1e-6,
    limit: float = 1.0,
    then: Callable[[torch.Tensor, torch.Tensor], T | None] | None = None,
) -> tuple[T | torch.Tensor, float]:
    """Lower Cholesky factor of ``gram + lam * mean(diag) * I``, trying lam = ``damp``, then
    max(10 lam, ``floor``), ... up to ``limit``; returns (factor, lam used).

    ``then`` maps a successful factor (and the damped matrix it factors) to the caller's
    result (e.g. the factor of the inverse) or None when that in turn fails, which counts as
    a failure of this lam.
    """
    mean_diag = gram.diagonal().mean().clamp(min=1e-30)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    lam = damp
    while True:
        damped = gram + lam * mean_diag * eye if lam else gram
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            out = chol if then is None else then(chol, damped)
            if out is not None:
                return out, lam
        lam = max(lam * 10, floor)
        if lam > limit:
            raise NotPositiveDefinite(
                f"the Gram matrix is not positive definite even with damping {limit:g}"
            )


def add_gram_upper_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += x^T x`` for ``x`` [tokens, d], computed on the diagonal blocks and above them
    only: the product is symmetric, and column tiles of ~128 skip ~40% of its flops at the
    widths of LLM layers (0.70x / 0.65x the time at d 576 / 1536, 4096 tokens, 2 threads:
    benchmarks/results/gptq-parts.md). Below the diagonal blocks ``acc`` is left as it was; read it through
    :func:`symmetric_from_upper`."""
    d = x.shape[1]
    tiles = max(1, min(12, round(d / 128)))
    edges = [d * i // tiles for i in range(tiles + 1)]
    for a, b in itertools.pairwise(edges):
        acc[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])


def symmetric_from_upper(m: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``m``'s."""
    return torch.triu(m) + torch.triu(m, 1).T


def kron_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x @ (left (x) right) along the last dimension, without forming the Kronecker product."""
    a, b = left.shape[0], right.shape[0]
    shape = x.shape
    xr = x.reshape(*shape[:-1], a, b)
    xr = torch.matmul(xr, right.to(x.dtype))  # mixes within each block of b features
    xr = torch.matmul(left.to(x.dtype).T, xr)  # mixes the a blocks
    return xr.reshape(shape)
