"""Round a group of Linears with the recipe's rounder and correctors, and put the layers
their results build in the block's place. Runs steps by what they declare.

In a data-parallel run each piece of this work (a Linear, the Linears sharing an input, or a
share of their stacked rows when there are fewer such sets than ranks) is done by one owner
rank, chosen to balance the ranks (:func:`compensator.parallel.owners`), and its result sent
to every rank, so all hold the same layers."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from compensator.nn.layers import build_layer, replace_module
from compensator.nn.registry import LayerExtras
from compensator.nn.rotated import input_rotation
from compensator.parallel import SOLO, Ranks, owners
from compensator.quant.spec import QuantizedWeight, QuantParams, QuantSpec
from compensator.quant.vq import VQSpec, VQWeight
from compensator.recipes.recipe import Recipe
from compensator.steps.base import RounderStep
from compensator.steps.rtn import RTNStep
from compensator.types import LinearStats, LowRank

Members = list[tuple[str, nn.Linear]]
Unit = tuple[float, Callable[[], Any]]  # (cost, work) of one owner's piece
# What a rank may send another: rounding results and low-rank terms.
SHAREABLE = (QuantizedWeight, QuantParams, QuantSpec, VQWeight, VQSpec, LowRank)


def _shared_inputs(group: Members, stats: dict[str, LinearStats] | None) -> list[Members]:
    """The group's Linears, those sharing one statistics object (same input) together."""
    if stats is None:
        return [[member] for member in group]
    sets: dict[int, Members] = {}
    for name, linear in group:
        sets.setdefault(id(stats[name]), []).append((name, linear))
    return list(sets.values())


def _cost(weight: torch.Tensor) -> float:
    """Rounding work of a matrix, in the units of GPTQ's column sweep (rows x columns^2)."""
    rows, cols = weight.shape
    return float(rows) * cols * cols


def run_units(
    units: Sequence[Unit], ranks: Ranks, device: torch.device, seconds: dict[str, float]
) -> list[Any]:
    """Each unit's result on every rank, computed by its owner only."""
    if not ranks.parallel:
        return [work() for _, work in units]
    owner = owners([cost for cost, _ in units], ranks.world)
    mine = {i: work() for i, (_, work) in enumerate(units) if owner[i] == ranks.rank}
    t0 = time.perf_counter()
    out = [ranks.share(mine.get(i), owner[i], SHAREABLE, device) for i in range(len(units))]
    seconds["share"] += time.perf_counter() - t0
    return out


def solve_group(
    block: nn.Module,
    group: Members,
    stats: dict[str, LinearStats] | None,
    recipe: Recipe,
    fixed: dict[str, Any],
    ranks: Ranks = SOLO,
    seconds: dict[str, float] | None = None,
) -> None:
    rounder, correctors, spec = recipe.rounder, recipe.correctors, recipe.scheme.weights
    results: dict[str, Any] = {}
    lowranks: dict[str, LowRank | None] = {}
    self_rounding = next((c for c in correctors if c.rounds_itself), None)
    seconds = {"share": 0.0} if seconds is None else seconds
    device = group[0][1].weight.device

    def stats_of(name: str) -> LinearStats | None:
        return None if stats is None else stats[name]

    # Experts that calibration did not reach (and the run asked not to feed all tokens):
    # rounded to nearest, without data or corrections (on every rank: cheap).
    blind = [(n, lin) for n, lin in group if stats is not None and n not in stats]
    if blind:
        nearest = RTNStep()
        for name, linear in blind:
            results[name] = nearest.round(
                linear.weight.data, None, spec.for_width(linear.in_features)
            )
            lowranks[name] = None
        group = [(n, lin) for n, lin in group if stats is None or n in stats]

    if self_rounding is not None:

        def solve_one(name: str, linear: nn.Linear) -> Callable[[], Any]:
            width_spec = spec.for_width(linear.in_features)
            return lambda: self_rounding.solve(
                linear.weight.data, stats_of(name), width_spec, rounder
            )

        units = [(_cost(lin.weight), solve_one(n, lin)) for n, lin in group]
        for (name, _), (res, low) in zip(
            group, run_units(units, ranks, device, seconds), strict=True
        ):
            results[name], lowranks[name] = res, low
    else:
        job = _Rounding(rounder, stats_of, spec, fixed, ranks, device, seconds)
        results |= job.round(_shared_inputs(group, stats))

        def correct_one(name: str, linear: nn.Linear) -> Callable[[], LowRank | None]:
            def work() -> LowRank | None:
                low = None
                for step in correctors:
                    low = step.correct(
                        linear.weight.data, results[name].dequantize(), stats_of(name)
                    )
                return low

            return work

        units = [(_cost(lin.weight), correct_one(n, lin)) for n, lin in group] if correctors else []
        lows = run_units(units, ranks, device, seconds) if units else [None] * len(group)
        lowranks |= {name: low for (name, _), low in zip(group, lows, strict=True)}
    for name, linear in [*group, *blind]:
        extras = LayerExtras(
            bias=None if linear.bias is None else linear.bias.data,
            lowrank=lowranks[name],
            act_spec=recipe.scheme.activations,
            lowrank_input=recipe.lowrank_input,
            rotation=input_rotation(linear),
        )
        replace_module(block, name, build_layer(results[name], extras))


@dataclass
class _Rounding:
    """One group's rounding: every Linear's result, from the sets sharing an input."""

    rounder: RounderStep
    stats_of: Callable[[str], LinearStats | None]
    spec: QuantSpec
    fixed: dict[str, Any]
    ranks: Ranks
    device: torch.device
    seconds: dict[str, float]

    def round(self, sets: list[Members]) -> dict[str, Any]:
        """In one process each set of Linears sharing an input is rounded by
        :meth:`RounderStep.round_shared`; over ranks the owners' pieces are whole sets,
        single Linears, or (fewer sets than ranks) shares of a set's stacked rows."""
        rounder, ranks = self.rounder, self.ranks
        if ranks.parallel and rounder.rows_independent and len(sets) < ranks.world:
            return self._row_shares(sets)
        pieces = sets
        if ranks.parallel and not rounder.rows_independent:
            pieces = [[m] for members in sets for m in members]
        units = [(sum(_cost(lin.weight) for _, lin in m), self._whole(m)) for m in pieces]
        out: dict[str, Any] = {}
        for members, rounded in zip(pieces, self._run(units), strict=True):
            out.update(zip([name for name, _ in members], rounded, strict=True))
        return out

    def _run(self, units: list[Unit]) -> list[Any]:
        return run_units(units, self.ranks, self.device, self.seconds)

    def _whole(self, members: Members) -> Callable[[], list[Any]]:
        return lambda: self.rounder.round_shared(
            [linear.weight.data for _, linear in members],
            self.stats_of(members[0][0]),
            self.spec.for_width(members[0][1].in_features),
            [self.fixed.get(name) for name, _ in members],
        )

    def _row_shares(self, sets: list[Members]) -> dict[str, Any]:
        """Rows are rounded independently given the statistics: each rank rounds 1/world of
        every set's stacked rows, and the shares are put back together."""
        units: list[Unit] = []
        layout: list[tuple[Members, int]] = []
        for members in sets:
            weight = torch.cat([linear.weight.data for _, linear in members])
            params = [self.fixed.get(name) for name, _ in members]
            stacked = QuantParams.stacked(params) if all(p is not None for p in params) else None
            if stacked is None and any(p is not None for p in params):
                raise ValueError("fixed parameters must cover every Linear sharing an input")
            st = self.stats_of(members[0][0])
            bounds = torch.linspace(0, weight.shape[0], self.ranks.world + 1).round().long()
            shares = [(a, b) for a, b in pairwise(bounds.tolist()) if b > a]
            for a, b in shares:
                part = None
                if stacked is not None:
                    part = QuantParams(stacked.scale[a:b], stacked.zero[a:b])

                def work(w: torch.Tensor = weight[a:b], p: Any = part, st: Any = st) -> Any:
                    spec = self.spec.for_width(w.shape[1])
                    return self.rounder.round_shared([w], st, spec, [p])[0]

                units.append((_cost(weight[a:b]), work))
            layout.append((members, len(shares)))
        pieces = iter(self._run(units))
        out: dict[str, Any] = {}
        for members, count in layout:
            parts = [next(pieces) for _ in range(count)]
            whole = QuantizedWeight(
                torch.cat([p.codes for p in parts]),
                QuantParams.stacked([p.params for p in parts]),
                parts[0].spec,
            )
            rows = torch.tensor([0] + [lin.out_features for _, lin in members]).cumsum(0)
            spans = pairwise(rows.tolist())
            out.update({n: whole.rows(a, b) for (n, _), (a, b) in zip(members, spans, strict=True)})
        return out
