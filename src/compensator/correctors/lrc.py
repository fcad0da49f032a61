"""LRC (Scetbon & Hensman 2024): a low-rank term on the *unquantized* input, fitted jointly
with the quantized weight.

The layer computes y = Wq a + L x with a = Q(x) the quantized activations and L = (A B)^T
of rank k. Over calibration inputs the objective is

    f(Wq, L) = E || W x - Wq a - L x ||^2
             = tr((W - L) Sxx (W - L)^T) - 2 tr((W - L) Sxa Wq^T) + tr(Wq Saa Wq^T)

with Sxx = E x x^T, Sxa = E x a^T, Saa = E a a^T. Two alternating steps:
- Wq given L: f = || (W* - Wq) Saa^1/2 ||^2 + const with W* = (W - L) Sxa Saa^-1, so a
  Hessian-aware rounder (GPTQ) run on W* with Hessian Saa;
- L given Wq: reduced-rank regression, L = [M S^-T]_k S^-1 with M = W Sxx - Wq Sax and
  S = chol(Sxx): the best rank-k fit in the Sxx-weighted norm (Eckart-Young).
All in float64; Gram matrices are damped only as much as their Cholesky factor needs.
"""

from __future__ import annotations

import torch

from compensator.correctors.lowrank import LowRank


def cholesky_damped(gram: torch.Tensor, damp: float = 0.0) -> torch.Tensor:
    """Lower Cholesky factor of gram + lambda I, lambda = damp * mean(diag), raised tenfold
    (from 1e-6 * mean(diag)) until the factorization succeeds."""
    g = gram.double()
    mean_diag = g.diagonal().mean().clamp(min=1e-30)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    lam = damp
    while True:
        chol, info = torch.linalg.cholesky_ex(g + lam * mean_diag * eye)
        if int(info) == 0:
            return chol
        lam = max(lam * 10, 1e-6)
        if lam > 1.0:
            raise ValueError("the Gram matrix is not positive semi-definite")


def lrc_target(
    weight: torch.Tensor,
    lowrank_dense: torch.Tensor | None,
    sxa: torch.Tensor,
    saa: torch.Tensor,
    damp: float = 0.0,
) -> torch.Tensor:
    """W* = (W - L) Sxa Saa^-1: the weight whose rounding, under Hessian Saa, minimizes f."""
    w = weight.double()
    if lowrank_dense is not None:
        w = w - lowrank_dense.double()
    rhs = (w @ sxa.double()).T  # Saa is symmetric: solve Saa Z = (W Sxa)^T
    return torch.cholesky_solve(rhs, cholesky_damped(saa, damp)).T


def lowrank_step(
    weight: torch.Tensor,
    rounded: torch.Tensor,
    sxx: torch.Tensor,
    sxa: torch.Tensor,
    rank: int,
    damp: float = 0.0,
) -> LowRank | None:
    """The rank-``rank`` L minimizing f for fixed Wq = ``rounded``, as factors A [in, k],
    B [k, out] with L = (A B)^T; None for rank 0."""
    if rank <= 0:
        return None
    w, wq = weight.double(), rounded.double()
    m = w @ sxx.double() - wq @ sxa.double().T  # [out, in]
    s = cholesky_damped(sxx, damp)  # Sxx = S S^T
    z = torch.linalg.solve_triangular(s, m.T, upper=False).T  # M S^-T
    u, sigma, vh = torch.linalg.svd(z, full_matrices=False)
    k = min(rank, sigma.numel())
    # L = U_k Sigma_k (Vh_k S^-1); A = (Vh_k S^-1)^T = S^-T Vh_k^T
    a = torch.linalg.solve_triangular(s.T, vh[:k].T, upper=True)
    b = sigma[:k, None] * u[:, :k].T
    return LowRank(a.float(), b.float())


def lrc_objective(
    weight: torch.Tensor,
    rounded: torch.Tensor,
    lowrank_dense: torch.Tensor | None,
    sxx: torch.Tensor,
    sxa: torch.Tensor,
    saa: torch.Tensor,
) -> float:
    """f(Wq, L) from the three Gram matrices (per token)."""
    r = weight.double()
    if lowrank_dense is not None:
        r = r - lowrank_dense.double()
    wq = rounded.double()
    return float(
        (r @ sxx.double() * r).sum()
        - 2 * (r @ sxa.double() * wq).sum()
        + (wq @ saa.double() * wq).sum()
    )
