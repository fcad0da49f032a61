"""compensator: post-training quantization of LLMs that compensates quantization error.

Importing the package is cheap: the API (and with it transformers and the engine) loads on
first use of one of the names below, so ``import compensator.quant`` stays light.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "QuantizedModel": "compensator.api",
    "evaluate": "compensator.api",
    "export": "compensator.api",
    "finetune": "compensator.api_tune",
    "TuneConfig": "compensator.tune.spec",
    "load": "compensator.api",
    "quantize": "compensator.api",
    "save": "compensator.api",
    "Recipe": "compensator.recipes.recipe",
    "Scheme": "compensator.recipes.recipe",
    "load_recipe": "compensator.recipes.recipe",
}

__all__ = [
    "QuantizedModel",
    "Recipe",
    "Scheme",
    "TuneConfig",
    "__version__",
    "evaluate",
    "export",
    "finetune",
    "load",
    "load_recipe",
    "quantize",
    "save",
]

if TYPE_CHECKING:
    from compensator.api import QuantizedModel, evaluate, export, load, quantize, save
    from compensator.api_tune import finetune
    from compensator.recipes.recipe import Recipe, Scheme, load_recipe
    from compensator.tune.spec import TuneConfig


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'compensator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """The package, whose exported names stay the API's even where a submodule has the same
    name: importing ``compensator.evaluate`` (the API itself does) would otherwise bind the
    module over the function ``evaluate``, and ``cp.evaluate(...)`` would fail with
    "'module' object is not callable". The submodule stays importable by its full name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # __getattr__ gives the API's object
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
