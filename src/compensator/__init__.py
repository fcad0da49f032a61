"""compensator: post-training quantization of LLMs that compensates quantization error."""

__version__ = "0.1.0"

from compensator.api import QuantizedModel, evaluate, load, quantize, save
from compensator.recipes import Recipe, Scheme, load_recipe

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
