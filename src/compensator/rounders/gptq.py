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

This module is the core recursion; the asymmetric (GPTAQ) and compensation-aware (ResComp)
terms are :mod:`compensator.rounders.gptaq`, which hands the core a :class:`Terms` object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from compensator.kernels import gptq_columns
from compensator.linalg import NotPositiveDefinite, damped_cholesky
from compensator.quant.grid import fit_group, fit_params, fit_superblock
from compensator.quant.spec import (
    QuantizedWeight,
    QuantParams,
    QuantSpec,
    dequantize_codes,
    quantize_codes,
)

log = logging.getLogger(__name__)

GroupParams = Literal["dynamic", "static"]


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


def _inverse_of_flipped(chol: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor | None:
    """From L = chol(J H J) (J reverses the order), the upper U with H^-1 = U^T U: H = V V^T
    with V = J L J upper triangular, so H^-1 = V^-T V^-1 and U = V^-1. One factorization and
    one triangular inverse, instead of a factorization, an inverse and a second
    factorization (0.65-0.7x the time at widths 576-1536, the probe below included, and as
    accurate: benchmarks/results/gptq-parts.md).

    Where H is beyond the dtype (condition ~1e8 in float32) the factorization can still
    succeed while U^T U is far from H^-1; the former second factorization failed there and
    asked for damping. So does a probe: U^T U H z must come back to z (three products with a
    vector; a fixed z, so every process decides alike)."""
    v = chol.flip(0, 1)
    eye = torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
    u = torch.linalg.solve_triangular(v, eye, upper=True)
    z = torch.randn(
        v.shape[0], generator=torch.Generator(v.device).manual_seed(0), device=v.device
    ).to(v.dtype)
    hz = (flipped @ z.flip(0)).flip(0)
    back = (u @ hz) @ u  # U^T U H z; a NaN or Inf in U fails the test too
    return u if float((back - z).norm()) <= 0.25 * float(z.norm()) else None


def inverse_cholesky_upper(h: torch.Tensor, damp: float = 0.0) -> torch.Tensor:
    """Upper factor U of H^-1 = U^T U, adding damping until H is positive definite."""
    floor = max(damp, 1e-3)
    try:
        # Damping the reversed matrix's diagonal is damping H's: the same entries.
        u, extra = damped_cholesky(
            h.flip(0, 1), 0.0, floor=floor, limit=floor * 10**6.5, then=_inverse_of_flipped
        )
    except NotPositiveDefinite:
        raise RuntimeError("Hessian is not positive definite even with heavy damping") from None
    if extra:
        log.warning("Hessian not positive definite; used extra damping %.3g", extra)
    return u


@dataclass
class Problem:
    """One layer's GPTQ problem in processing order: weights (dead inputs zeroed), damped
    Hessian, its inverse's upper factor, and how columns map to groups."""

    w: torch.Tensor
    h: torch.Tensor
    u: torch.Tensor
    perm: torch.Tensor | None
    group_idx: torch.Tensor
    dead: torch.Tensor
    spec: QuantSpec
    dtype: torch.dtype = field(default=torch.float32)

    @classmethod
    def build(
        cls, w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float, act_order: bool
    ) -> Problem:
        dtype = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32
        h_raw = h.to(dtype)
        hd, wd = prepare_hessian(h_raw, w.to(dtype), damp)
        group_idx = spec.group_of_columns(wd.shape[1], wd.device)
        # Order by the undamped diagonal: adding the damping constant rounds near-equal
        # float32 entries into ties, and the tie order changed W4 perplexity by ~0.3 on SmolLM2.
        perm = act_order_permutation(h_raw) if act_order else None
        if perm is not None:
            wd, hd, group_idx = wd[:, perm], hd[perm][:, perm], group_idx[perm]
        dead = torch.diag(h_raw) == 0
        return cls(wd, hd, inverse_cholesky_upper(hd, damp), perm, group_idx, dead, spec, dtype)

    def in_order(self, m: torch.Tensor) -> torch.Tensor:
        """A [in, in] statistic permuted into processing order."""
        return m if self.perm is None else m[self.perm][:, self.perm]


class Terms:
    """What the core recursion adds beyond plain GPTQ; this base adds nothing.

    ``src`` is a block's record of finished column values (only kept when ``keeps_source``);
    ``pending`` is the lazy update owed to columns ``target`` by block columns i1 .. i1+i-1.
    """

    keeps_source = False
    # Whether ``after_column`` must run after every column (so the compiled column loop,
    # which calls ``after_columns`` once per run of columns instead, cannot serve).
    columnwise = False

    def __init__(self, u: torch.Tensor) -> None:
        self.u = u

    def pending(
        self, err: torch.Tensor, src: torch.Tensor, i1: int, i: int, target: torch.Tensor | slice
    ) -> torch.Tensor:
        return -err @ self.u[i1 : i1 + i, target]

    def after_column(
        self, w1: torch.Tensor, src: torch.Tensor, q: int, i: int, i2: int, col: torch.Tensor,
        deq: torch.Tensor, e: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
    ) -> None:  # fmt: skip
        """Called after column ``q`` (block offset ``i``) was rounded and its error spread."""

    def after_columns(self, w1: torch.Tensor, err1: torch.Tensor, i1: int, a: int, b: int) -> None:
        """Called after the compiled loop rounded block columns ``a`` .. ``b - 1`` (their
        values in ``w1``, errors in ``err1``); what ``after_column`` does, for a run."""

    def group_values(self, k: int, members: torch.Tensor) -> torch.Tensor | None:
        """The values of a group's columns once columns < k are done, when the terms change
        them (None: the core's own values)."""
        return None


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    group_params: GroupParams = "dynamic",
    clip_search: bool = False,
    params: QuantParams | None = None,
) -> QuantizedWeight:
    """Quantize ``w`` [out, in] given the input Hessian ``h`` = X X^T [in, in] (any positive
    scale). Fixed ``params`` (learned clipping) are used as static group parameters.

    Works in the dtype of ``h`` (float32 in the pipeline, float64 in exactness tests).
    """
    problem = Problem.build(w, h, spec, damp, act_order)
    return solve(
        problem, problem.w, Terms(problem.u), block_size, group_params, clip_search, params
    )


def solve(
    problem: Problem,
    start: torch.Tensor,
    terms: Terms,
    block_size: int,
    group_params: GroupParams,
    clip_search: bool,
    params: QuantParams | None,
) -> QuantizedWeight:
    """The recursion from weights ``start`` (processing order) with update matrix
    ``terms.u``; codes back in the original column order."""
    spec, perm = problem.spec, problem.perm
    wd = start
    rows, cols = wd.shape
    groups = _Groups.start(problem, wd, params, group_params, clip_search)
    codes = torch.zeros(rows, cols, dtype=problem.dtype, device=wd.device)
    kernel = _column_kernel(problem, terms, wd)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wd[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        src1 = torch.zeros_like(w1) if terms.keeps_source else err1[:, :0]
        if kernel is not None:
            _compiled_block(kernel, problem, groups, terms, wd, w1, err1, codes, i1, i2)
        else:
            _python_block(problem, groups, terms, wd, w1, err1, src1, codes, i1, i2)
        if i2 < cols:
            wd[:, i2:] += terms.pending(err1, src1, i1, i2 - i1, slice(i2, cols))
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    scale, zero = groups.scale.float(), groups.zero.float()
    return QuantizedWeight(codes.to(torch.uint8), QuantParams(scale, zero), spec)


def _python_block(
    problem: Problem, groups: _Groups, terms: Terms, wd: torch.Tensor, w1: torch.Tensor,
    err1: torch.Tensor, src1: torch.Tensor, codes: torch.Tensor, i1: int, i2: int,
) -> None:  # fmt: skip
    """Block columns i1 .. i2 - 1 one by one (float64, CUDA, per-column terms)."""
    u1 = terms.u[i1:i2, i1:i2]
    for i in range(i2 - i1):
        q = i1 + i
        g = groups.fit_if_first(q, terms, wd, w1, err1, src1, i1, i, i2)
        col = w1[:, i].clone()
        s, z = groups.scale[:, g], groups.zero[:, g]
        c = quantize_codes(col, s, z, problem.spec)
        codes[:, q] = c
        deq = dequantize_codes(c, s, z).to(problem.dtype)
        e = (col - deq) / u1[i, i]
        # In-place rank-1 updates: these loops are bound by per-op overhead.
        w1[:, i + 1 :].addr_(e, u1[i, i + 1 :], alpha=-1)
        err1[:, i] = e
        terms.after_column(w1, src1, q, i, i2, col, deq, e, s, z)


def _column_kernel(problem: Problem, terms: Terms, wd: torch.Tensor) -> Any | None:
    """The compiled column loop where it serves: float32 on CPU, no per-column terms."""
    if problem.dtype != torch.float32 or wd.device.type != "cpu" or terms.columnwise:
        return None
    return gptq_columns()


def _compiled_block(
    kernel: Any, problem: Problem, groups: _Groups, terms: Terms, wd: torch.Tensor,
    w1: torch.Tensor, err1: torch.Tensor, codes: torch.Tensor, i1: int, i2: int,
) -> None:  # fmt: skip
    """Block columns i1 .. i2 - 1 by the compiled loop, in runs that end where a group is
    still to be fitted (fitted here, from the values the loop left, as the Python loop does)."""
    spec, u1 = problem.spec, terms.u[i1:i2, i1:i2].contiguous()
    i, width = 0, i2 - i1
    while i < width:
        groups.fit_if_first(i1 + i, terms, wd, w1, err1, err1[:, :0], i1, i, i2)
        j = i + 1
        while j < width and groups.fitted[groups.group_list[i1 + j]]:
            j += 1
        kernel.gptq_columns(
            w1, err1, codes, u1, groups.scale.contiguous(), groups.zero.contiguous(),
            groups.group_of, i1, i, j, float(spec.maxq), spec.float_zero,
        )  # fmt: skip
        terms.after_columns(w1, err1, i1, i, j)
        i = j


@dataclass
class _Groups:
    """Each group's scale and zero, fitted up front (static, learned) or when the group's
    first column comes up in the processing order (dynamic)."""

    scale: torch.Tensor
    zero: torch.Tensor
    fitted: list[bool]
    group_list: list[int]
    pos_of: torch.Tensor  # position of every original column in the processing order
    width: int
    spec: QuantSpec
    clip_search: bool
    importance: torch.Tensor  # diag(H) in processing order: K-quant clip search weights
    group_of: torch.Tensor  # the group of each column in processing order (int64)

    @classmethod
    def start(
        cls,
        problem: Problem,
        wd: torch.Tensor,
        params: QuantParams | None,
        group_params: GroupParams,
        clip_search: bool,
    ) -> _Groups:
        rows, cols = wd.shape
        spec, perm, dtype = problem.spec, problem.perm, problem.dtype
        n = spec.n_groups(cols)
        if params is not None or group_params == "static":
            if params is None:
                unperm = wd if perm is None else wd[:, torch.argsort(perm)]
                params = fit_params(unperm, spec, clip_search=clip_search)
            scale, zero, fitted = params.scale.to(dtype), params.zero.to(dtype), [True] * n
        else:
            scale = torch.zeros(rows, n, dtype=dtype, device=wd.device)
            zero, fitted = torch.zeros_like(scale), [False] * n
        pos_of = torch.argsort(perm) if perm is not None else torch.arange(cols, device=wd.device)
        gl = problem.group_idx.tolist()
        return cls(
            scale, zero, fitted, gl, pos_of, spec.group_width(cols), spec, clip_search,
            torch.diagonal(problem.h), problem.group_idx.to(torch.int64).contiguous(),
        )  # fmt: skip

    def fit_if_first(
        self, q: int, terms: Terms, wd: torch.Tensor, w1: torch.Tensor, err1: torch.Tensor,
        src1: torch.Tensor, i1: int, i: int, i2: int,
    ) -> int:  # fmt: skip
        """The group of column ``q``, fitted first from its current values if it is not yet."""
        g = self.group_list[q]
        if self.fitted[g]:
            return g
        cols, span = wd.shape[1], self.spec.fit_groups()
        first = g - g % span  # a K-quant super-block's groups are fitted together
        members = self.pos_of[first * self.width : min((first + span) * self.width, cols)]
        current = terms.group_values(q, members)
        if current is None:
            current = torch.empty(wd.shape[0], len(members), dtype=wd.dtype, device=wd.device)
            inside = members < i2
            current[:, inside] = w1[:, members[inside] - i1]
            later = members[~inside]
            if len(later):
                current[:, ~inside] = wd[:, later] + terms.pending(
                    err1[:, :i], src1[:, :i], i1, i, later
                )
        if self.spec.ktype is None:
            s, z = fit_group(current, self.spec, clip_search=self.clip_search)
            self.scale[:, g], self.zero[:, g] = s.to(wd.dtype), z.to(wd.dtype)
        else:
            s, z = fit_superblock(current, self.spec, importance=self.importance[members])
            self.scale[:, first : first + span] = s.to(wd.dtype)
            self.zero[:, first : first + span] = z.to(wd.dtype)
        self.fitted[first : first + span] = [True] * span
        return g
