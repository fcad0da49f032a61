"""The RTN rounder step: no calibration data needed."""

from __future__ import annotations

from typing import ClassVar

import torch

from compensator.quant.spec import QuantizedWeight, QuantParams, QuantSpec
from compensator.rounders.rtn import rtn
from compensator.steps.base import RounderStep, register_step
from compensator.types import LinearStats


@register_step
class RTNStep(RounderStep):
    name: ClassVar[str] = "rtn"
    accepts_params: ClassVar[bool] = True
    fits_kquant: ClassVar[bool] = True
    clip_search: bool = False

    def round(
        self,
        weight: torch.Tensor,
        stats: LinearStats | None,
        spec: QuantSpec,
        params: QuantParams | None = None,
    ) -> QuantizedWeight:
        return rtn(weight, spec, clip_search=self.clip_search, params=params)
