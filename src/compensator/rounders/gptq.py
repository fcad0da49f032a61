"""GPTQ (Frantar et al., 2022): quantize columns one by one, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian (OBS update).

Minimizes ||W X - Wq X||^2 with H = X X^T. The inverse Hessian is consumed through its
upper Cholesky factor U (H^-1 = U^T U), whose row q restricted to columns >= q is the OBS
update direction after columns < q were fixed; updates are applied lazily per block of
columns so the O(d^2) work happens as matrix products.

Groups stay the natural contiguous ranges of columns even with act-order: a group's scale
and zero are fitted when its first column comes up in the (permuted) order, from the
group's current, already error-compensated values (``group_params="dynamic"``), or from the
original weights before any update (``"static"``, llm-compressor's static act-order).
Either way the checkpoint needs no column permutation index.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from compensator.quant.spec import (
    QuantizedWeight,
    QuantParams,
    QuantSpec,
    dequantize_codes,
    fit_group,
    fit_params,
    quantize_codes,
)

log = logging.getLogger(__name__)


def prepare_hessian(
    h: torch.Tensor, w: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weights of dead inputs (never active in calibration) and damp the diagonal.

    Returns (damped H, weights with dead columns zeroed); neither input is modified.
    """
    h = h.clone()
    w = w.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp * torch.mean(torch.diag(h))
    return h, w


def act_order_permutation(h: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing diag(H) of the undamped Hessian, dead inputs last, ties by index."""
    return torch.argsort(torch.diag(h), descending=True, stable=True)


def inverse_cholesky_upper(h: torch.Tensor, damp: float = 0.0) -> torch.Tensor:
    """Upper factor U of H^-1 = U^T U, adding damping until H is positive definite."""
    diag = torch.arange(h.shape[0], device=h.device)
    extra = 0.0
    for _ in range(8):
        hd = h.clone()
        if extra:
            hd[diag, diag] += extra * torch.mean(torch.diag(h))
        l_factor, info = torch.linalg.cholesky_ex(hd)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(l_factor)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                return u
        extra = max(extra * 10, damp, 1e-3)
        log.warning("Hessian not positive definite; retrying with extra damping %.3g", extra)
    raise RuntimeError("Hessian is not positive definite even with heavy damping")


def future_share(cross: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row q of the result is ``cross[q, F] @ inv(H[F, F])`` on F = {q+1, ...}, zero elsewhere.

    ``u`` is the upper Cholesky factor of H^-1 (H^-1 = U^T U, so with L = U^T this is the
    issue's ((C L) * upper_mask) L^T). It is the least-squares map that spreads a residual
    carried by input q over the inputs not yet quantized: with ``cross`` = D = (X_fp - X) X^T
    it is GPTAQ's P, with ``cross`` = X_fp X^T it is ResComp's R.
    """
    return torch.triu(cross @ u.T, diagonal=1) @ u


LazySource = Literal["current", "clamped", "quantized"]
AsymmetricForm = Literal["neuron", "exact"]


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    group_params: Literal["dynamic", "static"] = "dynamic",
    clip_search: bool = False,
    fp_cross: torch.Tensor | None = None,
    alpha: float = 1.0,
    compensation_aware: bool = False,
    beta: float = 1.0,
    lazy_source: LazySource = "current",
    asymmetric_form: AsymmetricForm = "neuron",
    params: QuantParams | None = None,
) -> QuantizedWeight:
    """Quantize ``w`` [out, in] given the input Hessian ``h`` = X X^T [in, in] (any positive scale).

    GPTAQ (asymmetric calibration): with ``fp_cross`` = D = (X_fp - X) X^T on the same scale
    as ``h``, the target becomes W X_fp: quantizing column q also hands ``alpha * W[:, q] *
    P[q, q+1:]`` to the later columns.

    Compensation-aware error (ResComp): each step also hands ``beta * (W0[:, q] - W[:, q]) *
    R[q, q+1:]`` to the later columns, R built from C = H + D (C = H without ``fp_cross``), so
    steps aim at the original output rather than at the already-compensated weights. R uses
    the unscaled D (``alpha`` scales P only); with the exact form, R is built from H and W0 is
    the transformed start W0 (I + alpha D H^-1), since that already carries the D part.

    ``asymmetric_form="exact"`` replaces the per-column P term by the exact sequential
    least-squares optimum for the target W0 X_fp: after any prefix of columns is rounded, the
    rest equal argmin ||W_F X_F - (W0 X_fp - Q X_fixed)||. Since GPTQ's OBS recursion is
    exact for a fixed target, that is plain GPTQ started from W0 (I + alpha D H^-1). GPTAQ's
    neuron decomposition drops the part of the residual carried by the remaining columns
    themselves; the exact form keeps it.

    ``lazy_source`` picks which value of a finished column feeds those two terms in the
    lazy block update: its value just before rounding (``current``: the exact column-by-column
    algorithm), that value clamped to the column's quantization range (``clamped``), or the
    rounded value (``quantized``, as the GPTAQ reference code does). Inside a block the
    pre-rounding value is always used.

    Fixed ``params`` (learned clipping) are used as static group parameters.

    Works in the dtype of ``h`` (float32 in the pipeline, float64 in exactness tests).
    """
    dtype = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32
    h_raw = h.to(dtype)
    dead = torch.diag(h_raw) == 0
    h, wd = prepare_hessian(h_raw, w.to(dtype), damp)
    rows, cols = wd.shape
    group_idx = spec.group_of_columns(cols, wd.device)
    gs = cols if spec.group_size is None else spec.group_size
    cross = None if fp_cross is None else fp_cross.to(dtype).clone()
    if cross is not None:
        cross[:, dead] = 0

    # Order by the undamped diagonal: adding the damping constant rounds near-equal float32
    # entries into ties, and the tie order changed W4 perplexity by ~0.3 on SmolLM2.
    perm = act_order_permutation(h_raw) if act_order else None
    if perm is not None:
        wd, h = wd[:, perm], h[perm][:, perm]
        group_idx = group_idx[perm]
        cross = None if cross is None else cross[perm][:, perm]
    u = inverse_cholesky_upper(h, damp)
    if cross is not None and asymmetric_form == "exact":
        wd = wd + alpha * ((wd @ cross) @ u.T) @ u  # W0 D H^-1 with H^-1 = U^T U
        cross = None
    share_p = None if cross is None or alpha == 0 else alpha * future_share(cross, u)
    share_r = None
    if compensation_aware and beta != 0:
        c = h if cross is None else h + cross
        share_r = beta * future_share(c, u)
    w0 = wd.clone() if share_r is not None else None
    extras = share_p is not None or share_r is not None
    folded = None
    if extras and lazy_source == "current":
        folded = _FoldedTerms.fold(wd, u, share_p, share_r)
        wd, u = folded.start, folded.update
        share_p = share_r = w0 = None
        extras = False

    n_groups = spec.n_groups(cols)
    if params is not None or group_params == "static":
        if params is None:
            unperm = wd if perm is None else wd[:, torch.argsort(perm)]
            params = fit_params(unperm, spec, clip_search=clip_search)
        scale, zero = params.scale.to(dtype), params.zero.to(dtype)
        fitted = [True] * n_groups
    else:
        scale = torch.zeros(rows, n_groups, dtype=dtype, device=wd.device)
        zero = torch.zeros_like(scale)
        fitted = [False] * n_groups
    # Position of every original column in the processing order, to gather a group's columns.
    pos_of = torch.argsort(perm) if perm is not None else torch.arange(cols, device=wd.device)
    group_list = group_idx.tolist()

    def pending(
        err_done: torch.Tensor,
        src_done: torch.Tensor,
        i1: int,
        i: int,
        target: torch.Tensor | slice,
    ) -> torch.Tensor:
        """The lazy update owed to columns ``target`` by block columns i1 .. i1+i-1."""
        upd = -err_done @ u[i1 : i1 + i, target]
        if share_p is not None:
            upd += src_done @ share_p[i1 : i1 + i, target]
        if share_r is not None and w0 is not None:
            upd += (w0[:, i1 : i1 + i] - src_done) @ share_r[i1 : i1 + i, target]
        return upd

    codes = torch.zeros(rows, cols, dtype=dtype, device=wd.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wd[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        src1 = torch.zeros_like(w1) if extras else err1[:, :0]
        u1 = u[i1:i2, i1:i2]
        # The per-column ops are tiny; a thread pool only adds synchronization (7x slower
        # on a busy 2-core machine). The block-level matmuls below keep all threads.
        with _single_thread(wd.device):
            for i in range(i2 - i1):
                g = group_list[i1 + i]
                if not fitted[g] and folded is not None:
                    members = pos_of[g * gs : min((g + 1) * gs, cols)]
                    current = folded.values_before(i1 + i, members)
                    s, z = fit_group(current, spec, clip_search=clip_search)
                    scale[:, g], zero[:, g] = s.to(dtype), z.to(dtype)
                    fitted[g] = True
                if not fitted[g]:
                    members = pos_of[g * gs : min((g + 1) * gs, cols)]
                    current = torch.empty(rows, len(members), dtype=dtype, device=wd.device)
                    inside = members < i2
                    current[:, inside] = w1[:, members[inside] - i1]
                    later = members[~inside]
                    if len(later):
                        current[:, ~inside] = wd[:, later] + pending(
                            err1[:, :i], src1[:, :i], i1, i, later
                        )
                    s, z = fit_group(current, spec, clip_search=clip_search)
                    scale[:, g], zero[:, g] = s.to(dtype), z.to(dtype)
                    fitted[g] = True
                col = w1[:, i].clone()
                s, z = scale[:, g], zero[:, g]
                q = quantize_codes(col, s, z, spec)
                codes[:, i1 + i] = q
                deq = dequantize_codes(q, s, z).to(dtype)
                e = (col - deq) / u1[i, i]
                # In-place rank-1 updates: these loops are bound by per-op overhead.
                w1[:, i + 1 :].addr_(e, u1[i, i + 1 :], alpha=-1)
                err1[:, i] = e
                if folded is not None:
                    folded.record(i1 + i, e, col)
                if extras:
                    if share_p is not None:
                        w1[:, i + 1 :].addr_(col, share_p[i1 + i, i1 + i + 1 : i2])
                    if share_r is not None and w0 is not None:
                        drift = w0[:, i1 + i] - col
                        w1[:, i + 1 :].addr_(drift, share_r[i1 + i, i1 + i + 1 : i2])
                    src1[:, i] = _lazy_value(col, deq, s, z, spec, lazy_source)
        if i2 < cols:
            wd[:, i2:] += pending(err1, src1, i1, i2 - i1, slice(i2, cols))

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(codes.to(torch.uint8), QuantParams(scale.float(), zero.float()), spec)


@dataclass
class _FoldedTerms:
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

    start: torch.Tensor
    update: torch.Tensor
    w0: torch.Tensor
    u: torch.Tensor
    share_p: torch.Tensor | None
    share_r: torch.Tensor | None
    errors: torch.Tensor
    values: torch.Tensor

    @classmethod
    def fold(
        cls,
        w0: torch.Tensor,
        u: torch.Tensor,
        share_p: torch.Tensor | None,
        share_r: torch.Tensor | None,
    ) -> _FoldedTerms:
        eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
        a = eye.clone()
        start = w0
        if share_p is not None:
            a -= torch.triu(share_p, 1)
        if share_r is not None:
            a += torch.triu(share_r, 1)
            start = w0 + w0 @ torch.triu(share_r, 1)
        t = torch.linalg.solve_triangular(a, eye, upper=True, unitriangular=True)
        update = torch.triu(u, 1) @ t + torch.diag(torch.diag(u))
        return cls(
            start @ t, update, w0, u, share_p, share_r, torch.zeros_like(w0), torch.zeros_like(w0)
        )

    def record(self, q: int, e: torch.Tensor, value: torch.Tensor) -> None:
        self.errors[:, q] = e
        self.values[:, q] = value

    def values_before(self, k: int, members: torch.Tensor) -> torch.Tensor:
        """The unfolded algorithm's values of columns ``members`` once columns < k are done."""
        cur = self.w0[:, members] - self.errors[:, :k] @ self.u[:k, members]
        if self.share_p is not None:
            cur += self.values[:, :k] @ self.share_p[:k, members]
        if self.share_r is not None:
            cur += (self.w0[:, :k] - self.values[:, :k]) @ self.share_r[:k, members]
        return cur


def _lazy_value(
    col: torch.Tensor,
    deq: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
    source: LazySource,
) -> torch.Tensor:
    if source == "current":
        return col
    if source == "quantized":
        return deq
    lo = dequantize_codes(torch.zeros_like(zero), scale, zero).to(col.dtype)
    hi = dequantize_codes(torch.full_like(zero, spec.maxq), scale, zero).to(col.dtype)
    return torch.minimum(torch.maximum(col, lo), hi)


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
