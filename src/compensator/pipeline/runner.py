"""The sequential block pipeline: runs a recipe's steps by kind, never by name.

Apply the transforms to the whole FP model. Capture the inputs of block 0 once. For each
block in turn: move it to the work device; when a step reads the FP stream, run the still-FP
block on it (its outputs, and every Linear's FP input); run the per-block hooks (learned
steps train and fold here); then for each group of Linears (true-sequential order: q/k/v,
then o, then gate/up, then down) collect the statistics the steps declare on the quantized
stream, round and correct the group, and put the layers in place, so that later groups see
the already-quantized outputs; finally run the quantized block on the quantized stream to
feed the next block, and move the block back.

Peak memory is one block plus the activation streams (with pass reuse, up to two more
streams' worth of kept sublayer outputs within a block), whatever the number of blocks; a
model read lazily holds only that block's weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compensator.models.adapter import ModelAdapter
from compensator.models.checks import (
    check_finite_stats,
    check_finite_stream,
    check_finite_weights,
)
from compensator.models.lazy import LazyWeights, materialized
from compensator.nn.layers import keep_dense
from compensator.parallel import SOLO, Ranks
from compensator.pipeline.context import block_context
from compensator.pipeline.coverage import check_block_quantized
from compensator.pipeline.declared import Declared
from compensator.pipeline.memory import return_freed_memory
from compensator.pipeline.passes import StarvedExperts, fp_pass, group_stats
from compensator.pipeline.report import PipelineReport, Timer, log_report
from compensator.pipeline.resume import RunState
from compensator.pipeline.reuse import PassReuse
from compensator.pipeline.solve import solve_group
from compensator.pipeline.storage import Storage, StreamsAt, storage_for
from compensator.pipeline.streams import PARK, Stream, capture_block_inputs, run_block
from compensator.recipes.recipe import Recipe

log = logging.getLogger(__name__)


def run_pipeline(
    model: nn.Module,
    adapter: ModelAdapter,
    recipe: Recipe,
    input_ids: torch.Tensor | None,
    *,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
    state: RunState | None = None,
    reuse_passes: bool = True,
    starved_experts: StarvedExperts = "all-tokens",
    weights: LazyWeights | None = None,
    streams: StreamsAt = "auto",
    offload_dir: str | Path | None = None,
    ranks: Ranks = SOLO,
) -> PipelineReport:
    """Quantize ``model`` in place: its block Linears become quantized layers.

    With a ``state`` (already begun), the blocks it holds as finished are restored instead of
    quantized again, and every block quantized here is written to it when done.
    ``reuse_passes=False`` recomputes every calibration pass in full (same results, slower;
    for checking :mod:`compensator.pipeline.reuse`). ``starved_experts`` is what becomes of
    an expert that calibration routes too few tokens to (:func:`group_stats`). With
    ``weights`` (a lazily opened model, whose blocks are on the meta device) each block is read
    in only while it is quantized and goes back to the meta device once written to
    ``state``, which is then required. ``streams`` is where calibration activations rest
    (:mod:`compensator.pipeline.storage`; on disk under ``offload_dir``, by default the run
    state's directory). Over several ``ranks`` (:mod:`compensator.parallel`) every rank
    passes the same ``input_ids`` and keeps its share of each batch; the statistics are summed
    over the ranks and each rounding is done by one of them; only the main rank writes the
    ``state``."""
    report = PipelineReport()
    t_start = time.perf_counter()
    _prepare(model, adapter, recipe, weights, state)
    plan = Declared.of(recipe, batch_size, device, starved_experts, reuse_passes, ranks)
    if input_ids is not None and plan.needs_data:
        input_ids, plan.batch_size = ranks.shard(input_ids, plan.batch_size, plan.batch_from)
    if offload_dir is None and state is not None:
        offload_dir = state.directory
    storage, plan.wide_tails = storage_for(
        model, input_ids, plan.keep_fp, plan.reuse_passes, device, streams, offload_dir
    )
    try:
        _run_blocks(model, adapter, recipe, input_ids, plan, device, storage, report, progress,
                    state, weights)  # fmt: skip
    finally:
        storage.close()
    report.seconds["total"] = time.perf_counter() - t_start
    log_report(report)
    return report


def _run_blocks(
    model: nn.Module,
    adapter: ModelAdapter,
    recipe: Recipe,
    input_ids: torch.Tensor | None,
    plan: Declared,
    device: torch.device,
    storage: Storage,
    report: PipelineReport,
    progress: bool,
    state: RunState | None,
    weights: LazyWeights | None,
) -> None:
    blocks = adapter.blocks(model)
    q_stream, block_kwargs = _capture(model, blocks, input_ids, plan, device, storage, report)
    # Measured: feeding D from half of the batches cost 7.8 ppl at W3 (GPTQ-exact 59.5 ->
    # 67.3), so the FP stream always carries every batch.
    fp_hidden = q_stream.hidden if plan.keep_fp and q_stream is not None else None

    def opener(j: int) -> AbstractContextManager[None]:
        return materialized(weights, blocks[j], f"{adapter.block_prefix(j)}.")

    start = 0 if state is None else state.finished
    if state is not None and start:
        with Timer(report, "resume"):
            q_stream, fp_hidden = _restore_finished(
                state, blocks, adapter, plan, q_stream, fp_hidden, block_kwargs, device,
                storage, report, opener,
            )  # fmt: skip
    bar = tqdm(
        range(start, len(blocks)),
        initial=start,
        total=len(blocks),
        desc="quantizing blocks",
        unit="block",
        disable=not progress or not plan.ranks.main,
    )
    for i in bar:
        t_block = time.perf_counter()
        streams = _block_streams(i, q_stream, fp_hidden, block_kwargs)
        before = len(report.quantized_layers)
        prefix = f"{adapter.block_prefix(i)}."
        with opener(i):
            if weights is not None:
                check_finite_weights(blocks[i], prefix)
            postfix, block_report = _quantize_block(
                i, blocks, adapter, recipe, plan, streams, device, storage, report, opener
            )
            if state is not None and plan.ranks.main:
                names = [n.removeprefix(prefix) for n in report.quantized_layers[before:]]
                state.save_block(i, blocks[i], block_report, names)
        return_freed_memory()
        q_stream, fp_hidden = streams.q, streams.fp_next
        bar.set_postfix(block_s=f"{time.perf_counter() - t_block:.1f}", **postfix)


def _capture(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor | None,
    plan: Declared,
    device: torch.device,
    storage: Storage,
    report: PipelineReport,
) -> tuple[Stream | None, list[list[dict[str, Any]]]]:
    """The quantized stream entering block 0, and every block's keyword arguments (none
    for a recipe that reads no data)."""
    if not plan.needs_data:
        return None, []
    if input_ids is None:
        raise ValueError("this recipe needs calibration data")
    with Timer(report, "capture"):
        hidden, block_kwargs = capture_block_inputs(
            model, blocks, input_ids, batch_size=plan.batch_size, device=device, storage=storage
        )
    check_finite_stream(hidden, "entering block 0")
    q_stream = Stream(hidden, block_kwargs[0])
    log.info(
        "captured block-0 inputs: %d windows x %d tokens in %.1fs",
        input_ids.shape[0],
        input_ids.shape[1],
        report.seconds["capture"],
    )
    return q_stream, block_kwargs


def _prepare(
    model: nn.Module,
    adapter: ModelAdapter,
    recipe: Recipe,
    weights: LazyWeights | None,
    state: RunState | None,
) -> None:
    """Read in what lies outside the blocks of a lazily opened model; apply the transforms."""
    if weights is not None:
        if state is None or recipe.transforms:
            raise ValueError("a lazily read model needs a run state and no model transforms")
        weights.materialize(model, skip=adapter.blocks(model))  # embeddings, norm, head
        model.tie_weights()
        check_finite_weights(model)
    for step in recipe.transforms:
        t0 = time.perf_counter()
        step.transform_model(model, adapter)
        log.info("applied the %s transform in %.1fs", step.name, time.perf_counter() - t0)


def _restore_finished(
    state: RunState,
    blocks: nn.ModuleList,
    adapter: ModelAdapter,
    plan: Declared,
    q_stream: Stream | None,
    fp_hidden: list[torch.Tensor] | None,
    block_kwargs: list[list[dict[str, Any]]],
    device: torch.device,
    storage: Storage,
    report: PipelineReport,
    opener: Callable[[int], AbstractContextManager[None]],
) -> tuple[Stream | None, list[torch.Tensor] | None]:
    """Blocks 0..k-1 from ``state``, and the streams entering block k."""
    t0 = time.perf_counter()
    for i in range(state.finished):
        streams = _block_streams(i, q_stream, fp_hidden, block_kwargs)
        with opener(i):
            _restore_block(i, blocks, adapter, plan, streams, device, storage, report, state)
        return_freed_memory()
        q_stream, fp_hidden = streams.q, streams.fp_next
    log.info(
        "resuming %s: blocks 0-%d of %d restored in %.1fs, continuing at block %d",
        state.directory,
        state.finished - 1,
        len(blocks),
        time.perf_counter() - t0,
        state.finished,
    )
    return q_stream, fp_hidden


def _block_streams(
    i: int,
    q_stream: Stream | None,
    fp_hidden: list[torch.Tensor] | None,
    block_kwargs: list[list[dict[str, Any]]],
) -> _Streams:
    kwargs = block_kwargs[i] if block_kwargs else []
    return _Streams(
        None if q_stream is None else Stream(q_stream.hidden, kwargs),
        None if fp_hidden is None else Stream(fp_hidden, kwargs),
        block_kwargs[i + 1] if i + 1 < len(block_kwargs) else None,
    )


@dataclass
class _Streams:
    q: Stream | None  # the block's inputs on the quantized stream; its outputs afterwards
    fp: Stream | None  # its inputs on the FP stream
    next_kwargs: list[dict[str, Any]] | None
    fp_next: list[torch.Tensor] | None = None  # the FP block's outputs


def _quantize_block(
    i: int,
    blocks: nn.ModuleList,
    adapter: ModelAdapter,
    recipe: Recipe,
    plan: Declared,
    streams: _Streams,
    device: torch.device,
    storage: Storage,
    report: PipelineReport,
    opener: Callable[[int], AbstractContextManager[None]],
) -> tuple[dict[str, str], dict[str, Any]]:
    """Quantize block ``i``: the progress-bar fields, and what its hooks reported."""
    block = blocks[i].to(device)
    groups = adapter.linear_groups(block)
    fp_inputs = fp_out = None
    if streams.fp is not None:
        with Timer(report, "forward"), torch.autocast(device.type, torch.bfloat16, plan.fp_low):
            names = [n for group in groups for n, _ in group]
            fp_inputs, fp_out = fp_pass(block, names, streams.fp, device, storage)
    fixed: dict[str, Any] = {}
    progress: dict[str, str] = {}
    block_report: dict[str, Any] = {}
    hooks = [s for s in recipe.steps if s.has_block_hook]
    if hooks:
        assert streams.q is not None and streams.fp is not None
        assert fp_out is not None and fp_inputs is not None
        ctx = block_context(
            i, blocks, block, adapter.linears(block), adapter.arch.rotation, streams.q,
            streams.fp, fp_out, fp_inputs, streams.next_kwargs, device, storage, opener,
            plan.ranks,
        )  # fmt: skip
        with Timer(report, "train"):
            for step in hooks:
                step.process_block(ctx, recipe.steps, recipe.scheme)
        fixed, progress, block_report = ctx.fixed, ctx.progress, dict(ctx.report)
        for key, value in ctx.report.items():
            report.per_block.setdefault(key, []).append(value)
    splitter = next((s for s in recipe.steps if s.splits_input()), None)
    reuse = None
    if plan.reuse_passes:
        names = [n for g in groups for n, _ in g]
        arch = adapter.arch
        reuse = PassReuse(
            block, names, arch.tails, storage, arch.feeds, plan.wide_tails, not adapter.is_generic
        )
    for group in groups:
        stats = None
        if plan.needs_data:
            assert streams.q is not None
            with Timer(report, "forward"):
                stats = group_stats(
                    block, group, streams.q, fp_inputs, plan.stat_names, splitter, device,
                    report.seconds, recipe.scheme.activations, reuse, plan.starved_experts,
                    f"{adapter.block_prefix(i)}.", plan.ranks,
                )  # fmt: skip
            check_finite_stats({n: st.values for n, st in stats.items()}, adapter.block_prefix(i))
        with Timer(report, "solve"):
            solve_group(block, group, stats, recipe, fixed, plan.ranks, report.seconds)
            keep_dense(block, True)  # later groups and the next block's input reuse them
        if reuse is not None:
            reuse.mark_solved(n for n, _ in group)
        report.quantized_layers += [f"{adapter.block_prefix(i)}.{n}" for n, _ in group]
    if streams.q is not None:
        with Timer(report, "forward"):
            if reuse is not None:
                reuse.last_pass = True
            streams.q = streams.q.replaced(run_block(block, streams.q, device, storage, reuse))
        check_finite_stream(streams.q.hidden, f"after block {i}")
    streams.fp_next = fp_out
    keep_dense(block, False)
    check_block_quantized(block, adapter.block_prefix(i))
    blocks[i] = block.to(PARK)
    report.blocks += 1
    return progress, block_report


def _restore_block(
    i: int,
    blocks: nn.ModuleList,
    adapter: ModelAdapter,
    plan: Declared,
    streams: _Streams,
    device: torch.device,
    storage: Storage,
    report: PipelineReport,
    state: RunState,
) -> None:
    """Put back finished block ``i`` from ``state`` and advance the streams past it with the
    same operations :func:`_quantize_block` used, so that what follows is bit-identical."""
    block = blocks[i].to(device)
    fp_out = None
    if streams.fp is not None:
        with torch.autocast(device.type, torch.bfloat16, plan.fp_low):
            _, fp_out = fp_pass(block, [], streams.fp, device, storage)
    restored = state.load_block(i, block)
    if streams.q is not None:
        keep_dense(block, True)
        streams.q = streams.q.replaced(run_block(block, streams.q, device, storage))
    streams.fp_next = fp_out
    keep_dense(block, False)
    blocks[i] = block.to(PARK)
    report.blocks += 1
    report.quantized_layers += [f"{adapter.block_prefix(i)}.{n}" for n in restored.layers]
    for key, value in restored.report.items():
        report.per_block.setdefault(key, []).append(value)
