"""Vector quantization steps: the ``vq`` rounder (k-means codebooks, optionally sign-split)
and the ``ssvq`` learner that trains codebooks and latent signs against the block output."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from compensator.learn.learners import LearnContext, Learner
from compensator.learn.ssvq import SSVQ
from compensator.quant.spec import QuantizedWeight, QuantSpec
from compensator.quant.vq import VQSpec, VQWeight, vq_quantize
from compensator.steps.base import LearnerStep, RounderStep, register_step
from compensator.types import LinearStats


@register_step
class VQStep(RounderStep):
    """Plain VQ: per-row RMS scales, then k-means (weighted by diag X^T X) over sub-vectors
    of ``dim`` input columns, 2^bits fp16 codewords per layer; ``signs`` clusters |W| and
    keeps one sign bit per weight. The scheme's uniform weight spec is not used."""

    name: ClassVar[str] = "vq"
    rows_independent: ClassVar[bool] = False  # one codebook serves all rows
    accepts_params: ClassVar[bool] = True  # a trained VQ weight (ssvq) is taken as is
    result_format: ClassVar[str] = "vq"
    uses_weight_scheme: ClassVar[bool] = False
    dim: int = Field(4, ge=1, le=16)
    bits: int = Field(8, ge=1, le=14)
    signs: bool = False
    rows_per_codebook: int | None = Field(None, ge=1)
    iterations: int = Field(20, ge=0)
    fit_vectors: int = Field(65536, ge=1, description="sub-vectors the codebook is fitted on")
    weighted: bool = Field(True, description="weight k-means by diag(X^T X)")
    seed: int = 0

    @property
    def vq_spec(self) -> VQSpec:
        return VQSpec(**self.model_dump(exclude={"weighted"}))

    def stats(self) -> set[str]:
        return {"hessian"} if self.weighted else set()

    def provides(self) -> set[str]:
        return super().provides() | ({"vq_signs"} if self.signs else set())

    def target_spec(self, weights: QuantSpec) -> VQSpec:
        return self.vq_spec

    def round(
        self,
        weight: torch.Tensor,
        stats: LinearStats | None,
        spec: QuantSpec,
        params: Any = None,
    ) -> VQWeight | QuantizedWeight:
        if isinstance(params, VQWeight):
            return params
        hdiag = None
        if self.weighted and stats is not None and stats.hessian is not None:
            hdiag = torch.diagonal(stats.hessian)
        return vq_quantize(weight, self.vq_spec, hdiag)


@register_step
class SSVQStep(LearnerStep):
    """SSVQ: train the (sign-split) codebook and per-weight latent signs against the block
    output, freezing oscillating signs progressively; needs a ``vq`` rounder with signs."""

    name: ClassVar[str] = "ssvq"
    role: ClassVar[str] = "quantizer"
    order_in_kind: ClassVar[int] = SSVQ.order
    weight_format: ClassVar[str] = "vq"
    lr: float = Field(1e-3, gt=0, description="learning rate of the codebook")
    sign_lr: float = Field(1e-3, gt=0, description="learning rate of the latent signs")
    alpha: float = Field(1.0, gt=0, description="latent init: alpha * W / row scale")
    ema: float = Field(0.9, ge=0, lt=1, description="decay of the flip-frequency EMA")
    threshold_start: float = Field(1.0, ge=0, le=1)
    threshold_end: float = Field(0.1, ge=0, le=1)

    def requires(self) -> set[str]:
        return super().requires() | {"vq_signs"}

    def build(self, ctx: LearnContext) -> Learner:
        return SSVQ(
            ctx,
            self.lr,
            self.sign_lr,
            self.alpha,
            self.ema,
            self.threshold_start,
            self.threshold_end,
        )
