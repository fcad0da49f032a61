"""Uniform integer weight quantization: the spec, per-group parameters, the rounded weight.

Groups follow the DESIGN rule: column j belongs to group j // g, so when the input width is
not a multiple of g the last group is shorter. The grid itself (ranges, codes) is
:mod:`compensator.quant.grid`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

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
        if v is None or v == -1:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"group_size must be a positive number of columns, or -1 for per-channel; got {v!r}"
            )
        return v

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)

    def group_width(self, in_features: int) -> int:
        """Columns per group (the whole row when per-channel); the last group may be shorter."""
        return in_features if self.group_size is None else self.group_size

    def n_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_width(in_features))

    def group_of_columns(
        self, in_features: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """Index of the group of every column (shape [in_features])."""
        return torch.arange(in_features, device=device) // self.group_width(in_features)

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

    @staticmethod
    def stacked(parts: list[QuantParams]) -> QuantParams:
        """The parameters of matrices stacked along their rows."""
        return QuantParams(torch.cat([p.scale for p in parts]), torch.cat([p.zero for p in parts]))


@dataclass
class QuantizedWeight:
    """What a uniform rounder returns: integer codes [out, in] with their group parameters."""

    format: ClassVar[str] = "uniform"  # the runtime layer format it becomes (nn.layers)

    codes: torch.Tensor
    params: QuantParams
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        s, z = self.params.columns(
            self.spec.group_of_columns(self.codes.shape[1], self.codes.device)
        )
        return dequantize_codes(self.codes, s, z)

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        p = self.params
        return QuantizedWeight(
            self.codes[start:stop],
            QuantParams(p.scale[start:stop], p.zero[start:stop]),
            self.spec,
        )


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Integer codes in [0, maxq] (as float, same shape as ``w``); scale/zero broadcast."""
    return torch.clamp(torch.round(w / scale) + zero, 0, spec.maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The single formula every path uses to turn codes back into weights."""
    return (codes.float() - zero) * scale
