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

Starting point (ours): alternating from L = 0 converges slowly, because the Wq-step ridge-shrinks
W and the L-step then only fits what rounding broke. Where it should end is visible in the
relaxed problem with Wq any real matrix: Wq = (W - L) Sxa Saa^-1 leaves
f = tr((W - L) G (W - L)^T) with G = Sxx - Sxa Saa^-1 Sax, the covariance of the part of x
that a does not predict linearly (activation-rounding noise). Its best rank-k L, [W R]_k R^-1
with G = R R^T, moves W's directions that the noise hurts most into the FP path, so the
alternation starts near where it should end instead of creeping there.

Asymmetric variant (ours, GPTAQ's idea applied to LRC): aim at the FP model's output,
W t with t = x + alpha (x_fp - x), instead of W x. Only the cross terms change:
Stx = E t x^T replaces W's Sxx in M, Sta = E t a^T replaces Sxa in W* = (W Sta - L Sxa) Saa^-1.
The functions take them as optional ``stx`` / ``sta``; without them t = x.

Split input (ours): the quantized path reads the input less its top-k principal subspace,
a = Q(x - B B^T x), and L = U B^T carries that subspace in FP (B: orthonormal, [in, k], the
leading eigenvectors of Sxx). Same parameter count as L = U V^T; one more k x in product at
run time. LLM activations put most of their energy in few directions, and a rotation
spreads outlier features but not that subspace, so the quantized residual has a much
smaller range and per-token rounding noise. The maths above is unchanged (Sxa, Saa are then
statistics of that a); the low-rank step is a regression on the fixed z = B^T x instead of
an Eckart-Young truncation: U = M B (B^T C B)^-1.
"""

from __future__ import annotations

import torch

from compensator.linalg import NotPositiveDefinite, damped_cholesky
from compensator.types import LowRank


def cholesky_damped(gram: torch.Tensor, damp: float = 0.0) -> torch.Tensor:
    """Lower Cholesky factor of gram + lambda I in float64, lambda = damp * mean(diag), raised
    tenfold (from 1e-6 * mean(diag)) until the factorization succeeds."""
    try:
        return damped_cholesky(gram.double(), damp, floor=1e-6, limit=1.0)[0]
    except NotPositiveDefinite:
        raise ValueError("the Gram matrix is not positive semi-definite") from None


def lrc_target(
    weight: torch.Tensor,
    lowrank_dense: torch.Tensor | None,
    sxa: torch.Tensor,
    saa: torch.Tensor,
    damp: float = 0.0,
    sta: torch.Tensor | None = None,
) -> torch.Tensor:
    """W* = (W Sta - L Sxa) Saa^-1 (Sta = Sxa unless given): the weight whose rounding, under
    Hessian Saa, minimizes f."""
    lhs = weight.double() @ (sxa if sta is None else sta).double()
    if lowrank_dense is not None:
        lhs = lhs - lowrank_dense.double() @ sxa.double()
    # Saa is symmetric: solve Saa Z = lhs^T
    return torch.cholesky_solve(lhs.T, cholesky_damped(saa, damp)).T


def _weighted_rank_k(m: torch.Tensor, chol: torch.Tensor, rank: int) -> LowRank:
    """argmin over rank-k L of tr(L C L^T) - 2 tr(L M^T) with C = chol chol^T: L = [M S^-T]_k S^-1
    (Eckart-Young in the C-weighted norm), as factors A [in, k], B [k, out] with L = (A B)^T."""
    z = torch.linalg.solve_triangular(chol, m.T, upper=False).T  # M S^-T
    u, sigma, vh = torch.linalg.svd(z, full_matrices=False)
    k = min(rank, sigma.numel())
    # L = U_k Sigma_k (Vh_k S^-1); A = (Vh_k S^-1)^T = S^-T Vh_k^T
    a = torch.linalg.solve_triangular(chol.T, vh[:k].T, upper=True)
    b = sigma[:k, None] * u[:, :k].T
    return LowRank(a.float(), b.float())


def principal_basis(sxx: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` eigenvectors of Sxx as orthonormal columns [in, rank] (float64): the
    k-dimensional subspace holding the most input energy."""
    if not 0 < rank <= sxx.shape[0]:
        raise ValueError(f"a principal basis needs 0 < rank <= {sxx.shape[0]}, got {rank}")
    _, vecs = torch.linalg.eigh(sxx.double())
    return vecs[:, -rank:].flip(1).contiguous()


def _fixed_basis(m: torch.Tensor, chol: torch.Tensor, basis: torch.Tensor) -> LowRank:
    """argmin over U of tr(L C L^T) - 2 tr(L M^T) with L = U B^T for a fixed basis B:
    U = M B (B^T C B)^-1, as factors A = B, B_factor = U^T."""
    b = basis.double()
    cb = chol.T @ b  # C = chol chol^T, so B^T C B = (chol^T B)^T (chol^T B)
    u = torch.cholesky_solve((m @ b).T, cholesky_damped(cb.T @ cb)).T
    return LowRank(b.float(), u.T.float())


def _fit(m: torch.Tensor, chol: torch.Tensor, rank: int, basis: torch.Tensor | None) -> LowRank:
    return _weighted_rank_k(m, chol, rank) if basis is None else _fixed_basis(m, chol, basis)


def lowrank_step(
    weight: torch.Tensor,
    rounded: torch.Tensor,
    sxx: torch.Tensor,
    sxa: torch.Tensor,
    rank: int,
    damp: float = 0.0,
    stx: torch.Tensor | None = None,
    basis: torch.Tensor | None = None,
) -> LowRank | None:
    """The rank-``rank`` L minimizing f for fixed Wq = ``rounded``, as factors A [in, k],
    B [k, out] with L = (A B)^T (A = ``basis`` when given); None for rank 0."""
    if rank <= 0:
        return None
    w, wq = weight.double(), rounded.double()
    m = w @ (sxx if stx is None else stx).double() - wq @ sxa.double().T  # [out, in]
    return _fit(m, cholesky_damped(sxx, damp), rank, basis)


def relaxed_lowrank(
    weight: torch.Tensor,
    sxx: torch.Tensor,
    sxa: torch.Tensor,
    saa: torch.Tensor,
    rank: int,
    damp: float = 0.0,
    stx: torch.Tensor | None = None,
    sta: torch.Tensor | None = None,
    basis: torch.Tensor | None = None,
) -> LowRank | None:
    """The rank-``rank`` L minimizing min over real Wq of f (the starting point above). With a
    target t the regression is of W t on x, both less what a predicts linearly:
    M = W (Stx - Sta Saa^-1 Sax), Gram G = Sxx - Sxa Saa^-1 Sax. With ``basis``, L = U B^T."""
    if rank <= 0:
        return None
    w, sxx, sxa = weight.double(), sxx.double(), sxa.double()
    predicted = torch.cholesky_solve(sxa.T, cholesky_damped(saa, damp))  # Saa^-1 Sax
    g = sxx - sxa @ predicted
    g = (g + g.T) / 2
    cross = (sxx if stx is None else stx.double()) - (
        sxa if sta is None else sta.double()
    ) @ predicted
    return _fit(w @ cross, cholesky_damped(g, damp), rank, basis)


def lrc_objective(
    weight: torch.Tensor,
    rounded: torch.Tensor,
    lowrank_dense: torch.Tensor | None,
    sxx: torch.Tensor,
    sxa: torch.Tensor,
    saa: torch.Tensor,
    stx: torch.Tensor | None = None,
    sta: torch.Tensor | None = None,
    stt: torch.Tensor | None = None,
) -> float:
    """f(Wq, L) per token from the Gram matrices. With a target t != x and no ``stt`` the
    constant tr(W Stt W^T) is taken with Stx in its place: right up to a constant, which is
    all that comparing (Wq, L) pairs needs."""
    w, wq = weight.double(), rounded.double()
    sxx, sxa, saa = sxx.double(), sxa.double(), saa.double()
    stx = sxx if stx is None else stx.double()
    sta = sxa if sta is None else sta.double()
    stt = stx if stt is None else stt.double()
    f = (w @ stt * w).sum() - 2 * (w @ sta * wq).sum() + (wq @ saa * wq).sum()
    if lowrank_dense is not None:
        low = lowrank_dense.double()
        f = f - 2 * (w @ stx * low).sum() + 2 * (wq @ sxa.T * low).sum() + (low @ sxx * low).sum()
    return float(f)
