"""One block's learning, as the pipeline runs it: build the recipe's learners from the FP
block and its calibration inputs, train them, fold them into the block, and hand the rounder
the clipping each Linear learned."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compensator.learn.learners import Fixed, LearnContext, final_params
from compensator.learn.trainer import BlockData, TrainResult, TrainSettings, fold, train_block
from compensator.models.adapter import ModelAdapter
from compensator.pipeline.streams import Stream, run_block
from compensator.recipes.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class BlockInputs:
    """The streams around block ``index``: quantized and FP inputs, FP outputs, FP inputs of
    each Linear (batches as stored by the pipeline)."""

    q: Stream
    fp: Stream
    fp_out: list[torch.Tensor]
    fp_linear_inputs: list[dict[str, torch.Tensor]]
    next_kwargs: list[dict[str, Any]] | None


def _input_stats(
    fp_linear_inputs: list[dict[str, torch.Tensor]], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per Linear input feature: max |x| and mean x^2 (diag(X^T X) / n), over all batches."""
    absmax: dict[str, torch.Tensor] = {}
    sq: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for batch in fp_linear_inputs:
        for name, x in batch.items():
            flat = x.to(device).float().reshape(-1, x.shape[-1])
            m, s = flat.abs().amax(0), flat.pow(2).sum(0)
            absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)
            sq[name] = s if name not in sq else sq[name] + s
            rows[name] = rows.get(name, 0) + flat.shape[0]
    return absmax, {n: s / rows[n] for n, s in sq.items()}


def learn_block(
    block: nn.Module,
    index: int,
    blocks: nn.ModuleList,
    adapter: ModelAdapter,
    recipe: Recipe,
    inputs: BlockInputs,
    device: torch.device,
    storage: torch.device,
) -> tuple[dict[str, Fixed | None], TrainResult]:
    trainer = recipe.trainer
    linears = adapter.linears(block)
    names = list(linears)
    ctx = LearnContext(
        block,
        linears,
        recipe.scheme.weights,
        adapter.arch.rotation,
        *_input_stats(inputs.fp_linear_inputs, device),
        getattr(recipe.rounder, "vq_spec", None),
    )
    steps = sorted(recipe.learners, key=lambda s: s.order)
    learners = [s.build(ctx) for s in steps]
    settings = TrainSettings(
        epochs=trainer.epochs,
        weight_decay=trainer.weight_decay,
        cross_layer=trainer.cross_layer,
        fp_input_weight=trainer.fp_input_weight,
        seed=trainer.seed + index,
    )
    data = BlockData(
        q_hidden=inputs.q.hidden,
        kwargs=inputs.q.kwargs,
        target=inputs.fp_out,
        fp_hidden=inputs.fp.hidden if trainer.fp_input_weight else None,
    )
    nxt = None
    if trainer.cross_layer and index + 1 < len(blocks) and inputs.next_kwargs is not None:
        nxt = blocks[index + 1].to(device)
        data.next_block = nxt
        data.next_kwargs = inputs.next_kwargs
        data.next_target = run_block(
            nxt, Stream(inputs.fp_out, inputs.next_kwargs), device, storage
        )
    try:
        result = train_block(
            block,
            learners,
            names,
            data,
            recipe.scheme.weights,
            recipe.scheme.activations,
            settings,
            device,
        )
    finally:
        if nxt is not None:
            blocks[index + 1] = nxt.to(storage)
    folded = fold(block, learners)
    log.info(
        "block %d: learned %s in %.1fs, %d steps, block loss %.3g -> %.3g",
        index,
        "+".join(s.name for s in steps),
        result.seconds,
        result.steps,
        result.initial_loss,
        result.final_loss,
    )
    return final_params(learners, folded, names, recipe.scheme.weights), result
