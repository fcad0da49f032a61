"""The step interface and the registry from step name to implementation.

A recipe step is a validated config object (a pydantic model) registered under its name.
Adding a method is one config class with ``@register_step`` and an implementation; the
pipeline never branches on method names, it asks each step what it is (``kind``) and what
it needs (``stats``, ``needs_fp_stream``).

Kinds, applied in this order inside one block:
  transform  function-preserving changes of the FP model (rotations)
  learner    parameters trained per block against the FP block, folded into its weights
             (LWC clipping, LET scales, LSI/SDE singular values); ``trainer`` sets how
  rounder    chooses the quantized weight of each Linear from its input statistics
  corrector  adds full-precision terms after rounding (low-rank error repair)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from torch import nn

    from compensator.correctors.lowrank import LowRank
    from compensator.learn.learners import LearnContext, Learner
    from compensator.models.adapter import ModelAdapter
    from compensator.pipeline.stats import LinearStats
    from compensator.quant.spec import QuantizedWeight, QuantParams, QuantSpec

StepKind = Literal["transform", "learner", "trainer", "rounder", "corrector"]


class StepConfig(BaseModel):
    """Base of every step config; subclasses set ``name``, ``kind`` and implement their hook."""

    model_config = ConfigDict(extra="forbid")

    name: ClassVar[str]
    kind: ClassVar[StepKind]

    def stats(self) -> set[str]:
        """Names of the per-Linear statistics this step needs (see pipeline.stats)."""
        return set()

    def needs_fp_stream(self) -> bool:
        """Whether the FP model's inputs to each block must be propagated alongside."""
        return False

    def fp_stream_low_precision(self) -> bool:
        """Whether the FP stream may be computed under bfloat16 autocast."""
        return False


class TransformStep(StepConfig):
    """Function-preserving change of the whole FP model, applied once before calibration
    (a residual-stream rotation spans every block, so it cannot be done block by block)."""

    kind: ClassVar[StepKind] = "transform"

    def transform_model(self, model: nn.Module, adapter: ModelAdapter) -> None:
        raise NotImplementedError


class LearnerStep(StepConfig):
    """A parametrization trained block by block (compensator.learn), then folded away."""

    kind: ClassVar[StepKind] = "learner"
    role: ClassVar[str]  # one step per role: quantizer, transform, weights
    order: ClassVar[int]  # application order of the learners' transforms
    weight_format: ClassVar[str] = "uniform"  # the rounder storage it trains for
    # Whether folding changes what the block's Linears read (LET rescales their inputs); the
    # FP-stream statistics of an asymmetric rounder (GPTAQ) are then no longer valid.
    moves_inputs: ClassVar[bool] = False

    def needs_fp_stream(self) -> bool:
        return True  # the training target is the FP block's output

    def build(self, ctx: LearnContext) -> Learner:
        raise NotImplementedError


class RounderStep(StepConfig):
    kind: ClassVar[StepKind] = "rounder"
    # Rows (output channels) are rounded independently given the input statistics, so
    # Linears fed the same input (q/k/v, gate/up) can be rounded as one stacked matrix:
    # the same result, with one pass over the columns instead of one per Linear.
    rows_independent: ClassVar[bool] = True
    # Whether ``round`` honours fixed per-group ``params`` (learned clipping, LWC).
    accepts_params: ClassVar[bool] = False

    def round(
        self,
        weight: torch.Tensor,
        stats: LinearStats | None,
        spec: QuantSpec,
        params: QuantParams | None = None,
    ) -> QuantizedWeight:
        raise NotImplementedError

    def storage(self) -> dict[str, Any] | None:
        """How layers are stored when not on the scheme's uniform grid (checkpoint config)."""
        return None


class CorrectorStep(StepConfig):
    kind: ClassVar[StepKind] = "corrector"
    # A joint corrector chooses the rounding too (LRC alternates the rounder with its own
    # low-rank solve): the pipeline calls ``refine`` instead of the rounder for each Linear.
    joint: ClassVar[bool] = False

    def raw_input(self) -> bool:
        """Whether the low-rank term multiplies the unquantized input (else the quantized)."""
        return False

    def split_input(self) -> bool:
        """Whether the quantized path reads the input less the low-rank term's subspace."""
        return False

    def input_basis(self, shape: tuple[int, int], hessian: torch.Tensor) -> torch.Tensor | None:
        """The split basis [in, k] for a Linear of weight ``shape`` whose input has second
        moments ``hessian``, taken before its quantized-input statistics; None: no split."""
        return None

    def refine(
        self,
        weight: torch.Tensor,
        stats: LinearStats | None,
        spec: QuantSpec,
        rounder: RounderStep,
    ) -> tuple[QuantizedWeight, LowRank | None]:
        raise NotImplementedError

    def correct(
        self, weight: torch.Tensor, rounded: torch.Tensor, stats: LinearStats | None
    ) -> LowRank | None:
        """Full-precision terms that repair ``rounded`` (the dequantized weight the layer
        will use) towards ``weight`` (the original FP weight); None when there is nothing."""
        raise NotImplementedError


RANK_HELP = (
    "rank k, or rho in (0, 1]: k = rho * in * out / (in + out), the factors then holding rho "
    "of the layer's parameter count"
)


class LowRankCorrector(CorrectorStep):
    """A corrector with a ``rank``: an integer, or a fraction of the layer's parameters."""

    rank: int | float = Field(32, description=RANK_HELP)

    @field_validator("rank")
    @classmethod
    def _valid_rank(cls, v: int | float) -> int | float:
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"a fractional rank must be in (0, 1], got {v}")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"rank must be >= 0, got {v}")
        return v


STEPS: dict[str, type[StepConfig]] = {}


def register_step(cls: type[StepConfig]) -> type[StepConfig]:
    if cls.name in STEPS:
        raise ValueError(f"step {cls.name!r} registered twice")
    STEPS[cls.name] = cls
    return cls
