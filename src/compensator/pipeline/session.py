"""One quantize call's run of the block pipeline: fingerprinted and resumable."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compensator.errors import RunInterrupted
from compensator.models.adapter import ModelAdapter
from compensator.models.lazy import LazyWeights
from compensator.pipeline.passes import StarvedExperts
from compensator.pipeline.resume import RunState, run_fingerprint
from compensator.pipeline.runner import PipelineReport, run_pipeline
from compensator.recipes.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class PipelineRun:
    """One quantize call's pipeline: its settings, and the run state it resumes from."""

    recipe: Recipe
    device: torch.device
    batch_size: int
    progress: bool
    state: RunState | None
    version: str  # compensator's, part of the fingerprint
    starved_experts: StarvedExperts | None = None  # None: the model has no experts
    weights: LazyWeights | None = None  # a lazily opened model's files

    def pipeline(
        self,
        net: nn.Module,
        adapter: ModelAdapter,
        source: str,
        base_fp: dict[str, Any],
        input_ids: torch.Tensor | None,
        calib_info: dict[str, Any] | None,
    ) -> PipelineReport:
        """The block pipeline, resumable when the run has a state."""
        rec = self.recipe
        if self.state is not None:
            recipe = rec.to_yaml_dict()
            if self.starved_experts is not None:
                recipe["starved_experts"] = self.starved_experts
            fingerprint = run_fingerprint(
                base_fp, recipe, input_ids, calib_info, self.device, self.batch_size, self.version
            )
            self.state.begin(fingerprint, len(adapter.blocks(net)))
        log.info("recipe %s: %s on %s (%s)", rec.name, rec.label(), source, self.device)
        try:
            return run_pipeline(
                net, adapter, rec, input_ids, device=self.device, batch_size=self.batch_size,
                progress=self.progress, state=self.state,
                starved_experts=self.starved_experts or "all-tokens", weights=self.weights,
            )  # fmt: skip
        except KeyboardInterrupt:
            if self.state is None:
                raise
            raise RunInterrupted(self.state.interrupted_message()) from None
