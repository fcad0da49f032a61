"""Recipe steps. Importing this package imports every module in it, so each step's
``@register_step`` runs: adding a step is adding a module here."""

import importlib
import pkgutil

from compensator.steps.base import (
    STEPS,
    CorrectorStep,
    LearnerStep,
    RounderStep,
    StepConfig,
    TransformStep,
    register_step,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "STEPS",
    "CorrectorStep",
    "LearnerStep",
    "RounderStep",
    "StepConfig",
    "TransformStep",
    "register_step",
]
