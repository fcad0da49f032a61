"""Learnable weight clipping (OmniQuant LWC): per (row, group) factors sigmoid(gamma) and
sigmoid(beta) shrink the group's max and min before the integer grid is laid on it.

The range rule is :func:`compensator.quant.grid.params_from_range` with straight-through
gradients, the one RTN and GPTQ use, so the parameters :func:`lwc_params` returns after
training are the ones a checkpoint stores and the fake-quantized weight seen in training is
bit-for-bit the dequantized weight of the final model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compensator.quant.grid import CLIP_NORM, params_from_range, round_ste, search_shrink
from compensator.quant.spec import QuantParams, QuantSpec


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``w`` [rows, cols] as [rows, groups, group width], a short last group padded with
    zeros (which changes no range, since 0 is in every range)."""
    rows, cols = w.shape
    gs, n = spec.group_width(cols), spec.n_groups(cols)
    padded = F.pad(w, (0, n * gs - cols)) if n * gs != cols else w
    return padded.reshape(rows, n, gs)


def group_ranges(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) min and max of ``w`` [rows, cols], both widened to include 0."""
    grouped = _grouped(w, spec)
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
    return params_from_range(xmin, xmax, spec, ste=True)


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
    w: torch.Tensor, spec: QuantSpec, *, norm: float = CLIP_NORM, cap: float = 0.999
) -> torch.Tensor:
    """Logits [rows, groups] of the shrink factor with the lowest sum |w - q(w)|^norm per group
    (:func:`compensator.quant.grid.search_shrink`, the clip search RTN and GPTQ use), capped
    at ``cap`` so the logit stays finite. A starting point for LWC when the training budget
    is too small to travel there from sigmoid(4)."""
    w = w.float()
    rows, n = w.shape[0], spec.n_groups(w.shape[1])

    def group_error(p: float) -> torch.Tensor:
        logit = torch.full((rows, n), torch.logit(torch.tensor(min(p, cap))).item())
        err = (lwc_fake_quantize(w, spec, logit, logit) - w).abs().pow(norm)
        return _grouped(err, spec).sum(-1)

    return torch.logit(search_shrink(group_error).clamp(max=cap))
