"""The HQQ rounder step: calibration-free grids fitted under an l_p loss, integer zeros."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from compensator.quant.spec import QuantizedWeight, QuantParams, QuantSpec
from compensator.rounders.hqq import hqq
from compensator.steps.base import RounderStep, register_step
from compensator.types import LinearStats


@register_step
class HQQStep(RounderStep):
    """Half-quadratic fitting of each group's scale and integer zero point (no data)."""

    name: ClassVar[str] = "hqq"
    fits_float_min: ClassVar[bool] = False  # its refit rounds zero points to integers
    iterations: int = Field(20, ge=0, le=1000, description="half-quadratic alternations")
    p: float = Field(0.7, gt=0, lt=1, description="the l_p loss on the weight error")
    beta: float = Field(10.0, gt=0, description="initial weight of the quadratic split")
    kappa: float = Field(1.01, ge=1, description="growth of beta per alternation")

    def round(
        self,
        weight: torch.Tensor,
        stats: LinearStats | None,
        spec: QuantSpec,
        params: QuantParams | None = None,
    ) -> QuantizedWeight:
        return hqq(
            weight, spec, iterations=self.iterations, p=self.p, beta=self.beta, kappa=self.kappa
        )
