"""One quantize call: opening its model (lazily where it can), and its run of the block
pipeline, fingerprinted and resumable."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compensator.errors import CompensatorError, RunInterrupted
from compensator.models.adapter import ModelAdapter
from compensator.models.checks import check_finite_weights, check_not_quantized
from compensator.models.dtypes import dtype_name, load_dtype, parse_dtype
from compensator.models.lazy import LazyWeights, wants_lazy
from compensator.models.loading import LoadedModel, builtin_models, load_model, local_files
from compensator.parallel import SOLO, Ranks
from compensator.pipeline.coverage import split_experts
from compensator.pipeline.passes import StarvedExperts
from compensator.pipeline.resume import RunState, run_fingerprint
from compensator.pipeline.runner import PipelineReport, run_pipeline
from compensator.pipeline.storage import StreamsAt
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
    streams: StreamsAt = "auto"
    offload_dir: str | Path | None = None
    ranks: Ranks = SOLO

    def _begin(self, fingerprint: dict[str, Any], blocks: int) -> None:
        """The main rank checks the state against the run; the others wait for its verdict."""
        assert self.state is not None
        if self.ranks.main:
            self.state.begin(fingerprint, blocks)
        finished = self.ranks.max_numbers([self.state.finished if self.ranks.main else 0])
        if not self.ranks.main:
            self.state.followed(int(finished[0]))

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
            fingerprint["dtype"] = dtype_name(next(net.parameters()).dtype)
            if self.ranks.parallel:
                fingerprint["ranks"] = self.ranks.world
            self._begin(fingerprint, len(adapter.blocks(net)))
        log.info("recipe %s: %s on %s (%s)", rec.name, rec.label(), source, self.device)
        try:
            return run_pipeline(
                net, adapter, rec, input_ids, device=self.device, batch_size=self.batch_size,
                progress=self.progress, state=self.state,
                starved_experts=self.starved_experts or "all-tokens", weights=self.weights,
                streams=self.streams, offload_dir=self.offload_dir, ranks=self.ranks,
            )  # fmt: skip
        except KeyboardInterrupt:
            if self.state is None:
                raise
            raise RunInterrupted(self.state.interrupted_message()) from None


def as_loaded(
    model: str | nn.Module | LoadedModel,
    tokenizer: Any,
    trust_remote_code: bool = False,
    lazy: bool = False,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str | Path):
        return load_model(
            str(model), dtype=load_dtype(dtype, model), trust_remote_code=trust_remote_code,
            lazy=lazy,
        )  # fmt: skip
    if tokenizer is None:
        raise CompensatorError(
            "quantize(model_object) needs tokenizer=...; or pass a model name/path"
        )
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or "<in-memory model>"
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def open_model(
    model: Any,
    tokenizer: Any,
    rec: Recipe,
    trust_remote_code: bool,
    lazy: bool | None,
    inplace: bool,
    has_state: bool,
    dtype: str | torch.dtype | None = None,
) -> tuple[LoadedModel, nn.Module, list[str]]:
    """The loaded model, the network to quantize (a copy of an object unless ``inplace``, in
    ``dtype`` when one is given), and its experts (split into Linears): read lazily when asked
    (``lazy`` True) or by default (None) where its files, ``has_state`` and the recipe allow."""
    asked_lazy = lazy is True
    if isinstance(model, str | Path):
        check_not_quantized(str(model), str(model) in builtin_models())
    lazy = wants_lazy(lazy, local_files(model), bool(rec.transforms), has_state)
    loaded = as_loaded(model, tokenizer, trust_remote_code, lazy, dtype)
    in_memory = not isinstance(model, str | Path)
    net = loaded.model if inplace or not in_memory else copy.deepcopy(loaded.model)
    if in_memory and dtype is not None and (cast := parse_dtype(dtype)) is not None:
        net.to(cast)
    check_work_dtype(net, rec)
    check_finite_weights(net)
    experts = split_experts(net, rec)
    if loaded.weights is not None and (why := loaded.weights.mismatch(net)):
        # Asked for explicitly, the whole load may not fit: say so louder.
        say = log.warning if asked_lazy else log.info
        say("%s: cannot read it block by block (%s); loading it whole", model, why)
        return open_model(
            model, tokenizer, rec, trust_remote_code, False, inplace, has_state, dtype
        )
    return loaded, net, experts


def check_work_dtype(net: nn.Module, rec: Recipe) -> None:
    """Steps that train run their parameters and Adam in the block's dtype: half-precision
    blocks are refused for them (the statistics and rounding of the others upcast)."""
    dtype = next(net.parameters()).dtype
    learned = [s.name for s in rec.steps if s.has_block_hook]
    if dtype != torch.float32 and learned:
        raise CompensatorError(
            f"recipe {rec.name or 'custom'} trains ({', '.join(learned)}), which runs in float32 "
            f"only, and the model is {dtype_name(dtype)}: use --dtype float32"
        )
