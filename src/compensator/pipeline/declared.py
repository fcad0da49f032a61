"""What a recipe's step declarations ask of the block pipeline, resolved once per run."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compensator.parallel import SOLO, Ranks
from compensator.pipeline.passes import StarvedExperts
from compensator.recipes.recipe import Recipe

log = logging.getLogger(__name__)


def _fast_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class Declared:
    """What the recipe's declarations ask of the engine."""

    stat_names: set[str]
    keep_fp: bool
    fp_low: bool
    needs_data: bool
    batch_size: int
    starved_experts: StarvedExperts = "all-tokens"
    reuse_passes: bool = True
    ranks: Ranks = SOLO
    batch_from: str = "--batch-size"  # who set batch_size (a step may need its own)
    wide_tails: bool = True  # pass reuse may keep a dense MLP's input to down_proj

    @classmethod
    def of(
        cls,
        recipe: Recipe,
        batch_size: int,
        device: torch.device,
        starved_experts: StarvedExperts = "all-tokens",
        reuse_passes: bool = True,
        ranks: Ranks = SOLO,
    ) -> Declared:
        fp_steps = [s for s in recipe.steps if s.needs_fp_stream()]
        fp_low = bool(fp_steps) and all(s.fp_stream_low_precision() for s in fp_steps)
        if fp_low and not _fast_bfloat16(device) and ranks.main:
            log.warning(
                "the recipe computes the FP stream in bfloat16, which this %s has no fast "
                "matrix units for; set fp_precision: float32 in its steps if it is slow",
                device.type,
            )
        asked = [
            (b, f"the recipe's {s.name}: batch_size")
            for s in recipe.steps
            if (b := s.calibration_batch_size()) is not None
        ]
        size, source = (asked or [(batch_size, "--batch-size")])[0]
        return cls(
            recipe.stats(), bool(fp_steps), fp_low, recipe.needs_data(), size, starved_experts,
            reuse_passes, ranks, source,
        )  # fmt: skip
