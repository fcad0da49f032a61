"""Uniform integer weight quantization: the spec, per-group parameters, the rounded weight.

Groups follow the DESIGN rule: column j belongs to group j // g, so when the input width is
not a multiple of g the last group is shorter. The grid itself (ranges, codes) is
:mod:`compensator.quant.grid`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compensator.quant.kquant import KTYPES, SUPER, KType

ScaleDType = Literal["float16", "bfloat16", "float32"]
KQuant = Literal["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


class QuantSpec(BaseModel):
    """How a weight matrix is quantized: bit width, grouping along the input dim, symmetry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = Field(
        128, description="columns per group; None (or -1) for one group per output channel"
    )
    symmetric: bool = False
    scale_dtype: ScaleDType = "float16"
    kquant: KQuant | None = Field(
        None,
        description="fit llama.cpp's K-quant grid (256-weight super-blocks); sets the fields above",
    )
    float_min: bool = Field(
        False,
        description="asymmetric groups keep their min as a scale-dtype float instead of an "
        "integer zero point (what GGUF Q4_1/Q5_1 store)",
    )

    @model_validator(mode="before")
    @classmethod
    def _grid_fields(cls, data: Any) -> Any:
        """float_min needs asymmetric groups; a K-quant type fixes bits, group size, symmetry
        and float32 scales (d sc)."""
        if not isinstance(data, dict):
            return data
        if data.get("float_min") and data.get("symmetric"):
            raise ValueError("float_min is for asymmetric groups; symmetric ones have no min")
        if data.get("kquant") is None:
            return data
        if data.get("float_min"):
            raise ValueError("float_min does not combine with kquant, which sets its own mins")
        name = data["kquant"]
        if name not in KTYPES:
            return data  # the Literal check names the valid types
        kt = KTYPES[name]
        implied = {"bits": kt.bits, "group_size": kt.sub, "symmetric": kt.symmetric,
                   "scale_dtype": "float32"}  # fmt: skip
        for key, value in implied.items():
            if data.get(key, value) != value:
                raise ValueError(
                    f"{key}={data[key]!r} contradicts kquant {name}, which implies {key}={value!r}"
                )
        return {**data, **implied}

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
    def ktype(self) -> KType | None:
        return None if self.kquant is None else KTYPES[self.kquant]

    @property
    def float_zero(self) -> bool:
        """Whether zero points are floats: min / scale (float_min), or dmin m / (d sc) for
        the asymmetric K-quants."""
        return self.float_min or (self.kquant is not None and not self.symmetric)

    def fit_groups(self) -> int:
        """Groups fitted together: a K-quant super-block's sub-blocks, else 1."""
        return 1 if self.kquant is None else SUPER // self.group_width(SUPER)

    def for_width(self, in_features: int) -> QuantSpec:
        """The spec rows of ``in_features`` columns get: a K-quant spec where rows are whole
        super-blocks, else llama.cpp's 32-weight fallback type for that K-quant."""
        kt = self.ktype
        if kt is None or in_features % SUPER == 0:
            return self
        bits, symmetric = kt.fallback
        return QuantSpec(bits=bits, group_size=32, symmetric=symmetric, float_min=not symmetric)

    def fallback_note(self, widths: list[int]) -> str | None:
        """What a K-quant spec does on Linears of these input ``widths`` that are not whole
        super-blocks (None: nothing falls back)."""
        kt = self.ktype
        narrow = sorted({w for w in widths if self.for_width(w) is not self})
        if kt is None or not narrow:
            return None
        count = sum(self.for_width(w) is not self for w in widths)
        return (
            f"{self.kquant} needs rows of whole {SUPER}-weight super-blocks: {count} of "
            f"{len(widths)} Linears (inputs {', '.join(map(str, narrow))}) get llama.cpp's "
            f"fallback for it, {kt.fallback_type} ({self.for_width(narrow[0]).label()}), as "
            "llama-quantize gives them"
        )

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
        if self.kquant is not None:
            return self.kquant
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return (
            f"W{self.bits}{g}{'-sym' if self.symmetric else ''}{'-fmin' if self.float_min else ''}"
        )


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
    if spec.float_zero:
        return torch.clamp(torch.round(w / scale + zero), 0, spec.maxq)
    return torch.clamp(torch.round(w / scale) + zero, 0, spec.maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The single formula every path uses to turn codes back into weights."""
    return (codes.float() - zero) * scale
