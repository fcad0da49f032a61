"""The terms GPTAQ and ResComp add to GPTQ's recursion (:mod:`compensator.rounders.gptq`).

GPTAQ (asymmetric calibration): with ``fp_cross`` = D = (X_fp - X) X^T on the same scale as
H, the target becomes W X_fp: quantizing column q also hands ``alpha * W[:, q] *
P[q, q+1:]`` to the later columns.

Compensation-aware error (ResComp): each step also hands ``beta * (W0[:, q] - W[:, q]) *
R[q, q+1:]`` to the later columns, R built from C = H + D (C = H without ``fp_cross``), so
steps aim at the original output rather than at the already-compensated weights. R uses
the unscaled D (``alpha`` scales P only); with the exact form, R is built from H and W0 is
the transformed start W0 (I + alpha D H^-1), since that already carries the D part.

``asymmetric_form="exact"`` replaces the per-column P term by the exact sequential
least-squares optimum for the target W0 X_fp: after any prefix of columns is rounded, the
rest equal argmin ||W_F X_F - (W0 X_fp - Q X_fixed)||. Since GPTQ's OBS recursion is exact
for a fixed target, that is plain GPTQ started from W0 (I + alpha D H^-1). GPTAQ's neuron
decomposition drops the part of the residual carried by the remaining columns themselves;
the exact form keeps it.

``lazy_source`` picks which value of a finished column feeds those two terms in the lazy
block update: its value just before rounding (``current``: the exact column-by-column
algorithm, folded into the recursion, see :class:`FoldedTerms`), that value clamped to the
column's quantization range (``clamped``), or the rounded value (``quantized``, as the
GPTAQ reference code does). Inside a block the pre-rounding value is always used.
"""

from __future__ import annotations

from typing import Literal

import torch

from compensator.quant.spec import QuantizedWeight, QuantParams, QuantSpec, dequantize_codes
from compensator.rounders.gptq import GroupParams, Problem, Terms, solve

LazySource = Literal["current", "clamped", "quantized"]
AsymmetricForm = Literal["neuron", "exact"]


def future_share(cross: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row q of the result is ``cross[q, F] @ inv(H[F, F])`` on F = {q+1, ...}, zero elsewhere.

    ``u`` is the upper Cholesky factor of H^-1 (H^-1 = U^T U, so with L = U^T this is
    ((C L) * upper_mask) L^T). It is the least-squares map that spreads a residual carried by
    input q over the inputs not yet quantized: with ``cross`` = D = (X_fp - X) X^T it is
    GPTAQ's P, with ``cross`` = X_fp X^T it is ResComp's R.
    """
    return torch.triu(cross @ u.T, diagonal=1) @ u


def gptaq(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    *,
    fp_cross: torch.Tensor | None = None,
    alpha: float = 1.0,
    asymmetric_form: AsymmetricForm = "neuron",
    compensation_aware: bool = False,
    beta: float = 1.0,
    lazy_source: LazySource = "current",
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    group_params: GroupParams = "dynamic",
    clip_search: bool = False,
    params: QuantParams | None = None,
) -> QuantizedWeight:
    """GPTQ with the asymmetric and compensation-aware terms above; with neither it is
    :func:`compensator.rounders.gptq.gptq` exactly."""
    problem = Problem.build(w, h, spec, damp, act_order)
    start, terms = terms_for(
        problem, fp_cross, alpha, asymmetric_form, compensation_aware, beta, lazy_source
    )
    return solve(problem, start, terms, block_size, group_params, clip_search, params)


def terms_for(
    problem: Problem,
    fp_cross: torch.Tensor | None,
    alpha: float,
    form: AsymmetricForm,
    compensation_aware: bool,
    beta: float,
    lazy_source: LazySource,
) -> tuple[torch.Tensor, Terms]:
    """The recursion's start weights and its terms."""
    wd, u = problem.w, problem.u
    cross = None
    if fp_cross is not None:
        cross = fp_cross.to(problem.dtype).clone()
        cross[:, problem.dead] = 0
        cross = problem.in_order(cross)
    if cross is not None and form == "exact":
        wd = wd + alpha * ((wd @ cross) @ u.T) @ u  # W0 D H^-1 with H^-1 = U^T U
        cross = None
    share_p = None if cross is None or alpha == 0 else alpha * future_share(cross, u)
    share_r = None
    if compensation_aware and beta != 0:
        share_r = beta * future_share(problem.h if cross is None else problem.h + cross, u)
    if share_p is None and share_r is None:
        return wd, Terms(u)
    if lazy_source == "current":
        folded = FoldedTerms(wd, u, share_p, share_r)
        return folded.start, folded
    w0 = wd.clone() if share_r is not None else None
    return wd, UnfoldedTerms(u, w0, share_p, share_r, lazy_source, problem.spec)


class FoldedTerms(Terms):
    """GPTAQ's P and ResComp's R terms folded into GPTQ's own recursion.

    With the pre-rounding values as lazy source, column q's value when it is rounded is
    linear in the start W0 and the earlier errors e_p:  C = W0 - E U_s + C P_s + (W0 - C) R_s
    (``_s``: strictly upper parts), so C = W0 (I + R_s) T - E U_s T with
    T = (I - P_s + R_s)^-1. That is plain GPTQ started from W0 (I + R_s) T with U_s T as its
    update matrix: the per-column cost of both terms disappears, for one triangular solve
    per layer. Values of columns not yet rounded differ from the unfolded algorithm's in
    between, so group ranges are fitted from the unfolded values, rebuilt from the recorded
    errors and column values.
    """

    def __init__(
        self,
        w0: torch.Tensor,
        u: torch.Tensor,
        share_p: torch.Tensor | None,
        share_r: torch.Tensor | None,
    ) -> None:
        eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
        a = eye.clone()
        start = w0
        if share_p is not None:
            a -= torch.triu(share_p, 1)
        if share_r is not None:
            a += torch.triu(share_r, 1)
            start = w0 + w0 @ torch.triu(share_r, 1)
        t = torch.linalg.solve_triangular(a, eye, upper=True, unitriangular=True)
        super().__init__(torch.triu(u, 1) @ t + torch.diag(torch.diag(u)))
        self.start = start @ t
        self.w0, self.u0, self.share_p, self.share_r = w0, u, share_p, share_r
        self.errors, self.values = torch.zeros_like(w0), torch.zeros_like(w0)

    def after_column(
        self, w1: torch.Tensor, src: torch.Tensor, q: int, i: int, i2: int, col: torch.Tensor,
        deq: torch.Tensor, e: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
    ) -> None:  # fmt: skip
        self.errors[:, q] = e
        self.values[:, q] = col

    def after_columns(self, w1: torch.Tensor, err1: torch.Tensor, i1: int, a: int, b: int) -> None:
        self.errors[:, i1 + a : i1 + b] = err1[:, a:b]
        self.values[:, i1 + a : i1 + b] = w1[:, a:b]  # a rounded column's value is not updated

    def group_values(self, k: int, members: torch.Tensor) -> torch.Tensor:
        """The unfolded algorithm's values of columns ``members`` once columns < k are done."""
        cur = self.w0[:, members] - self.errors[:, :k] @ self.u0[:k, members]
        if self.share_p is not None:
            cur += self.values[:, :k] @ self.share_p[:k, members]
        if self.share_r is not None:
            cur += (self.w0[:, :k] - self.values[:, :k]) @ self.share_r[:k, members]
        return cur


class UnfoldedTerms(Terms):
    """Both terms applied column by column (the clamped / quantized lazy sources)."""

    keeps_source = True
    columnwise = True

    def __init__(
        self,
        u: torch.Tensor,
        w0: torch.Tensor | None,
        share_p: torch.Tensor | None,
        share_r: torch.Tensor | None,
        lazy_source: LazySource,
        spec: QuantSpec,
    ) -> None:
        super().__init__(u)
        self.w0, self.share_p, self.share_r = w0, share_p, share_r
        self.lazy_source, self.spec = lazy_source, spec

    def pending(
        self, err: torch.Tensor, src: torch.Tensor, i1: int, i: int, target: torch.Tensor | slice
    ) -> torch.Tensor:
        upd = super().pending(err, src, i1, i, target)
        if self.share_p is not None:
            upd += src @ self.share_p[i1 : i1 + i, target]
        if self.share_r is not None and self.w0 is not None:
            upd += (self.w0[:, i1 : i1 + i] - src) @ self.share_r[i1 : i1 + i, target]
        return upd

    def after_column(
        self, w1: torch.Tensor, src: torch.Tensor, q: int, i: int, i2: int, col: torch.Tensor,
        deq: torch.Tensor, e: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
    ) -> None:  # fmt: skip
        if self.share_p is not None:
            w1[:, i + 1 :].addr_(col, self.share_p[q, q + 1 : i2])
        if self.share_r is not None and self.w0 is not None:
            w1[:, i + 1 :].addr_(self.w0[:, q] - col, self.share_r[q, q + 1 : i2])
        src[:, i] = self._lazy_value(col, deq, scale, zero)

    def _lazy_value(
        self, col: torch.Tensor, deq: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
    ) -> torch.Tensor:
        if self.lazy_source == "current":
            return col
        if self.lazy_source == "quantized":
            return deq
        lo = dequantize_codes(torch.zeros_like(zero), scale, zero).to(col.dtype)
        hi = dequantize_codes(torch.full_like(zero, self.spec.maxq), scale, zero).to(col.dtype)
        return torch.minimum(torch.maximum(col, lo), hi)
