"""Recipe steps; importing this package registers every built-in step."""

from compensator.steps import gptq, lqer, lrc, rotate, rtn  # noqa: F401  (registration side effect)
from compensator.steps.base import (
    STEPS,
    CorrectorStep,
    RounderStep,
    StepConfig,
    TransformStep,
    register_step,
)

__all__ = ["STEPS", "CorrectorStep", "RounderStep", "StepConfig", "TransformStep", "register_step"]
