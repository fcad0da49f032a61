"""What the ranks of a data-parallel run exchange per block, and how evenly the rounding
spreads over them, from a model's shapes alone (``compensator plan --ranks N``).

It follows the engine's rules: every distinct Linear input's [in, in] float32 statistics
are all-reduced at the block boundary (:func:`compensator.pipeline.passes.collect_stats`);
each rounding piece is done by one owner and broadcast (uint8 codes, float32 scale and zero
per group; :mod:`compensator.pipeline.solve`): a group of Linears with fewer input-sharing
sets than ranks is split by rows (every rank one share of every set), otherwise whole sets
go to owners longest first (:func:`compensator.parallel.owners`).
"""

from __future__ import annotations

from typing import Any

from compensator.parallel import owners
from compensator.pipeline.footprint import ModelShape, RunShape


def _cost(rows: int, i: int) -> float:
    """GPTQ's work on ``rows`` rows of an ``i``-column input: the column sweep (2 rows i^2)
    and the inverse of the Hessian (i^3), which every share of a set computes again."""
    return float(2 * rows * i * i + i**3)


def _group_loads(i: int, outs: tuple[int, ...], count: int, world: int) -> list[float]:
    """Each rank's rounding work for one group of Linears."""
    rows = sum(outs)
    if count < world:  # split by rows: each rank a share of each set
        shares = [round(rows * (r + 1) / world) - round(rows * r / world) for r in range(world)]
        return [count * _cost(s, i) if s else 0.0 for s in shares]
    costs = [_cost(rows, i)] * count
    load = [0.0] * world
    for cost, rank in zip(costs, owners(costs, world), strict=True):
        load[rank] += cost
    return load


def exchange(
    shape: ModelShape, run: RunShape, world: int, group_size: int | None = 128
) -> dict[str, Any]:
    """Bytes all-reduced and broadcast per block (its widest kind), and the rounding's
    speed-up over one rank with its imbalance, for a run over ``world`` ranks."""
    moe = shape.widest_block()
    groups = shape.groups(moe)
    reduce = sum(n * i * i * 4 * run.statistics for (i, _), n in groups)
    weights = shape.linear_params(moe)
    per_group = 8 / (group_size or max(i for (i, _), _n in groups))  # scale + zero, float32
    broadcast = int(weights * (1 + per_group))
    one = busiest = 0.0
    rows = []
    for (i, outs), n in groups:
        load = _group_loads(i, outs, n, world)
        one, busiest = one + n * _cost(sum(outs), i), busiest + max(load)
        rows.append(
            {
                "input": i,
                "outputs": list(outs),
                "count": n,
                "split": "rows" if n < world else "whole sets",
                "imbalance": max(load) / (sum(load) / world),
                "speedup": n * _cost(sum(outs), i) / max(load),
            }
        )
    return {
        "ranks": world,
        "all_reduce_bytes_per_block": reduce,
        # A ring all-reduce sends (and receives) 2 (N - 1) / N of the buffer per rank.
        "all_reduce_traffic_per_rank": int(2 * (world - 1) / world * reduce),
        "broadcast_bytes_per_block": broadcast,
        "blocks": shape.layers,
        "rounding_speedup": one / busiest if busiest else 1.0,
        "groups": rows,
    }
