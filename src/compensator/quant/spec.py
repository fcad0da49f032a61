"""Uniform integer weight quantization: the spec, per-group parameters, codes, dequantization.

Groups follow the DESIGN rule: column j belongs to group j // g, so when the input width is
not a multiple of g the last group is shorter. Asymmetric ranges always include 0.
Scales are rounded to ``scale_dtype`` *before* codes are computed, so the dequantized weight
used during calibration is bit-for-bit what a saved checkpoint reproduces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

ScaleDType = Literal["float16", "bfloat16", "float32"]


class QuantSpec(BaseModel):
    """How a weight matrix is quantized: bit width, grouping along the input dim, symmetry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = Field(
        128, description="columns per group; None (or -1) for one group per output channel"
    )
    symmetric: bool = False
    scale_dtype: ScaleDType = "float16"

    @field_validator("group_size", mode="before")
    @classmethod
    def _per_channel(cls, v: int | None) -> int | None:
        if v is None or v == -1 or v == 0:
            return None
        if int(v) < 1:
            raise ValueError("group_size must be a positive integer, or -1 for per-channel")
        return int(v)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)

    def n_groups(self, in_features: int) -> int:
        if self.group_size is None:
            return 1
        return math.ceil(in_features / self.group_size)

    def group_of_columns(
        self, in_features: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """Index of the group of every column (shape [in_features])."""
        cols = torch.arange(in_features, device=device)
        if self.group_size is None:
            return torch.zeros_like(cols)
        return cols // self.group_size

    def label(self) -> str:
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"W{self.bits}{g}{'-sym' if self.symmetric else ''}"


@dataclass
class QuantParams:
    """Per (row, group) scale and integer zero point; shapes [rows, n_groups]."""

    scale: torch.Tensor
    zero: torch.Tensor

    def columns(self, group_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero expanded to one entry per column: shapes [rows, len(group_idx)]."""
        return self.scale[:, group_idx], self.zero[:, group_idx]


def _range_params(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero from a per-row range; the range is widened to contain 0."""
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if spec.symmetric:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / spec.maxq
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        scale = (xmax - xmin) / spec.maxq
        zero = None
    # An all-zero group would give scale 0; any positive scale represents it exactly. A tiny
    # but nonzero range must not underflow to 0 in the scale dtype (0/0 would give NaN).
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp_min(torch.finfo(spec.torch_scale_dtype).tiny)
    scale = scale.to(spec.torch_scale_dtype).to(torch.float32)
    if zero is None:
        zero = torch.clamp(torch.round(-xmin / scale), 0, spec.maxq)
    return scale, zero


def fit_group(
    w: torch.Tensor,
    spec: QuantSpec,
    *,
    clip_search: bool = False,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ([rows]) for one group of columns ``w`` ([rows, cols]).

    With ``clip_search`` the min/max range is shrunk by factors 1, 1-1/grid, ... down to
    ``1-max_shrink`` and each row keeps the factor with the lowest sum |w - q(w)|^norm
    (the MSE clip search of the GPTQ reference code).
    """
    w = w.float()
    xmin = w.min(dim=1).values
    xmax = w.max(dim=1).values
    scale, zero = _range_params(xmin, xmax, spec)
    if not clip_search:
        return scale, zero
    best = _group_error(w, scale, zero, spec, norm)
    for i in range(1, int(max_shrink * grid) + 1):
        p = 1 - i / grid
        s, z = _range_params(p * xmin, p * xmax, spec)
        err = _group_error(w, s, z, spec, norm)
        better = err < best
        if better.any():
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def _group_error(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, norm: float
) -> torch.Tensor:
    s, z = scale[:, None], zero[:, None]
    deq = dequantize_codes(quantize_codes(w, s, z, spec), s, z)
    return (deq - w).abs().pow(norm).sum(dim=1)


def fit_params(w: torch.Tensor, spec: QuantSpec, *, clip_search: bool = False) -> QuantParams:
    """Parameters for every (row, group) of ``w`` ([rows, in_features]) from its current values."""
    rows, cols = w.shape
    n = spec.n_groups(cols)
    gs = cols if spec.group_size is None else spec.group_size
    scale = torch.empty(rows, n, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    for g in range(n):
        scale[:, g], zero[:, g] = fit_group(
            w[:, g * gs : (g + 1) * gs], spec, clip_search=clip_search
        )
    return QuantParams(scale, zero)


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Integer codes in [0, maxq] (as float, same shape as ``w``); scale/zero broadcast."""
    return torch.clamp(torch.round(w / scale) + zero, 0, spec.maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The single formula every path uses to turn codes back into weights."""
    return (codes.float() - zero) * scale


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


@dataclass
class QuantizedWeight:
    """What a rounder returns: integer codes [out, in] with their per-group parameters."""

    codes: torch.Tensor
    params: QuantParams
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.params, self.spec)

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        p = self.params
        return QuantizedWeight(
            self.codes[start:stop],
            QuantParams(p.scale[start:stop], p.zero[start:stop]),
            self.spec,
        )
