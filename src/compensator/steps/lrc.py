"""The LRC step: the rounder and a low-rank term on the unquantized input, fitted jointly."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from compensator.correctors.lowrank import RANK_HELP, Rank, resolve_rank
from compensator.correctors.lrc import (
    lowrank_step,
    lrc_objective,
    lrc_target,
    principal_basis,
    relaxed_lowrank,
)
from compensator.quant.spec import QuantizedWeight, QuantSpec
from compensator.steps.base import LowRankCorrector, LowRankInput, RounderStep, register_step
from compensator.types import LinearStats, LowRank


@register_step
class LRCStep(LowRankCorrector):
    """Alternate the recipe's rounder on W* = (W - L) Sxa Saa^-1 (Hessian Saa, the quantized
    activations') with the closed-form rank-k L, starting from the L that is best for a
    real-valued Wq (``init: relaxed``) or from 0; keep the pair with the lowest objective."""

    name: ClassVar[str] = "lrc"
    rounds_itself: ClassVar[bool] = True
    rank: Rank = Field("30%", description=RANK_HELP)
    iterations: int = Field(1, ge=1, le=10, description="(rounder, low-rank) alternations")
    init: Literal["relaxed", "zero"] = Field(
        "relaxed",
        description="first L: the best one for a real-valued Wq (ours), or 0 (plain alternation)",
    )
    damp: float = Field(1e-4, ge=0, le=1, description="fraction of mean(diag) added to Grams")
    asymmetric: bool = Field(
        False, description="aim at the FP model's output (GPTAQ's target) instead of W x"
    )
    alpha: float = Field(0.5, ge=0, le=1, description="target x + alpha (x_fp - x)")
    fp_precision: Literal["float32", "bfloat16"] = Field(
        "bfloat16", description="precision of the FP stream's forward (asymmetric only)"
    )
    split: bool = Field(
        False,
        description="L = U B^T on the input's top-k principal subspace B, which the quantized "
        "path no longer reads: Wq Q(x - B B^T x) (ours)",
    )

    def stats(self) -> set[str]:
        base = {"hessian", "act_hessian", "act_cross"}
        if not self.asymmetric:
            return base
        d = "fp_cross_bf16" if self.fp_precision == "bfloat16" else "fp_cross"
        return base | {d, "fp_act_cross"}

    def needs_fp_stream(self) -> bool:
        return self.asymmetric

    def fp_stream_low_precision(self) -> bool:
        return self.fp_precision == "bfloat16"

    def provides(self) -> set[str]:
        return super().provides() | ({"fp_inputs"} if self.asymmetric else set())

    def lowrank_input(self) -> LowRankInput:
        return "split" if self.split else "raw"

    def splits_input(self) -> bool:
        return self.split

    def input_basis(self, shape: tuple[int, int], hessian: torch.Tensor) -> torch.Tensor | None:
        k = resolve_rank(self.rank, *shape)
        if not self.split or k <= 0:
            return None
        # Rounded as the layer stores its factors, so statistics see the run-time projection.
        return principal_basis(hessian, k).to(torch.float16).float()

    def solve(
        self,
        weight: torch.Tensor,
        stats: LinearStats | None,
        spec: QuantSpec,
        rounder: RounderStep,
    ) -> tuple[QuantizedWeight, LowRank | None]:
        qw, lowrank, _ = self.solve_with_history(weight, stats, spec, rounder)
        return qw, lowrank

    def solve_with_history(
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
        basis = stats.act_basis
        if self.split and k > 0 and (basis is None or basis.shape[1] != k):
            raise ValueError("split LRC needs statistics taken with its rank-k input basis")
        stx = sta = None
        if self.asymmetric:
            assert stats.fp_cross is not None and stats.fp_act_cross is not None
            stx = sxx + self.alpha * stats.fp_cross
            sta = sxa + self.alpha * stats.fp_act_cross
        rounder_stats = LinearStats({"hessian": saa}, stats.tokens)
        dense = None
        if self.init == "relaxed":
            start = relaxed_lowrank(weight, sxx, sxa, saa, k, self.damp, stx, sta, basis)
            dense = None if start is None else start.dense()
        best: tuple[float, QuantizedWeight, LowRank | None] | None = None
        history: list[float] = []
        for _ in range(self.iterations):
            target = lrc_target(weight, dense, sxa, saa, self.damp, sta).to(weight.dtype)
            qw = rounder.round(target, rounder_stats, spec)
            assert isinstance(qw, QuantizedWeight)
            wq = qw.dequantize()
            lowrank = lowrank_step(weight, wq, sxx, sxa, k, self.damp, stx, basis)
            dense = None if lowrank is None else lowrank.dense()
            objective = lrc_objective(weight, wq, dense, sxx, sxa, saa, stx, sta)
            history.append(objective)
            if best is None or objective < best[0]:
                best = (objective, qw, lowrank)
        assert best is not None
        return best[1], best[2], history
