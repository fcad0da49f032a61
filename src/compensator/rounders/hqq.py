"""HQQ-style rounding (after Badri & Shaji, "Half-Quadratic Quantization of Large Machine
Learning Models", 2023), calibration-free, with integer zero points.

HQQ fits each group's grid to the weights under a sparsity-promoting l_p loss (p < 1), so a
few outlier weights do not dictate the grid the way they dictate a min/max range. Splitting
the loss half-quadratically gives an alternation per group:

    codes  Wq = clamp(round(W / s + z), 0, maxq)
    We     = shrink_p(W - (Wq - z) s, beta)      the residual the l_p loss lets go (outliers)
    s, z   = least squares of W - We on the codes: W - We ~ s (Wq - z)
    beta  *= kappa

HQQ keeps z a float; here z is rounded to an integer in [0, maxq] at every step (the format
our layers, compressed-tensors and GGUF store) and s to the spec's scale dtype, and each
group keeps the grid with the lowest squared weight error seen, RTN's min/max grid included,
so the result is never worse than RTN in weight error.
"""

from __future__ import annotations

import torch

from compensator.quant.grid import fit_group, nonzero_scale
from compensator.quant.spec import QuantizedWeight, QuantParams, QuantSpec, quantize_codes


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalized soft-threshold: argmin_e |e|^p + beta/2 (e - x)^2, approximately."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


def _refit(
    target: torch.Tensor, codes: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares s (and integer z unless symmetric) with target ~ s (codes - z), per row."""
    if not spec.symmetric:
        c_mean, t_mean = codes.mean(1, keepdim=True), target.mean(1, keepdim=True)
        var = (codes - c_mean).pow(2).sum(1)
        slope = ((codes - c_mean) * (target - t_mean)).sum(1) / var.clamp_min(1e-30)
        intercept = t_mean[:, 0] - slope * c_mean[:, 0]
        moved = (var > 0) & (slope > 0)
        z = torch.where(moved, torch.round(-intercept / slope.clamp_min(1e-30)), zero)
        zero = z.clamp(0, spec.maxq)
    centred = codes - zero[:, None]
    scale = (target * centred).sum(1) / centred.pow(2).sum(1).clamp_min(1e-30)
    if not spec.symmetric:  # a zero point is a positive scale's
        scale = scale.clamp_min(torch.finfo(spec.torch_scale_dtype).tiny)
    return nonzero_scale(scale, spec).to(spec.torch_scale_dtype).float(), zero


def hqq_group(
    w: torch.Tensor,
    spec: QuantSpec,
    *,
    iterations: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero ([rows]) for one group of columns ``w`` ([rows, cols])."""
    w = w.float()
    scale, zero = fit_group(w, spec)

    def error(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        codes = quantize_codes(w, s[:, None], z[:, None], spec)
        return ((codes - z[:, None]) * s[:, None] - w).pow(2).sum(1)

    best_s, best_z, best = scale, zero, error(scale, zero)
    for _ in range(iterations):
        codes = quantize_codes(w, scale[:, None], zero[:, None], spec)
        residual = shrink_lp(w - (codes - zero[:, None]) * scale[:, None], beta, p)
        scale, zero = _refit(w - residual, codes, zero, spec)
        beta *= kappa
        err = error(scale, zero)
        better = err < best
        best = torch.where(better, err, best)
        best_s, best_z = torch.where(better, scale, best_s), torch.where(better, zero, best_z)
    return best_s, best_z


def hqq(w: torch.Tensor, spec: QuantSpec, **options: float) -> QuantizedWeight:
    """Round ``w`` [out, in] with HQQ-fitted grids per group (``options``: see hqq_group)."""
    rows, cols = w.shape
    gs = spec.group_width(cols)
    scale = torch.empty(rows, spec.n_groups(cols), dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    for g in range(scale.shape[1]):
        scale[:, g], zero[:, g] = hqq_group(w[:, g * gs : (g + 1) * gs], spec, **options)
    params = QuantParams(scale, zero)
    s, z = params.columns(spec.group_of_columns(cols, w.device))
    return QuantizedWeight(quantize_codes(w.float(), s, z, spec), params, spec)
