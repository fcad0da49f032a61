"""The step interface, the kinds a recipe is made of, and the registry of steps by name.

A recipe step is a validated config object (a pydantic model) registered under its name.
Adding a method is one config class with ``@register_step`` and an implementation; nothing
else branches on method names. A step *declares* what it is and what it needs:

- ``kind`` (below), and ``order_in_kind`` among steps of the same kind;
- ``stats()``: the per-Linear statistics it reads; ``needs_fp_stream()``: whether the FP
  model's stream must be carried alongside the quantized one;
- ``provides()`` / ``requires()`` / ``conflicts()``: capabilities (:data:`CAPABILITIES`)
  it offers the other steps of a recipe, needs from them, or cannot stand next to;
- ``exclusive()``: a slot at most one step of a recipe may fill (a learner's role);
- ``implies()``: steps added with their defaults when the recipe has none of them.

The recipe validator checks a recipe from these declarations alone, and the engine runs the
steps by kind.

Kinds, in the order a recipe lists them and the engine applies them:
  transform  function-preserving changes of the whole FP model (rotations), before blocks
  learner    parameters trained per block against the FP block, folded into its weights
  trainer    how the learners are trained (a per-block hook: it runs them)
  rounder    chooses the quantized weight of each Linear from its input statistics
  corrector  adds full-precision terms after rounding (low-rank error repair)
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from compensator.correctors.lowrank import RANK_HELP, Rank, parse_rank
from compensator.quant.spec import QuantizedWeight, QuantParams, QuantSpec

if TYPE_CHECKING:
    from torch import nn

    from compensator.learn.learners import LearnContext, Learner
    from compensator.models.adapter import ModelAdapter
    from compensator.quant.scheme import Scheme
    from compensator.quant.vq import VQSpec, VQWeight
    from compensator.types import BlockContext, LinearStats, LowRank

StepKind = Literal["transform", "learner", "trainer", "rounder", "corrector"]


@dataclass(frozen=True)
class KindRule:
    order: int
    label: str
    min: int = 0
    max: int | None = None


KINDS: dict[str, KindRule] = {
    "transform": KindRule(0, "transforms"),
    "learner": KindRule(1, "learned steps"),
    "trainer": KindRule(2, "train settings", max=1),
    "rounder": KindRule(3, "a rounder", min=1, max=1),
    "corrector": KindRule(4, "a corrector", max=1),
}

# What a step can offer the others; ``requires`` and ``conflicts`` name these.
CAPABILITIES: dict[str, str] = {
    "rounds_any_target": "a uniform-grid rounder that needs only a Hessian and no FP stream, so "
    "it can be re-run on another target weight and Hessian",
    "fixed_params": "a rounder that takes fixed per-group parameters (learned clipping or a "
    "trained codebook)",
    "format:uniform": "a rounder whose layers are uniform integer grids",
    "format:vq": "a rounder whose layers are vector-quantized",
    "vq_signs": "a vq rounder with signs: true (it sets the sub-vector dim and codebook size)",
    "learned": "a learned step, trained block by block",
    "fp_inputs": "statistics of the FP stream's inputs to each Linear",
    "moves_inputs": "a learned transform that rescales what the Linears read",
    "rounds_itself": "a corrector that chooses the rounding itself, jointly with its factors",
}


class StepConfig(BaseModel):
    """Base of every step config; subclasses set ``name`` and ``kind``."""

    model_config = ConfigDict(extra="forbid")

    name: ClassVar[str]
    kind: ClassVar[StepKind]
    order_in_kind: ClassVar[int] = 0
    # A per-block hook (``process_block``) runs after the FP pass and before rounding.
    has_block_hook: ClassVar[bool] = False

    def stats(self) -> set[str]:
        """Names of the per-Linear statistics this step needs (see pipeline.stats)."""
        return set()

    def needs_fp_stream(self) -> bool:
        """Whether the FP model's inputs to each block must be propagated alongside."""
        return False

    def fp_stream_low_precision(self) -> bool:
        """Whether the FP stream may be computed under bfloat16 autocast."""
        return False

    def provides(self) -> set[str]:
        return set()

    def requires(self) -> set[str]:
        return set()

    def conflicts(self) -> dict[str, str]:
        """Capabilities this step cannot be combined with, each with the reason."""
        return {}

    def exclusive(self) -> str | None:
        return None

    def implies(self) -> list[str]:
        """Names of steps added with defaults when the recipe has none of them."""
        return []

    def calibration_batch_size(self) -> int | None:
        """Calibration windows per stored batch, when this step needs a particular one."""
        return None

    def splits_input(self) -> bool:
        """Whether its layers' quantized path reads the input less a subspace
        (``input_basis``), so the quantized-input statistics must be taken that way."""
        return False

    def input_basis(self, shape: tuple[int, int], hessian: torch.Tensor) -> torch.Tensor | None:
        """The split basis [in, k] of a Linear of weight ``shape`` whose input has second
        moments ``hessian``; None: no split for this Linear."""
        return None

    def process_block(self, ctx: BlockContext, steps: list[StepConfig], scheme: Scheme) -> None:
        """The per-block hook (``has_block_hook``): may rewrite ``ctx.block`` in place and
        set ``ctx.fixed`` (per-Linear parameters for the rounder) and ``ctx.report``."""
        raise NotImplementedError


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
    weight_format: ClassVar[str] = "uniform"  # the layer format it trains for
    # Whether folding changes what the block's Linears read (LET rescales their inputs).
    moves_inputs: ClassVar[bool] = False

    def needs_fp_stream(self) -> bool:
        return True  # the training target is the FP block's output

    def provides(self) -> set[str]:
        return {"learned", "moves_inputs"} if self.moves_inputs else {"learned"}

    def requires(self) -> set[str]:
        return {"fixed_params", f"format:{self.weight_format}"}

    def conflicts(self) -> dict[str, str]:
        why = {"rounds_itself": f"{self.name} folds into the block before rounding, which a "
               "corrector that re-rounds on its own target would ignore"}  # fmt: skip
        if self.moves_inputs:
            why["fp_inputs"] = (
                f"{self.name} rescales what the Linears read, so statistics of the FP "
                "stream's inputs no longer match them"
            )
        return why

    def exclusive(self) -> str | None:
        return f"the {self.role} learner"

    def implies(self) -> list[str]:
        return ["train"]

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
    fits_kquant: ClassVar[bool] = False  # fits llama.cpp's K-quant super-blocks (QuantSpec.kquant)
    fits_float_min: ClassVar[bool] = True  # keeps float mins (QuantSpec.float_min)
    result_format: ClassVar[str] = "uniform"  # what ``round`` returns becomes this layer
    # Whether the scheme's uniform weight spec (bits, group size, symmetry) is what it uses.
    uses_weight_scheme: ClassVar[bool] = True

    def provides(self) -> set[str]:
        out = {f"format:{self.result_format}"}
        if self.stats() <= {"hessian"} and not self.needs_fp_stream() and self.uses_weight_scheme:
            out.add("rounds_any_target")
        if self.accepts_params:
            out.add("fixed_params")
        return out

    def target_spec(self, weights: QuantSpec) -> QuantSpec | VQSpec:
        """The spec of the layers it produces (learners train for it)."""
        return weights

    def round(
        self,
        weight: torch.Tensor,
        stats: LinearStats | None,
        spec: QuantSpec,
        params: QuantParams | VQWeight | None = None,
    ) -> QuantizedWeight | VQWeight:
        raise NotImplementedError

    def round_shared(
        self,
        weights: list[torch.Tensor],
        stats: LinearStats | None,
        spec: QuantSpec,
        params: list[Any],
    ) -> list[QuantizedWeight | VQWeight]:
        """Round Linears that read the same input (and so share ``stats``): as one stacked
        matrix when rows are independent, one by one otherwise."""
        if not self.rows_independent or len(weights) == 1:
            return [self._round(w, stats, spec, p) for w, p in zip(weights, params, strict=True)]
        if all(p is None for p in params):
            fixed = None
        elif all(isinstance(p, QuantParams) for p in params):
            fixed = QuantParams.stacked(params)
        else:
            raise ValueError("fixed parameters must cover every Linear sharing an input")
        qw = self._round(torch.cat(weights), stats, spec, fixed)
        assert isinstance(qw, QuantizedWeight)
        bounds = torch.tensor([0] + [w.shape[0] for w in weights]).cumsum(0).tolist()
        return [qw.rows(a, b) for a, b in pairwise(bounds)]

    def _round(self, w: torch.Tensor, stats: Any, spec: QuantSpec, params: Any) -> Any:
        return self.round(w, stats, spec, **({} if params is None else {"params": params}))


LowRankInput = Literal["quantized", "raw", "split"]


class CorrectorStep(StepConfig):
    kind: ClassVar[StepKind] = "corrector"
    # It chooses the rounding too (LRC alternates the rounder with its own low-rank solve):
    # ``solve`` replaces the rounder for each Linear.
    rounds_itself: ClassVar[bool] = False

    def provides(self) -> set[str]:
        return {"rounds_itself"} if self.rounds_itself else set()

    def requires(self) -> set[str]:
        base = {"format:uniform"}
        return base | {"rounds_any_target"} if self.rounds_itself else base

    def lowrank_input(self) -> LowRankInput:
        """What its factors multiply: the quantized input, the unquantized one (``raw``), or
        the unquantized one with their subspace taken out of the quantized path (``split``)."""
        return "quantized"

    def solve(
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


class LowRankCorrector(CorrectorStep):
    """A corrector with a ``rank``: components (16) or a share of the layer ("30%")."""

    rank: Rank = Field(32, description=RANK_HELP)

    @field_validator("rank", mode="before")
    @classmethod
    def _valid_rank(cls, v: object) -> Rank:
        return parse_rank(v)


STEPS: dict[str, type[StepConfig]] = {}


def register_step(cls: type[StepConfig]) -> type[StepConfig]:
    if cls.name in STEPS:
        raise ValueError(f"step {cls.name!r} registered twice")
    if cls.kind not in KINDS:
        raise ValueError(f"step {cls.name!r} has unknown kind {cls.kind!r}")
    STEPS[cls.name] = cls
    return cls
