"""Recipes: a quantization scheme plus an ordered list of registered steps (YAML or Python)."""

from compensator.recipes.recipe import Recipe, Scheme, load_recipe, preset_names

__all__ = ["Recipe", "Scheme", "load_recipe", "preset_names"]
