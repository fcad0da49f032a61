"""The GPTQ rounder step."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from compensator.pipeline.stats import LinearStats
from compensator.quant.spec import QuantizedWeight, QuantSpec
from compensator.rounders.gptq import gptq
from compensator.steps.base import RounderStep, register_step


@register_step
class GPTQStep(RounderStep):
    name: ClassVar[str] = "gptq"
    damp: float = Field(0.01, gt=0, le=1, description="fraction of mean(diag H) added to H")
    block_size: int = Field(128, ge=1)
    act_order: bool = True
    group_params: Literal["dynamic", "static"] = "dynamic"
    clip_search: bool = False

    def stats(self) -> set[str]:
        return {"hessian"}

    def round(
        self, weight: torch.Tensor, stats: LinearStats | None, spec: QuantSpec
    ) -> QuantizedWeight:
        assert stats is not None and stats.hessian is not None
        return gptq(
            weight,
            stats.hessian,
            spec,
            damp=self.damp,
            block_size=self.block_size,
            act_order=self.act_order,
            group_params=self.group_params,
            clip_search=self.clip_search,
        )
