"""Round a group of Linears with the recipe's rounder and correctors, and put the layers
their results build in the block's place. Runs steps by what they declare."""

from __future__ import annotations

from typing import Any

from torch import nn

from compensator.nn.layers import build_layer, replace_module
from compensator.nn.registry import LayerExtras
from compensator.nn.rotated import input_rotation
from compensator.recipes.recipe import Recipe
from compensator.steps.rtn import RTNStep
from compensator.types import LinearStats, LowRank


def _shared_inputs(
    group: list[tuple[str, nn.Linear]], stats: dict[str, LinearStats] | None
) -> list[list[tuple[str, nn.Linear]]]:
    """The group's Linears, those sharing one statistics object (same input) together."""
    if stats is None:
        return [[member] for member in group]
    sets: dict[int, list[tuple[str, nn.Linear]]] = {}
    for name, linear in group:
        sets.setdefault(id(stats[name]), []).append((name, linear))
    return list(sets.values())


def solve_group(
    block: nn.Module,
    group: list[tuple[str, nn.Linear]],
    stats: dict[str, LinearStats] | None,
    recipe: Recipe,
    fixed: dict[str, Any],
) -> None:
    rounder, correctors, spec = recipe.rounder, recipe.correctors, recipe.scheme.weights
    results: dict[str, Any] = {}
    lowranks: dict[str, LowRank | None] = {}
    self_rounding = next((c for c in correctors if c.rounds_itself), None)

    def stats_of(name: str) -> LinearStats | None:
        return None if stats is None else stats[name]

    # Experts that calibration did not reach (and the run asked not to feed all tokens):
    # rounded to nearest, without data or corrections.
    blind = [(n, lin) for n, lin in group if stats is not None and n not in stats]
    if blind:
        nearest = RTNStep()
        for name, linear in blind:
            results[name] = nearest.round(linear.weight.data, None, spec)
            lowranks[name] = None
        group = [(n, lin) for n, lin in group if stats is None or n in stats]

    if self_rounding is not None:
        for name, linear in group:
            results[name], lowranks[name] = self_rounding.solve(
                linear.weight.data, stats_of(name), spec, rounder
            )
    else:
        for members in _shared_inputs(group, stats):
            rounded = rounder.round_shared(
                [linear.weight.data for _, linear in members],
                stats_of(members[0][0]),
                spec,
                [fixed.get(name) for name, _ in members],
            )
            results.update(zip([name for name, _ in members], rounded, strict=True))
        for name, linear in group:
            lowranks[name] = None
            for step in correctors:
                lowranks[name] = step.correct(
                    linear.weight.data, results[name].dequantize(), stats_of(name)
                )
    for name, linear in [*group, *blind]:
        extras = LayerExtras(
            bias=None if linear.bias is None else linear.bias.data,
            lowrank=lowranks[name],
            act_spec=recipe.scheme.activations,
            lowrank_input=recipe.lowrank_input,
            rotation=input_rotation(linear),
        )
        replace_module(block, name, build_layer(results[name], extras))
