"""Every weight matrix of a block is quantized: fused experts are split into Linears before
the run, and after each block nothing that should have been rounded is still FP."""

from __future__ import annotations

import logging

from torch import nn

from compensator.errors import CompensatorError
from compensator.models.checks import check_experts_recipe, fused_left, left_fused
from compensator.nn.experts import unfuse_experts
from compensator.nn.layers import quantized_layers
from compensator.recipes.recipe import Recipe

log = logging.getLogger(__name__)


def check_block_quantized(block: nn.Module, prefix: str) -> None:
    """Refuse a block that still holds a full-precision weight matrix after its rounding:
    a plain Linear no group named, or a weight tensor of 3+ dimensions (fused experts of a
    layout compensator does not unfuse). Routers and norms (weights outside Linears, at most
    2-D) stay FP by design."""
    inside = {n for n, _ in quantized_layers(block)}
    for name, module in block.named_modules():
        if any(name == q or name.startswith(f"{q}.") for q in inside):
            continue
        if isinstance(module, nn.Linear):
            raise CompensatorError(
                f"{prefix}.{name} ({type(module).__name__}, {module.out_features} x "
                f"{module.in_features}) was left in full precision: no group of the adapter "
                "names it; declare it in compensator.models.adapter or report the model"
            )
        if left_fused(module):
            pname, p = next(
                (n, p) for n, p in module.named_parameters(recurse=False) if p.ndim >= 3
            )
            raise CompensatorError(fused_left(prefix, name, module, pname, p))


def split_experts(model: nn.Module, recipe: Recipe) -> list[str]:
    """Split the fused experts of ``model`` into per-expert Linears (their module names),
    refusing what ``recipe`` cannot do with experts."""
    experts = unfuse_experts(model)
    if experts:
        check_experts_recipe(recipe, experts)
        log.info("split the fused experts of %d blocks into per-expert Linears", len(experts))
    return experts
