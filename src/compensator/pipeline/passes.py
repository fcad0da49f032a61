"""Calibration passes over one block: the FP pass, and the statistics of a group of Linears."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Any, Literal

import torch
from torch import nn

from compensator.nn.experts import routed_linears
from compensator.nn.rotated import rotate_input
from compensator.parallel import SOLO, Ranks
from compensator.pipeline.stats import STATISTICS, StatsAccumulator
from compensator.pipeline.storage import Storage
from compensator.pipeline.streams import BatchReuse, Stream, capture_linear_inputs, run_block
from compensator.quant.act import ActSpec
from compensator.steps.base import StepConfig
from compensator.types import LinearStats

Seconds = dict[str, float]
log = logging.getLogger(__name__)


def fp_pass(
    block: nn.Module, names: list[str], stream: Stream, device: torch.device, storage: Storage
) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Run the still-FP block on the FP stream: every Linear's input, and its outputs.

    Done once per block before any rounding, so no copy of the FP block is needed. Linears
    fed the same tensor (q/k/v, gate/up) share one stored input.
    """
    inputs: list[dict[str, torch.Tensor]] = []
    outputs: list[torch.Tensor] = []
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Any:
        def hook(m: nn.Module, args: tuple) -> None:
            seen[name] = rotate_input(m, args[0])

        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        for hidden, kwargs in zip(stream.hidden, stream.kwargs, strict=True):
            seen.clear()
            outputs.append(run_block(block, Stream([hidden], [kwargs]), device, storage)[0])
            stored: dict[int, torch.Tensor] = {}
            for x in seen.values():
                if id(x) not in stored:
                    stored[id(x)] = storage.put(x)
            inputs.append({n: stored[id(x)] for n, x in seen.items()})
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


def collect_stats(
    block: nn.Module,
    names: list[str],
    stream: Stream,
    fp_inputs: list[dict[str, torch.Tensor]] | None,
    stat_names: set[str],
    device: torch.device,
    seconds: Seconds,
    act: ActSpec | None = None,
    bases: dict[str, torch.Tensor | None] | None = None,
    reuse: BatchReuse | None = None,
    routed: Collection[str] = (),
    ranks: Ranks = SOLO,
) -> dict[str, LinearStats]:
    """Statistics of each named Linear's input over all calibration batches (of every rank:
    summed over the ranks before any step reads them).

    Linears that receive the very same input tensor (q/k/v, gate/up) share one accumulator,
    so X^T X is computed once per distinct input (and split basis, when given). A ``routed``
    Linear (an expert) has statistics over the tokens routed to it, and none if no token was.
    """

    def basis(name: str) -> torch.Tensor | None:
        return None if bases is None else bases.get(name)

    acc: dict[str, StatsAccumulator] = {}
    for b, (hidden, kwargs) in enumerate(zip(stream.hidden, stream.kwargs, strict=True)):
        xs = capture_linear_inputs(block, names, hidden, kwargs, device, reuse, b, routed)
        # An expert's accumulator starts with the first batch routing a token to it.
        first_owner: dict[tuple[int, int], str] = {}
        for n in names:
            if n in acc or n not in xs:
                continue
            owner = first_owner.setdefault((id(xs[n]), id(basis(n))), n)
            if owner == n:
                acc[n] = StatsAccumulator(stat_names, xs[n].shape[-1], xs[n].device, act, basis(n))
            else:
                acc[n] = acc[owner]
        done: set[int] = set()
        for n in names:
            if n not in xs or id(acc[n]) in done:
                continue
            done.add(id(acc[n]))
            x_fp = fp_inputs[b][n].to(device) if fp_inputs is not None else None
            t0 = time.perf_counter()
            acc[n].update(xs[n], x_fp, b)
            seconds["statistics"] += time.perf_counter() - t0
    if ranks.parallel:
        t0 = time.perf_counter()
        _reduce(acc, block, names, stat_names, device, act, basis, ranks)
        seconds["reduce"] += time.perf_counter() - t0
    finals: dict[int, LinearStats] = {}
    for a in acc.values():
        if id(a) not in finals:
            finals[id(a)] = a.finalize()
    return {n: finals[id(a)] for n, a in acc.items()}


def _reduce(
    acc: dict[str, StatsAccumulator],
    block: nn.Module,
    names: list[str],
    stat_names: set[str],
    device: torch.device,
    act: ActSpec | None,
    basis: Any,
    ranks: Ranks,
) -> None:
    """Sum the accumulators over the ranks. Every rank first holds one, shared alike, for
    each Linear any rank saw (an expert may get tokens on one rank only), so that all send
    the same tensors in the same order."""
    local = [-1.0] * len(names)
    for i, n in enumerate(names):
        if n in acc:
            local[i] = float(next(j for j, m in enumerate(names) if acc.get(m) is acc[n]))
    for i, owner in enumerate(ranks.max_numbers(local)):
        n, o = names[i], names[int(owner)] if owner >= 0 else None
        if o is None or n in acc:
            continue
        if o not in acc:
            d_in = block.get_submodule(o).in_features
            acc[o] = StatsAccumulator(stat_names, d_in, device, act, basis(o))
        acc[n] = acc[o]
    done: set[int] = set()
    for n in names:
        if n in acc and id(acc[n]) not in done:
            done.add(id(acc[n]))
            acc[n].reduce(ranks)


StarvedExperts = Literal["all-tokens", "rtn"]


def group_stats(
    block: nn.Module,
    group: list[tuple[str, nn.Linear]],
    stream: Stream,
    fp_inputs: list[dict[str, torch.Tensor]] | None,
    stat_names: set[str],
    splitter: StepConfig | None,
    device: torch.device,
    seconds: Seconds,
    act: ActSpec | None = None,
    reuse: BatchReuse | None = None,
    starved: StarvedExperts = "all-tokens",
    where: str = "",
    ranks: Ranks = SOLO,
) -> dict[str, LinearStats]:
    """The statistics ``stat_names`` of a group of Linears. Experts that calibration routes
    fewer tokens to than they have inputs are calibrated on every token (``starved ==
    "all-tokens"``) or left without statistics, to be rounded without data (``"rtn"``)."""
    experts = routed_linears(block, [n for n, _ in group])
    stats = _group_stats(
        block, group, stream, fp_inputs, stat_names, splitter, device, seconds, act, reuse,
        set(experts), ranks,
    )  # fmt: skip
    few = [
        n
        for n, linear in group
        if n in experts and (n not in stats or stats[n].tokens < linear.in_features)
    ]
    if not few:
        return stats
    counts = ", ".join(f"{where}{n} ({stats[n].tokens if n in stats else 0})" for n in few)
    if starved == "rtn":
        log.warning("experts with too few calibration tokens, rounded without data: %s", counts)
        return {n: st for n, st in stats.items() if n not in few}
    log.warning("experts with too few calibration tokens, calibrated on all tokens: %s", counts)
    modules = {id(m): m for m, _ in experts.values()}
    for m in modules.values():
        m.calibrate_all = frozenset(experts[n][1] for n in few if experts[n][0] is m)
    try:
        again = _group_stats(
            block, [(n, lin) for n, lin in group if n in few], stream, fp_inputs, stat_names,
            splitter, device, seconds, act, reuse, set(experts), ranks,
        )  # fmt: skip
    finally:
        for m in modules.values():
            m.calibrate_all = frozenset()
    return {**stats, **again}


def _group_stats(
    block: nn.Module,
    group: list[tuple[str, nn.Linear]],
    stream: Stream,
    fp_inputs: list[dict[str, torch.Tensor]] | None,
    stat_names: set[str],
    splitter: StepConfig | None,
    device: torch.device,
    seconds: Seconds,
    act: ActSpec | None,
    reuse: BatchReuse | None,
    routed: set[str],
    ranks: Ranks,
) -> dict[str, LinearStats]:
    """With a ``splitter`` (a step whose layers split their input), a first pass gives the
    Hessians its bases come from, and everything that does not read the split input; a
    second pass the rest."""
    names = [n for n, _ in group]
    if splitter is None:
        return collect_stats(
            block, names, stream, fp_inputs, stat_names, device, seconds, act, reuse=reuse,
            routed=routed, ranks=ranks,
        )  # fmt: skip
    plain = {n for n in stat_names if not STATISTICS[n].uses_basis} | {"hessian"}
    first = collect_stats(
        block, names, stream, fp_inputs, plain, device, seconds, reuse=reuse, routed=routed,
        ranks=ranks,
    )  # fmt: skip
    memo: dict[tuple[int, tuple[int, int]], torch.Tensor | None] = {}
    bases: dict[str, torch.Tensor | None] = {}
    for name, linear in group:
        if name not in first:
            continue
        key = (id(first[name]), (linear.out_features, linear.in_features))
        if key not in memo:
            hessian = first[name].hessian
            assert hessian is not None
            memo[key] = splitter.input_basis(key[1], hessian)
        bases[name] = memo[key]
    # Same Hessians on every rank, but an eigensolver need not give bit-equal bases everywhere.
    ranks.same_([b for b in memo.values() if b is not None])
    rest = stat_names - plain
    second = collect_stats(
        block, names, stream, fp_inputs, rest, device, seconds, act, bases, reuse, routed, ranks
    )
    return {
        n: LinearStats(
            {**first[n].values, **second[n].values}, max(first[n].tokens, second[n].tokens)
        )
        for n in first
    }
