"""compensator: post-training quantization of LLMs that compensates quantization error.

Importing the package is cheap: the API (and with it transformers and the engine) loads on
first use of one of the names below, so ``import compensator.quant`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "QuantizedModel": "compensator.api",
    "evaluate": "compensator.api",
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
    "__version__",
    "evaluate",
    "load",
    "load_recipe",
    "quantize",
    "save",
]

if TYPE_CHECKING:
    from compensator.api import QuantizedModel, evaluate, load, quantize, save
    from compensator.recipes.recipe import Recipe, Scheme, load_recipe


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'compensator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
