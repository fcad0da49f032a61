"""The QuaRot-style rotation step: a whole-model transform applied before calibration."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field
from torch import nn

from compensator.errors import CompensatorError
from compensator.steps.base import TransformStep, register_step
from compensator.transforms.rotation import rotate_model

if TYPE_CHECKING:
    from compensator.models.adapter import ModelAdapter


@register_step
class RotateStep(TransformStep):
    """Rotate the residual stream (randomized Hadamard, or Haar-random orthogonal), the value
    heads, and down_proj's input online; exact in full precision, so any rounder follows."""

    name: ClassVar[str] = "rotate"
    rotation: Literal["hadamard", "orthogonal"] = Field(
        "hadamard", description="residual rotation: randomized Hadamard, or Haar-random"
    )
    seed: int = 0
    heads: bool = Field(True, description="rotate each value head (v_proj/o_proj), offline")
    online_down: bool = Field(True, description="online Hadamard on down_proj's input")
    online_o: bool = Field(False, description="online Hadamard on o_proj's input (mixes heads)")

    def transform_model(self, model: nn.Module, adapter: ModelAdapter) -> None:
        layout = adapter.arch.rotation
        if layout is None:
            raise CompensatorError(
                f"the rotate step has no layout for {adapter.arch.name!r} models; supported: "
                "llama, mistral, qwen2, qwen3"
            )
        rotate_model(
            model,
            adapter.blocks(model),
            layout,
            seed=self.seed,
            rotation=self.rotation,
            heads=self.heads,
            online_down=self.online_down,
            online_o=self.online_o,
        )
