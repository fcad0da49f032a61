"""Learnable weight clipping (OmniQuant LWC): per (row, group) factors sigmoid(gamma) and
sigmoid(beta) shrink the group's max and min before the integer grid is laid on it.

The range rule is exactly ``quant.spec``'s (ranges include 0, scale rounded to the scale
dtype before the zero point is computed), so the parameters :func:`lwc_params` returns after
training are the ones a checkpoint stores and the fake-quantized weight seen in training is
bit-for-bit the dequantized weight of the final model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compensator.learn.ste import cast_ste, round_ste
from compensator.quant.spec import QuantParams, QuantSpec


def group_ranges(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) min and max of ``w`` [rows, cols], both widened to include 0.

    A short last group is padded with zeros, which changes nothing since 0 is in every range.
    """
    rows, cols = w.shape
    gs = cols if spec.group_size is None else spec.group_size
    n = spec.n_groups(cols)
    padded = F.pad(w, (0, n * gs - cols)) if n * gs != cols else w
    grouped = padded.reshape(rows, n, gs)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    return torch.minimum(grouped.amin(-1), zero), torch.maximum(grouped.amax(-1), zero)


def lwc_scale_zero(
    w: torch.Tensor, spec: QuantSpec, gamma: torch.Tensor | None, beta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [rows, groups], differentiable in ``gamma``/``beta`` (and ``w``).

    ``gamma``/``beta`` None means no clipping (plain min/max, as RTN).
    """
    xmin, xmax = group_ranges(w, spec)
    if gamma is not None:
        xmax = torch.sigmoid(gamma) * xmax
    if beta is not None:
        xmin = torch.sigmoid(beta) * xmin
    if spec.symmetric:
        scale = 2 * torch.maximum(xmin.abs(), xmax) / spec.maxq
    else:
        scale = (xmax - xmin) / spec.maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp_min(torch.finfo(spec.torch_scale_dtype).tiny)
    scale = cast_ste(scale, spec.torch_scale_dtype)
    if spec.symmetric:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.clamp(round_ste(-xmin / scale), 0, spec.maxq)
    return scale, zero


def _columns(t: torch.Tensor, spec: QuantSpec, cols: int) -> torch.Tensor:
    return t[:, spec.group_of_columns(cols, t.device)]


def lwc_fake_quantize(
    w: torch.Tensor, spec: QuantSpec, gamma: torch.Tensor | None, beta: torch.Tensor | None
) -> torch.Tensor:
    """Quantize-dequantize ``w`` with clipped ranges; straight-through rounding."""
    scale, zero = lwc_scale_zero(w, spec, gamma, beta)
    s, z = _columns(scale, spec, w.shape[1]), _columns(zero, spec, w.shape[1])
    codes = torch.clamp(round_ste(w / s) + z, 0, spec.maxq)
    return (codes - z) * s


@torch.no_grad()
def lwc_params(
    w: torch.Tensor, spec: QuantSpec, gamma: torch.Tensor | None, beta: torch.Tensor | None
) -> QuantParams:
    """The final per-group parameters (for a rounder) from the learned clipping factors."""
    scale, zero = lwc_scale_zero(w.float(), spec, gamma, beta)
    return QuantParams(scale.float(), zero.float())


@torch.no_grad()
def search_clip_logits(
    w: torch.Tensor,
    spec: QuantSpec,
    *,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    cap: float = 0.999,
) -> torch.Tensor:
    """Logits [rows, groups] of the shrink factor p minimizing each group's sum |w - q(w)|^norm
    over p = 1, 1 - 1/grid, ..., 1 - max_shrink (the GPTQ reference clip search, per group),
    capped at ``cap`` so the logit stays finite. A starting point for LWC when the training
    budget is too small to travel there from sigmoid(4)."""
    w = w.float()
    rows, cols = w.shape
    gs = cols if spec.group_size is None else spec.group_size
    n = spec.n_groups(cols)
    pad = n * gs - cols

    def group_error(p: float) -> torch.Tensor:
        logit = torch.full((rows, n), torch.logit(torch.tensor(min(p, cap))).item())
        err = (lwc_fake_quantize(w, spec, logit, logit) - w).abs().pow(norm)
        err = F.pad(err, (0, pad)) if pad else err
        return err.reshape(rows, n, gs).sum(-1)

    best_p = torch.ones(rows, n)
    best = group_error(1.0)
    for i in range(1, int(max_shrink * grid) + 1):
        p = 1 - i / grid
        err = group_error(p)
        better = err < best
        best = torch.where(better, err, best)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return torch.logit(best_p.clamp(max=cap))
