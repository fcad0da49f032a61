"""The integer grid: the range rule, the clip search, codes and dequantization.

One range rule serves every path (RTN, GPTQ's group fitting, LWC's learned clipping):
ranges always include 0 (with ``float_min`` a group's range is its own, as in Q4_1), and
scales are rounded to the spec's ``scale_dtype`` *before* the zero point (an integer, or with
``float_min`` the min in the scale dtype over the scale) and the codes are computed, so the
dequantized weight used during calibration is bit for bit what a saved checkpoint
reproduces. K-quant specs fit a 256-column super-block at a time (:func:`fit_superblock`). ``ste=True`` gives the same values with
straight-through gradients (learned clipping).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compensator.quant.kquant import SUPER, quantize_super, raw_params
from compensator.quant.spec import (
    QuantizedWeight,
    QuantParams,
    QuantSpec,
    dequantize_codes,
    quantize_codes,
)

# The MSE clip search of the GPTQ reference code: shrink factors 1, 1 - 1/GRID, ... down to
# 1 - MAX_SHRINK, error sum |w - q(w)|^NORM.
CLIP_GRID = 100
CLIP_MAX_SHRINK = 0.8
CLIP_NORM = 2.4


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def cast_ste(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and back (what a stored scale becomes), identity gradient."""
    return x + (x.to(dtype).to(x.dtype) - x).detach()


def widened(xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A range widened to contain 0."""
    return torch.minimum(xmin, torch.zeros_like(xmin)), torch.maximum(xmax, torch.zeros_like(xmax))


def nonzero_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``scale`` with its sign kept and its magnitude at least the scale dtype's smallest normal.

    An all-zero group gives scale 0, and any scale represents it exactly (1 here); a tiny
    but nonzero range must not underflow to 0 in the scale dtype (0/0 would give NaN)."""
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    tiny = torch.finfo(spec.torch_scale_dtype).tiny
    return torch.where(
        scale.abs() < tiny, torch.copysign(torch.full_like(scale, tiny), scale), scale
    )


def params_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec, *, ste: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from a range that contains 0 (any range with ``float_min``), any
    shape.

    Symmetric: the end of the range with the larger magnitude lands exactly on the lowest
    level, -2^(bits-1), and the scale takes its sign (llama.cpp's Q4_0 rule). All 2^bits
    levels then serve the range; the mirrored rule of the GPTQ reference code (scale
    2 max|w| / maxq) leaves half a step unused at each end and clips the positive end by
    half a step (measured on Gaussian rows at W4 g32: 18% more squared error)."""
    if spec.symmetric:
        extreme = torch.where(-xmin >= xmax, xmin, xmax)
        scale = -extreme / ((spec.maxq + 1) / 2)
    else:
        scale = (xmax - xmin) / spec.maxq
    scale = nonzero_scale(scale, spec)
    if ste:
        scale = cast_ste(scale, spec.torch_scale_dtype)
    else:
        scale = scale.to(spec.torch_scale_dtype).to(torch.float32)
    if spec.symmetric:
        return scale, torch.full_like(scale, (spec.maxq + 1) / 2)
    if spec.float_min:  # the min itself, in the scale dtype: zero = -xmin / scale
        dtype = spec.torch_scale_dtype
        low = cast_ste(-xmin, dtype) if ste else (-xmin).to(dtype).to(torch.float32)
        return scale, low / scale
    rounded = round_ste(-xmin / scale) if ste else torch.round(-xmin / scale)
    return scale, torch.clamp(rounded, 0, spec.maxq)


def search_shrink(
    error_of: Callable[[float], torch.Tensor],
    *,
    grid: int = CLIP_GRID,
    max_shrink: float = CLIP_MAX_SHRINK,
) -> torch.Tensor:
    """Per entry, the shrink factor p in 1, 1 - 1/grid, ..., 1 - max_shrink with the lowest
    ``error_of(p)`` (the first one on ties)."""
    best = error_of(1.0)
    best_p = torch.ones_like(best)
    for i in range(1, int(max_shrink * grid) + 1):
        p = 1 - i / grid
        err = error_of(p)
        better = err < best
        best = torch.where(better, err, best)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return best_p


def fit_group(
    w: torch.Tensor,
    spec: QuantSpec,
    *,
    clip_search: bool = False,
    grid: int = CLIP_GRID,
    max_shrink: float = CLIP_MAX_SHRINK,
    norm: float = CLIP_NORM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ([rows]) for one group of columns ``w`` ([rows, cols]); with
    ``clip_search`` each row's min/max range is shrunk by the factor :func:`search_shrink`
    finds for it."""
    w = w.float()
    xmin, xmax = w.min(dim=1).values, w.max(dim=1).values
    # A float min needs no level at 0 (Q4_1 has none): its range is the group's own.
    span = (lambda a, b: (a, b)) if spec.float_min else widened
    if not clip_search:
        return params_from_range(*span(xmin, xmax), spec)

    def error_of(p: float) -> torch.Tensor:
        s, z = params_from_range(*span(p * xmin, p * xmax), spec)
        s, z = s[:, None], z[:, None]
        return (dequantize_codes(quantize_codes(w, s, z, spec), s, z) - w).abs().pow(norm).sum(1)

    p = search_shrink(error_of, grid=grid, max_shrink=max_shrink)
    return params_from_range(*span(p * xmin, p * xmax), spec)


def fit_superblock(
    w: torch.Tensor, spec: QuantSpec, *, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ([rows, 256 / sub]) of one K-quant super-block of columns ``w``
    [rows, 256], from its current values. Each sub-block's range is shrunk by the factor
    (:func:`search_shrink`) with the least |error|^2.4 before the super-block rounding, as
    llama.cpp's quantizer searches its scales (always: at 2 and 3 bits min/max ranges cost up
    to 40% more output error), each column's error weighted by its ``importance`` [256] when
    given (GPTQ: diag(H), the input's energy, what llama.cpp's imatrix weighs its fit with)."""
    kt = spec.ktype
    rows, cols = w.shape
    if kt is None or cols != SUPER:
        raise ValueError(
            f"a K-quant super-block is {SUPER} columns of a kquant spec, not {cols} of "
            f"{spec.label()} (QuantSpec.for_width gives the spec for rows of other widths)"
        )
    sub = w.float().reshape(rows, -1, kt.sub)
    xmin, xmax = sub.amin(-1), sub.amax(-1)
    weight = None if importance is None else importance.float().reshape(-1, kt.sub)

    def error_of(p: float) -> torch.Tensor:
        s, m = raw_params(*widened(p * xmin, p * xmax), kt)
        s = nonzero_scale(s, spec)
        z = torch.full_like(s, 2.0 ** (kt.bits - 1)) if kt.symmetric else m / s
        s, z = s[..., None], z[..., None]
        err = (dequantize_codes(quantize_codes(sub, s, z, spec), s, z) - sub).abs().pow(CLIP_NORM)
        return (err if weight is None else err * weight).sum(-1)

    p = search_shrink(error_of)
    return quantize_super(*raw_params(*widened(p * xmin, p * xmax), kt), kt)


def fit_params(w: torch.Tensor, spec: QuantSpec, *, clip_search: bool = False) -> QuantParams:
    """Parameters for every (row, group) of ``w`` ([rows, in_features]) from its current values."""
    rows, cols = w.shape
    gs = spec.group_width(cols)
    scale = torch.empty(rows, spec.n_groups(cols), dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    if spec.ktype is not None:
        span = spec.fit_groups()
        for g in range(0, scale.shape[1], span):
            scale[:, g : g + span], zero[:, g : g + span] = fit_superblock(
                w[:, g * gs : (g + span) * gs], spec
            )
        return QuantParams(scale, zero)
    for g in range(scale.shape[1]):
        scale[:, g], zero[:, g] = fit_group(
            w[:, g * gs : (g + 1) * gs], spec, clip_search=clip_search
        )
    return QuantParams(scale, zero)


def quantize_with_params(w: torch.Tensor, params: QuantParams, spec: QuantSpec) -> torch.Tensor:
    """Codes for a whole matrix with given per-group parameters (shape of ``w``)."""
    s, z = params.columns(spec.group_of_columns(w.shape[1], w.device))
    return quantize_codes(w.float(), s, z, spec)


def dequantize(codes: torch.Tensor, params: QuantParams, spec: QuantSpec) -> torch.Tensor:
    s, z = params.columns(spec.group_of_columns(codes.shape[1], codes.device))
    return dequantize_codes(codes, s, z)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, *, clip_search: bool = False) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of ``w`` with min/max (or clip-searched) ranges."""
    params = fit_params(w, spec, clip_search=clip_search)
    return dequantize(quantize_with_params(w, params, spec), params, spec).to(w.dtype)


def round_to_nearest(w: torch.Tensor, params: QuantParams, spec: QuantSpec) -> QuantizedWeight:
    return QuantizedWeight(quantize_with_params(w.float(), params, spec), params, spec)
