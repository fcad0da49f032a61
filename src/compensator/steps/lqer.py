"""The LQER / L2QER corrector step: low-rank reconstruction of the rounding error."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from compensator.correctors.lowrank import l2qer_scale, lqer, resolve_rank
from compensator.steps.base import LowRankCorrector, LowRankInput, register_step
from compensator.types import LinearStats, LowRank


@register_step
class LQERStep(LowRankCorrector):
    """y = x Wq^T + (x A) B with A B the rank-k SVD of the error; ``scale: l2`` weights input
    features by their calibration mean |x| (L2QER), ``none`` is plain LQER."""

    name: ClassVar[str] = "lqer"
    scale: Literal["l2", "none"] = "l2"
    factor_bits: Literal[8, 16] = Field(
        16, description="16: fp16 factors; 8: int8 codes with an fp16 scale per rank component"
    )
    input: Literal["quantized", "raw"] = Field(
        "quantized",
        description="what the factors multiply when activations are quantized: the quantized "
        "input (LQER), or the unquantized one (as LRC does)",
    )

    def lowrank_input(self) -> LowRankInput:
        return self.input

    def stats(self) -> set[str]:
        return {"abs_mean"} if self.scale == "l2" else set()

    def correct(
        self, weight: torch.Tensor, rounded: torch.Tensor, stats: LinearStats | None
    ) -> LowRank | None:
        k = resolve_rank(self.rank, *weight.shape)
        s = None
        if self.scale == "l2":
            assert stats is not None and stats.abs_mean is not None
            s = l2qer_scale(stats.abs_mean)
        lr = lqer(weight, rounded, k, s)
        if lr is None or self.factor_bits == 16:
            return lr
        return lr.quantized(self.factor_bits)
