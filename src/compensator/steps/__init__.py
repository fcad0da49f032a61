"""Recipe steps; importing this package registers every built-in step."""

from compensator.steps import gptq, learned, lqer, lrc, rotate, rtn, vq  # noqa: F401  (registration side effect)
from compensator.steps.base import (
    STEPS,
    CorrectorStep,
    LearnerStep,
    RounderStep,
    StepConfig,
    TransformStep,
    register_step,
)

__all__ = [
    "STEPS",
    "CorrectorStep",
    "LearnerStep",
    "RounderStep",
    "StepConfig",
    "TransformStep",
    "register_step",
]
