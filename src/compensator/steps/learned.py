"""Learned steps (block-wise training, see compensator.learn): the parametrizations
``lwc``, ``let``, ``lsi``, ``sde`` and the ``train`` settings they share.

Every learned parameter is folded into plain weights (and norm scales) before the recipe's
rounder (rtn or gptq) quantizes for real, with LWC's clipping as fixed group parameters, so
the checkpoint is an ordinary quantized one with no extra inference cost.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from compensator.learn.blockwise import learn_block
from compensator.learn.learners import LET, LWC, LearnContext, Learner, SingularValues
from compensator.learn.trainer import TrainSettings
from compensator.quant.scheme import Scheme
from compensator.quant.vq import VQSpec
from compensator.steps.base import LearnerStep, RounderStep, StepConfig, StepKind, register_step
from compensator.types import BlockContext


@register_step
class LWCStep(LearnerStep):
    """OmniQuant learnable weight clipping: per (row, group) sigmoid factors on max and min."""

    name: ClassVar[str] = "lwc"
    role: ClassVar[str] = "quantizer"
    order_in_kind: ClassVar[int] = LWC.order
    lr: float = Field(1e-2, gt=0, description="learning rate of the clipping logits")
    init: float | Literal["search"] = Field(
        4.0,
        description="initial logit (sigmoid(4) = 0.982 of the range kept), or 'search': the "
        "per-group MSE-optimal shrink (for short training budgets)",
    )

    def build(self, ctx: LearnContext) -> Learner:
        return LWC(ctx, self.lr, self.init)


@register_step
class LETStep(LearnerStep):
    """OmniQuant learnable equivalent transformation: channel scales at norm -> q/k/v,
    norm -> gate/up and v -> o (per kv head under grouped-query attention)."""

    name: ClassVar[str] = "let"
    role: ClassVar[str] = "transform"
    order_in_kind: ClassVar[int] = LET.order
    moves_inputs: ClassVar[bool] = True
    lr: float = Field(5e-3, gt=0)
    alpha: float = Field(
        0.5, ge=0, le=1, description="init s = act_absmax^alpha / w_absmax^(1 - alpha)"
    )

    def build(self, ctx: LearnContext) -> Learner:
        return LET(ctx, self.lr, self.alpha)


@register_step
class LSIStep(LearnerStep):
    """Learnable singular-value increments (Gao et al. 2024): W = U diag(s + ds) V^T."""

    name: ClassVar[str] = "lsi"
    role: ClassVar[str] = "weights"
    order_in_kind: ClassVar[int] = SingularValues.order
    lr: float = Field(2e-4, gt=0)
    penalty: float = Field(0.0, ge=0, description="weight of ||M - M0||^2 / ||s||^2")

    def build(self, ctx: LearnContext) -> Learner:
        return SingularValues(ctx, self.lr, k=0, band=0, penalty=self.penalty)


@register_step
class SDEStep(LearnerStep):
    """Singular-value diagonal expansion (CQE+): M = diag(s + ds) + K, K a learnable dense
    k x k block over the largest singular values and/or ``band`` off-diagonals; k = 0 and
    band = 0 is LSI."""

    name: ClassVar[str] = "sde"
    role: ClassVar[str] = "weights"
    order_in_kind: ClassVar[int] = SingularValues.order
    lr: float = Field(2e-4, gt=0)
    k: int = Field(8, ge=0, description="size of the dense block over the top singular values")
    band: int = Field(0, ge=0, description="learnable off-diagonals on each side (banded SDE)")
    penalty: float = Field(0.0, ge=0, description="weight of ||M - M0||^2 / ||s||^2")

    def build(self, ctx: LearnContext) -> Learner:
        return SingularValues(ctx, self.lr, k=self.k, band=self.band, penalty=self.penalty)


@register_step
class TrainStep(StepConfig):
    """How the learned steps are trained, block by block (AdamW, straight-through rounding):
    its per-block hook builds the recipe's learners, trains them against the FP block, folds
    them into the block and hands the rounder what they fixed."""

    name: ClassVar[str] = "train"
    kind: ClassVar[StepKind] = "trainer"
    has_block_hook: ClassVar[bool] = True
    epochs: int = Field(10, ge=0, description="passes over the calibration batches per block")
    batch_size: int = Field(2, ge=1, description="calibration windows per optimizer step")
    weight_decay: float = Field(0.0, ge=0)
    cross_layer: float = Field(
        0.0,
        ge=0,
        description="weight of the error after the next FP block (cross-layer learning); 0: off",
    )
    fp_input_weight: float = Field(
        0.0, ge=0, description="weight of the loss of the quantized block fed the FP stream"
    )
    seed: int = 0

    def needs_fp_stream(self) -> bool:
        return True

    def requires(self) -> set[str]:
        return {"learned"}

    def calibration_batch_size(self) -> int:
        return self.batch_size  # one stored calibration batch is one optimizer step

    def process_block(self, ctx: BlockContext, steps: list[StepConfig], scheme: Scheme) -> None:
        learners = [s for s in steps if isinstance(s, LearnerStep)]
        rounder = next(s for s in steps if isinstance(s, RounderStep))
        target = rounder.target_spec(scheme.weights)
        settings = TrainSettings(
            epochs=self.epochs,
            weight_decay=self.weight_decay,
            cross_layer=self.cross_layer,
            fp_input_weight=self.fp_input_weight,
            seed=self.seed + ctx.index,
        )
        fixed, result = learn_block(
            ctx,
            [(s.name, s.build) for s in learners],
            scheme.weights,
            scheme.activations,
            target if isinstance(target, VQSpec) else None,
            settings,
        )
        ctx.fixed.update(fixed)
        ctx.report["train"] = {
            "block": ctx.index,
            "seconds": result.seconds,
            "initial_loss": result.initial_loss,
            "final_loss": result.final_loss,
        }
        ctx.progress["loss"] = f"{result.initial_loss:.3g}->{result.final_loss:.3g}"
