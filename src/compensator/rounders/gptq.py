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

import logging
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
) -> QuantizedWeight:
    """Quantize ``w`` [out, in] given the input Hessian ``h`` [in, in] (any positive scale).

    Works in the dtype of ``h`` (float32 in the pipeline, float64 in exactness tests).
    """
    dtype = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32
    h, wd = prepare_hessian(h.to(dtype), w.to(dtype), damp)
    rows, cols = wd.shape
    group_idx = spec.group_of_columns(cols, wd.device)
    gs = cols if spec.group_size is None else spec.group_size

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        wd, h = wd[:, perm], h[perm][:, perm]
        group_idx = group_idx[perm]
    u = inverse_cholesky_upper(h, damp)

    n_groups = spec.n_groups(cols)
    if group_params == "static":
        unperm = wd if perm is None else wd[:, torch.argsort(perm)]
        params = fit_params(unperm, spec, clip_search=clip_search)
        scale, zero = params.scale.to(dtype), params.zero.to(dtype)
        fitted = torch.ones(n_groups, dtype=torch.bool)
    else:
        scale = torch.zeros(rows, n_groups, dtype=dtype, device=wd.device)
        zero = torch.zeros_like(scale)
        fitted = torch.zeros(n_groups, dtype=torch.bool)
    # Position of every original column in the processing order, to gather a group's columns.
    pos_of = torch.argsort(perm) if perm is not None else torch.arange(cols, device=wd.device)
    group_list = group_idx.tolist()

    codes = torch.zeros(rows, cols, dtype=dtype, device=wd.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wd[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_list[i1 + i]
            if not fitted[g]:
                members = pos_of[g * gs : min((g + 1) * gs, cols)]
                current = _current_columns(members, wd, w1, err1[:, :i], u, i1, i2, i)
                s, z = fit_group(current, spec, clip_search=clip_search)
                scale[:, g], zero[:, g] = s.to(dtype), z.to(dtype)
                fitted[g] = True
            col = w1[:, i]
            s, z = scale[:, g], zero[:, g]
            q = quantize_codes(col, s, z, spec)
            codes[:, i1 + i] = q
            e = (col - dequantize_codes(q, s, z).to(dtype)) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        wd[:, i2:] -= err1 @ u[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(codes.to(torch.uint8), QuantParams(scale.float(), zero.float()), spec)


def _current_columns(
    members: torch.Tensor,
    wd: torch.Tensor,
    w1: torch.Tensor,
    err_done: torch.Tensor,
    u: torch.Tensor,
    i1: int,
    i2: int,
    i: int,
) -> torch.Tensor:
    """Up-to-date values of not-yet-quantized columns at processing positions ``members``.

    Columns inside the current block live in ``w1``; later ones still lack the lazy update
    from the columns already done in this block, which is applied here to just them.
    """
    out = torch.empty(wd.shape[0], len(members), dtype=wd.dtype, device=wd.device)
    inside = members < i2
    if inside.any():
        out[:, inside] = w1[:, members[inside] - i1]
    if (~inside).any():
        later = members[~inside]
        out[:, ~inside] = wd[:, later] - err_done @ u[i1 : i1 + i, later]
    return out
