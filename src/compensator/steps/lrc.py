"""The LRC step: the rounder and a low-rank term on the unquantized input, fitted jointly."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, field_validator

from compensator.correctors.lowrank import LowRank, resolve_rank
from compensator.correctors.lrc import lowrank_step, lrc_objective, lrc_target
from compensator.pipeline.stats import LinearStats
from compensator.quant.spec import QuantizedWeight, QuantSpec
from compensator.steps.base import CorrectorStep, RounderStep, register_step


@register_step
class LRCStep(CorrectorStep):
    """Alternate the recipe's rounder on W* = (W - L) Sxa Saa^-1 (Hessian Saa, the quantized
    activations') with the closed-form rank-k L; keep the pair with the lowest objective."""

    name: ClassVar[str] = "lrc"
    joint: ClassVar[bool] = True
    rank: int | float = Field(
        0.3,
        description="rank k, or rho in (0, 1]: k = rho * in * out / (in + out), the factors "
        "then holding rho of the layer's parameter count",
    )
    iterations: int = Field(1, ge=1, le=10, description="(rounder, low-rank) alternations")
    damp: float = Field(1e-4, ge=0, le=1, description="fraction of mean(diag) added to Grams")

    @field_validator("rank")
    @classmethod
    def _valid_rank(cls, v: int | float) -> int | float:
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"a fractional rank (rho) must be in (0, 1], got {v}")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"rank must be >= 0, got {v}")
        return v

    def stats(self) -> set[str]:
        return {"hessian", "act_hessian", "act_cross"}

    def raw_input(self) -> bool:
        return True

    def refine(
        self,
        weight: torch.Tensor,
        stats: LinearStats | None,
        spec: QuantSpec,
        rounder: RounderStep,
    ) -> tuple[QuantizedWeight, LowRank | None]:
        qw, lowrank, _ = self.solve(weight, stats, spec, rounder)
        return qw, lowrank

    def solve(
        self,
        weight: torch.Tensor,
        stats: LinearStats | None,
        spec: QuantSpec,
        rounder: RounderStep,
    ) -> tuple[QuantizedWeight, LowRank | None, list[float]]:
        """Also returns the objective after every iteration (for tests and logs)."""
        assert stats is not None
        sxx, sxa, saa = stats.hessian, stats.act_cross, stats.act_hessian
        assert sxx is not None and sxa is not None and saa is not None
        k = resolve_rank(self.rank, *weight.shape)
        rounder_stats = LinearStats({"hessian": saa}, stats.tokens)
        dense = None
        best: tuple[float, QuantizedWeight, LowRank | None] | None = None
        history: list[float] = []
        for _ in range(self.iterations):
            target = lrc_target(weight, dense, sxa, saa, self.damp).to(weight.dtype)
            qw = rounder.round(target, rounder_stats, spec)
            wq = qw.dequantize()
            lowrank = lowrank_step(weight, wq, sxx, sxa, k, self.damp)
            dense = None if lowrank is None else lowrank.dense()
            objective = lrc_objective(weight, wq, dense, sxx, sxa, saa)
            history.append(objective)
            if best is None or objective < best[0]:
                best = (objective, qw, lowrank)
        assert best is not None
        return best[1], best[2], history
