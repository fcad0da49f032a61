"""One block's learning: build the learners from the FP block and its calibration inputs,
train them, fold them into the block, and say what each Linear's rounder must use (the
clipping LWC learned, or SSVQ's trained vector-quantized weight)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from compensator.learn.learners import Fixed, LearnContext, Learner, final_params
from compensator.learn.trainer import TrainResult, TrainSettings, fold, train_block
from compensator.parallel import SOLO, Ranks
from compensator.quant.act import ActSpec
from compensator.quant.spec import QuantSpec
from compensator.quant.vq import VQSpec
from compensator.types import BlockContext

log = logging.getLogger(__name__)

Builder = Callable[[LearnContext], Learner]


def input_stats(
    fp_linear_inputs: list[dict[str, torch.Tensor]], device: torch.device, ranks: Ranks = SOLO
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per Linear input feature: max |x| and mean x^2 (diag(X^T X) / n), over all batches
    (of every rank)."""
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
    if ranks.parallel:  # every rank sees the same Linears (a block trains no experts)
        ranks.max_(list(absmax.values()))
        ranks.sum_(list(sq.values()))
        rows = dict(zip(rows, ranks.sum_numbers(list(rows.values())), strict=True))
    return absmax, {n: s / rows[n] for n, s in sq.items()}


def learn_context(ctx: BlockContext, spec: QuantSpec, vq: VQSpec | None) -> LearnContext:
    absmax, sq = input_stats(ctx.fp_linear_inputs, ctx.device, ctx.ranks)
    return LearnContext(ctx.block, ctx.linears, spec, ctx.layout, absmax, sq, vq)


def learn_block(
    ctx: BlockContext,
    builders: Sequence[tuple[str, Builder]],
    spec: QuantSpec,
    act: ActSpec | None,
    vq: VQSpec | None,
    settings: TrainSettings,
) -> tuple[dict[str, Fixed | None], TrainResult]:
    """Train the learners ``builders`` make (named, in application order) on block
    ``ctx.index``, fold them, and return each Linear's fixed parameters."""
    learn_ctx = learn_context(ctx, spec, vq)
    learners = [build(learn_ctx) for _, build in builders]
    if settings.cross_layer:
        with ctx.next_block() as nxt:
            result = train_block(ctx, learners, spec, act, settings, nxt)
    else:
        result = train_block(ctx, learners, spec, act, settings)
    folded = fold(ctx.block, learners)
    log.info(
        "block %d: learned %s in %.1fs, %d steps, block loss %.3g -> %.3g",
        ctx.index,
        "+".join(name for name, _ in builders),
        result.seconds,
        result.steps,
        result.initial_loss,
        result.final_loss,
    )
    return final_params(learners, folded, list(ctx.linears), spec), result
