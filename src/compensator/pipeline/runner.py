"""The sequential block pipeline.

Capture the inputs of block 0 once. For each block in turn: move it to the work device;
for each group of Linears (true-sequential order: q/k/v, then o, then gate/up, then down)
collect input statistics on the quantized stream (and on the FP stream when a step asks),
round the group's Linears into ``QuantLinear`` modules, so that later groups see the
already-quantized outputs; then run the quantized block on the quantized stream to feed the
next block (and the FP block on the FP stream when one is kept); move the block back.

Peak memory is one block plus the activation streams, whatever the number of blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compensator.correctors.lowrank import LowRank
from compensator.learn.blockwise import BlockInputs, learn_block
from compensator.learn.learners import Fixed
from compensator.models.adapter import ModelAdapter
from compensator.nn.quant_linear import QuantLinear, replace_module
from compensator.nn.rotated import input_rotation, rotate_input
from compensator.nn.vq_linear import VQLinear
from compensator.pipeline.stats import LinearStats, StatsAccumulator
from compensator.pipeline.streams import (
    Stream,
    capture_block_inputs,
    capture_linear_inputs,
    run_block,
)
from compensator.quant.act import ActSpec
from compensator.quant.spec import QuantizedWeight, QuantParams
from compensator.quant.vq import VQWeight
from compensator.recipes.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class PipelineReport:
    """Where the time went: ``forward`` is calibration forward passes (``statistics``, the
    accumulation of X^T X and friends, is counted apart), ``solve`` the rounding maths."""

    seconds: dict[str, float] = field(
        default_factory=lambda: {
            "capture": 0.0,
            "forward": 0.0,
            "statistics": 0.0,
            "solve": 0.0,
            "train": 0.0,
            "total": 0.0,
        }
    )
    blocks: int = 0
    train: list[dict[str, Any]] = field(default_factory=list)  # per block, learned recipes
    quantized_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        seconds = dict(self.seconds)
        seconds["forward"] -= seconds["statistics"]  # timed nested inside the passes
        out: dict[str, Any] = {
            "seconds": seconds,
            "blocks": self.blocks,
            "layers": len(self.quantized_layers),
        }
        if self.train:
            out["train"] = self.train
        return out


class _Timer:
    def __init__(self, report: PipelineReport, key: str) -> None:
        self.report, self.key = report, key

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.report.seconds[self.key] += time.perf_counter() - self.t0


def _fp_pass(
    block: nn.Module, names: list[str], stream: Stream, device: torch.device, storage: torch.device
) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Run the still-FP block on the FP stream: its outputs, and every Linear's input.

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
                    stored[id(x)] = x.to(storage)
            inputs.append({n: stored[id(x)] for n, x in seen.items()})
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


def _collect_group_stats(
    block: nn.Module,
    names: list[str],
    q_stream: Stream,
    fp_inputs: list[dict[str, torch.Tensor]] | None,
    stat_names: set[str],
    device: torch.device,
    report: PipelineReport,
    act: ActSpec | None = None,
    bases: dict[str, torch.Tensor | None] | None = None,
) -> dict[str, LinearStats]:
    """Statistics of each named Linear's input over all calibration batches.

    Linears that receive the very same input tensor (q/k/v, gate/up) share one accumulator,
    so X^T X is computed once per distinct input (and split basis, when given).
    """

    def basis(name: str) -> torch.Tensor | None:
        return None if bases is None else bases.get(name)

    acc: dict[str, StatsAccumulator] = {}
    for b, (hidden, kwargs) in enumerate(zip(q_stream.hidden, q_stream.kwargs, strict=True)):
        xs = capture_linear_inputs(block, names, hidden, kwargs, device)
        if b == 0:
            first_owner: dict[tuple[int, int], str] = {}
            for n in names:
                owner = first_owner.setdefault((id(xs[n]), id(basis(n))), n)
                if owner == n:
                    d = xs[n].shape[-1]
                    acc[n] = StatsAccumulator(stat_names, d, xs[n].device, act, basis(n))
                else:
                    acc[n] = acc[owner]
        done: set[int] = set()
        for n in names:
            if id(acc[n]) in done:
                continue
            done.add(id(acc[n]))
            x_fp = fp_inputs[b][n].to(device) if fp_inputs is not None else None
            t0 = time.perf_counter()
            acc[n].update(xs[n], x_fp)
            report.seconds["statistics"] += time.perf_counter() - t0
    finals: dict[int, LinearStats] = {}
    for a in acc.values():
        if id(a) not in finals:
            finals[id(a)] = a.finalize()
    return {n: finals[id(a)] for n, a in acc.items()}


def _input_bases(
    block: nn.Module,
    group: list[tuple[str, nn.Linear]],
    q_stream: Stream,
    recipe: Recipe,
    device: torch.device,
    report: PipelineReport,
) -> tuple[dict[str, torch.Tensor | None], dict[str, LinearStats]] | None:
    """Each Linear's split basis (LRC's split input) and the Hessian statistics it came from,
    from one extra pass; None when no step splits its input. Same input and shape: the same
    basis."""
    splitter = next((c for c in recipe.correctors if c.split_input()), None)
    if splitter is None:
        return None
    names = [n for n, _ in group]
    hessians = _collect_group_stats(block, names, q_stream, None, {"hessian"}, device, report)
    memo: dict[tuple[int, tuple[int, int]], torch.Tensor | None] = {}
    bases: dict[str, torch.Tensor | None] = {}
    for name, linear in group:
        shape = (linear.out_features, linear.in_features)
        key = (id(hessians[name]), shape)
        if key not in memo:
            hessian = hessians[name].hessian
            assert hessian is not None
            memo[key] = splitter.input_basis(shape, hessian)
        bases[name] = memo[key]
    return bases, hessians


def _fast_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _shared_input_sets(
    group: list[tuple[str, nn.Linear]],
    stats: dict[str, LinearStats] | None,
    stackable: bool,
) -> list[list[tuple[str, nn.Linear]]]:
    """The group's Linears, those sharing one statistics object (same input) together."""
    if stats is None or not stackable:
        return [[member] for member in group]
    sets: dict[int, list[tuple[str, nn.Linear]]] = {}
    for name, linear in group:
        sets.setdefault(id(stats[name]), []).append((name, linear))
    return list(sets.values())


def _stacked_params(params: list[Fixed | None]) -> Fixed | None:
    """Learned group parameters of Linears rounded as one stacked matrix (rows concatenated)."""
    if all(p is None for p in params):
        return None
    if len(params) == 1:
        return params[0]
    uniform = [p for p in params if isinstance(p, QuantParams)]
    if len(uniform) != len(params):
        raise ValueError("learned parameters must cover every Linear sharing an input")
    return QuantParams(torch.cat([p.scale for p in uniform]), torch.cat([p.zero for p in uniform]))


def _round_group(
    block: nn.Module,
    group: list[tuple[str, nn.Linear]],
    stats: dict[str, LinearStats] | None,
    recipe: Recipe,
    learned: dict[str, Fixed | None] | None = None,
) -> None:
    rounder, correctors = recipe.rounder, recipe.correctors
    spec = recipe.scheme.weights
    joint = next((c for c in correctors if c.joint), None)
    rounded: dict[str, QuantizedWeight | VQWeight] = {}
    lowranks: dict[str, LowRank | None] = {}
    if joint is not None:  # it chooses both, one Linear at a time
        for name, linear in group:
            layer_stats = None if stats is None else stats[name]
            rounded[name], lowranks[name] = joint.refine(
                linear.weight.data, layer_stats, spec, rounder
            )
    else:
        for members in _shared_input_sets(group, stats, rounder.rows_independent):
            weights = [linear.weight.data for _, linear in members]
            layer_stats = None if stats is None else stats[members[0][0]]
            params = _stacked_params([(learned or {}).get(n) for n, _ in members])
            qw = rounder.round(
                torch.cat(weights) if len(weights) > 1 else weights[0],
                layer_stats,
                spec,
                **({} if params is None else {"params": params}),
            )
            if len(members) == 1:
                rounded[members[0][0]] = qw
                continue
            start = 0
            for (name, _), w in zip(members, weights, strict=True):
                rounded[name] = qw.rows(start, start + w.shape[0])
                start += w.shape[0]
        for name, linear in group:
            layer_stats = None if stats is None else stats[name]
            lowranks[name] = None
            for step in correctors:  # the recipe allows one for now
                lowranks[name] = step.correct(
                    linear.weight.data, rounded[name].dequantize(), layer_stats
                )
    for name, linear in group:
        bias = None if linear.bias is None else linear.bias.data
        r = rounded[name]
        layer: nn.Module
        if isinstance(r, VQWeight):  # the recipe validator keeps correctors off VQ
            layer = VQLinear.from_vq(
                r, bias, act_spec=recipe.scheme.activations, rotation=input_rotation(linear)
            )
        else:
            layer = QuantLinear.from_quantized(
                r,
                bias,
                lowrank=lowranks[name],
                act_spec=recipe.scheme.activations,
                lowrank_raw=recipe.lowrank_input == "raw",
                lowrank_split=recipe.lowrank_input == "split",
                rotation=input_rotation(linear),
            )
        replace_module(block, name, layer)


def run_pipeline(
    model: nn.Module,
    adapter: ModelAdapter,
    recipe: Recipe,
    input_ids: torch.Tensor | None,
    *,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
) -> PipelineReport:
    """Quantize ``model`` in place: its block Linears become ``QuantLinear`` modules."""
    report = PipelineReport()
    t_start = time.perf_counter()
    for step in recipe.transforms:
        t0 = time.perf_counter()
        step.transform_model(model, adapter)
        log.info("applied the %s transform in %.1fs", step.name, time.perf_counter() - t0)
    blocks = adapter.blocks(model)
    stat_names = set().union(*(s.stats() for s in recipe.steps))
    fp_steps = [s for s in recipe.steps if s.needs_fp_stream()]
    keep_fp = bool(fp_steps)
    fp_low = keep_fp and all(s.fp_stream_low_precision() for s in fp_steps)
    if fp_low and not _fast_bfloat16(device):
        log.warning(
            "the recipe computes the FP stream in bfloat16, which this %s has no fast "
            "matrix units for; set fp_precision: float32 in its gptq step if it is slow",
            device.type,
        )
    needs_data = bool(stat_names) or keep_fp
    storage = torch.device("cpu")
    learners = recipe.learners
    if learners:  # one stored calibration batch is one optimizer step
        batch_size = recipe.trainer.batch_size

    q_stream = fp_stream = None
    block_kwargs: list[list[dict[str, Any]]] = []
    if needs_data:
        if input_ids is None:
            raise ValueError("this recipe needs calibration data")
        with _Timer(report, "capture"):
            hidden, block_kwargs = capture_block_inputs(
                model, blocks, input_ids, batch_size=batch_size, device=device, storage=storage
            )
        q_stream = Stream(hidden, block_kwargs[0])
        # Measured: feeding D from half of the batches cost 7.8 ppl at W3 (GPTQ-exact 59.5 ->
        # 67.3), so the FP stream always carries every batch.
        fp_stream = q_stream if keep_fp else None
        log.info(
            "captured block-0 inputs: %d windows x %d tokens in %.1fs",
            input_ids.shape[0],
            input_ids.shape[1],
            report.seconds["capture"],
        )

    bar = tqdm(range(len(blocks)), desc="quantizing blocks", unit="block", disable=not progress)
    for i in bar:
        t_block = time.perf_counter()
        block = blocks[i].to(device)
        if q_stream is not None:
            q_stream = Stream(q_stream.hidden, block_kwargs[i])
        if fp_stream is not None:
            fp_stream = Stream(fp_stream.hidden, block_kwargs[i])
        groups = adapter.linear_groups(block)
        fp_inputs = fp_out = None
        if fp_stream is not None:
            with _Timer(report, "forward"):
                all_names = [n for group in groups for n, _ in group]
                autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=fp_low)
                with autocast:
                    fp_inputs, fp_out = _fp_pass(block, all_names, fp_stream, device, storage)
        learned = None
        if learners:
            assert fp_stream is not None and fp_out is not None and fp_inputs is not None
            with _Timer(report, "train"):
                nxt = block_kwargs[i + 1] if i + 1 < len(blocks) else None
                inputs = BlockInputs(q_stream, fp_stream, fp_out, fp_inputs, nxt)
                learned, trained = learn_block(
                    block, i, blocks, adapter, recipe, inputs, device, storage
                )
            report.train.append(
                {
                    "block": i,
                    "seconds": trained.seconds,
                    "initial_loss": trained.initial_loss,
                    "final_loss": trained.final_loss,
                }
            )
        for group in groups:
            stats = None
            if needs_data:
                with _Timer(report, "forward"):
                    names = [n for n, _ in group]
                    split = _input_bases(block, group, q_stream, recipe, device, report)
                    stats = _collect_group_stats(
                        block,
                        names,
                        q_stream,
                        fp_inputs,
                        stat_names if split is None else stat_names - {"hessian"},
                        device,
                        report,
                        recipe.scheme.activations,
                        None if split is None else split[0],
                    )
                    if split is not None and "hessian" in stat_names:  # taken by the first pass
                        for name, s in stats.items():
                            s.values["hessian"] = split[1][name].values["hessian"]
            with _Timer(report, "solve"):
                _round_group(block, group, stats, recipe, learned)
            report.quantized_layers += [f"{adapter.block_prefix(i)}.{n}" for n, _ in group]
        if needs_data:
            with _Timer(report, "forward"):
                q_stream = q_stream.replaced(run_block(block, q_stream, device, storage))
        if fp_stream is not None and fp_out is not None:
            fp_stream = fp_stream.replaced(fp_out)
        blocks[i] = block.to(storage)
        del fp_inputs
        report.blocks += 1
        dt = time.perf_counter() - t_block
        if report.train and report.train[-1]["block"] == i:
            t = report.train[-1]
            bar.set_postfix(
                block_s=f"{dt:.1f}", loss=f"{t['initial_loss']:.3g}->{t['final_loss']:.3g}"
            )
        else:
            bar.set_postfix(block_s=f"{dt:.1f}")
        log.debug("block %d quantized in %.2fs", i, dt)
    report.seconds["total"] = time.perf_counter() - t_start
    log.info(
        "quantized %d layers in %d blocks in %.1fs (capture %.1fs, forward passes %.1fs, "
        "statistics %.1fs, training %.1fs, rounding maths %.1fs)",
        len(report.quantized_layers),
        report.blocks,
        report.seconds["total"],
        report.seconds["capture"],
        report.seconds["forward"] - report.seconds["statistics"],
        report.seconds["statistics"],
        report.seconds["train"],
        report.seconds["solve"],
    )
    return report
