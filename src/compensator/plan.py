"""``compensator plan``: the peak memory, disk and rough time of a quantize run, from the
model's config alone (config.json, or a GGUF's header): nothing is loaded.

Memory follows :mod:`compensator.pipeline.footprint`; time scales per-block costs measured
on this project's 2-thread CPU machine (``benchmarks/plan.py`` measures them, and checks
the predicted peak against quantize runs) by each model's arithmetic: forward passes by
tokens x block FLOPs, statistics by tokens x input width squared, GPTQ's rounding by
columns (its per-column loop) and by out x in^2 FLOPs. The GPU column has no time: no GPU
run has been measured yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compensator.errors import CompensatorError
from compensator.models.checks import check_calibration_size, check_seqlen_within
from compensator.models.dtypes import config_dtype, dtype_name, parse_dtype
from compensator.pipeline.exchange import exchange
from compensator.pipeline.footprint import (
    ModelShape,
    RunShape,
    checkpoint_bytes,
    resident_weights,
    stream_bytes,
    working_set,
)
from compensator.recipes.recipe import Recipe

# What a quantize process holds besides the model: torch, transformers and compensator
# imported (410 MB measured here), the tokenizer and the tokenized calibration text (+70 MB
# after a 145 MB transient), the model's skeleton (+40 MB); and a CUDA context on a GPU.
PROCESS_BASE = 520e6
CUDA_CONTEXT = 600e6


@dataclass(frozen=True)
class CpuRates:
    """Per-block costs on 2 CPU threads, measured by ``benchmarks/plan.py`` (2026-12-07, an
    Intel Xeon with AVX-512 and AMX; results/plan.json): GPTQ on bare matrices at 256 and 2048
    columns, a plain forward of SmolLM2's blocks, and the passes and statistics of its GPTQ run
    at 32 x 512."""

    forward_flops_s: float = 3.46e11  # block forward, FLOP/s
    statistics_flops_s: float = 6.38e11  # X^T X accumulation (counted as the full product)
    solve_column_s: float = 9.5e-6  # GPTQ: per column of every Linear (the compiled loop)
    solve_flops_s: float = 1.58e11  # GPTQ: the out x in^2 and in^3 products, FLOP/s
    passes_gptq: float = 1.59  # block forwards per block and token, true-sequential GPTQ
    passes_fp: float = 0.44  # more of them when a step reads the FP stream (its FP pass, in
    # bfloat16 with AMX: results/passes.md, gptaq-exact's forwards 5.9 s against GPTQ's 4.6 s)
    train_passes_per_epoch: float = 3.0  # forward + backward of the block trainer


def read_config(model: str) -> tuple[dict[str, Any], bool]:
    """The config of ``model`` (a directory, a config.json, a .gguf or a built-in name) and
    whether the pipeline can read its weights block by block."""
    from compensator.models.loading import gguf_source

    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file() and path.suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8")), True
        except (OSError, ValueError) as err:
            raise CompensatorError(f"cannot read '{path}': {err}") from None
    gguf = gguf_source(model)
    if gguf is not None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict(), True
    raise CompensatorError(
        f"plan reads a local config: '{model}' is not a directory with config.json, a "
        "config.json, a .gguf file or a built-in model"
    )


def run_shape(
    recipe: Recipe, windows: int, seqlen: int, batch_size: int, lazy: bool, itemsize: int = 4
) -> RunShape:
    from compensator.pipeline.stats import STATISTICS, AbsMean
    from compensator.quant.kquant import BITS_PER_WEIGHT

    gram = [n for n in recipe.stats() if not issubclass(STATISTICS[n], AbsMean)]
    spec = recipe.scheme.weights
    group = spec.group_size or 4096
    zero_bits = 16 if spec.float_min else (0 if spec.symmetric else spec.bits)
    bpw = spec.bits + (16 + zero_bits) / group
    if spec.kquant is not None:
        bpw = BITS_PER_WEIGHT[spec.kquant]
    return RunShape(
        windows=windows,
        seqlen=seqlen,
        batch_size=batch_size,
        keep_fp=any(s.needs_fp_stream() for s in recipe.steps),
        statistics=max(len(gram), 1),
        learned=any(s.has_block_hook for s in recipe.steps),
        epochs=int(getattr(recipe.trainer, "epochs", 0) or 0),
        bits_per_weight=bpw,
        weight_itemsize=itemsize,
        stream_itemsize=itemsize,
        lazy=lazy and not recipe.transforms,
    )


def estimate(shape: ModelShape, run: RunShape, rates: CpuRates = CpuRates()) -> dict[str, Any]:
    """Peak bytes per device kind (with their parts), disk bytes, and CPU seconds."""
    work = working_set(shape, run)
    resident = resident_weights(shape, run)
    in_model = 0 if run.lazy else work["block weights"]  # a whole model holds its blocks
    cpu = PROCESS_BASE + resident + sum(work.values()) - in_model
    on_gpu = {k: v for k, v in work.items() if k != "calibration streams"}
    gpu = CUDA_CONTEXT + sum(on_gpu.values())
    ckpt = checkpoint_bytes(shape, run)
    parts = {"process": PROCESS_BASE, "resident weights": resident} | work
    streams = work["calibration streams"]
    wide = stream_bytes(shape, run.tokens, run.keep_fp, run.reuse, run.stream_itemsize, wide=True)
    return {
        "mlp_input_if_room": wide - streams,
        "cpu": {"peak": cpu, "parts": parts},
        "cuda": {
            "peak": gpu + streams,
            "peak_streams_on_cpu": gpu,
            "host": PROCESS_BASE + resident + streams,
        },
        "disk": {"checkpoint": ckpt, "peak": 2 * ckpt, "streams_if_offloaded": streams},
        "seconds": cpu_seconds(shape, run, rates),
    }


def cpu_seconds(shape: ModelShape, run: RunShape, rates: CpuRates) -> dict[str, float]:
    out = {"forward": 0.0, "statistics": 0.0, "rounding": 0.0, "training": 0.0}
    passes = rates.passes_gptq + (rates.passes_fp if run.keep_fp else 0)
    moe_blocks = shape.moe_blocks()
    for moe, count in ((True, moe_blocks), (False, shape.layers - moe_blocks)):
        if not count:
            continue
        groups = shape.groups(moe)
        active = shape.linear_params(False) if not moe else _active_params(shape)
        attention = 4 * run.seqlen * shape.heads * shape.head_dim
        fwd = run.tokens * (2 * active + attention) / rates.forward_flops_s
        out["forward"] += count * passes * fwd
        # Experts see their routed share of the tokens.
        share = [
            (shape.experts_per_token / shape.experts if n > 1 else 1.0) for (_, _), n in groups
        ]
        out["statistics"] += count * sum(
            n * s * run.tokens * 2 * i * i * run.statistics / rates.statistics_flops_s
            for ((i, _), n), s in zip(groups, share, strict=True)
        )
        out["rounding"] += count * sum(
            n * len(outs) * (i * rates.solve_column_s)
            + n * (2 * sum(outs) * i * i + len(outs) * i**3) / rates.solve_flops_s
            for (i, outs), n in groups
        )
        if run.learned:
            out["training"] += count * run.epochs * rates.train_passes_per_epoch * fwd
    out["total"] = sum(out.values())
    return out


def _active_params(shape: ModelShape) -> int:
    """Linear weights one token passes through in an MoE block (attention, its experts)."""
    d, fe = shape.hidden, shape.expert_intermediate
    attn = shape.linear_params(False) - 3 * d * shape.intermediate
    return attn + shape.experts_per_token * 3 * d * fe + 3 * d * shape.shared_intermediate


def plan(
    model: str,
    recipe: Recipe,
    windows: int,
    seqlen: int,
    batch_size: int = 8,
    whole: bool = False,
    ranks: int = 1,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The plan of quantizing ``model`` with ``recipe`` (:func:`estimate`, with what it
    assumed) in ``dtype`` (as ``quantize --dtype``; its time is float32's). Over ``ranks``
    data-parallel ranks: each rank's memory (it holds its share of the windows) and what the
    ranks exchange per block (:func:`exchange`)."""
    if recipe.needs_data():  # what quantize refuses, plan refuses
        check_calibration_size(windows, seqlen)
    config, lazy = read_config(model)
    if recipe.needs_data():
        check_seqlen_within(seqlen, config.get("max_position_embeddings"))
    work = parse_dtype(dtype) or config_dtype(config)
    try:
        shape = ModelShape.from_config(config)
    except (KeyError, TypeError, ValueError) as err:
        raise CompensatorError(
            f"'{model}': its config lacks {err} (plan reads hidden_size, num_hidden_layers, "
            "num_attention_heads, vocab_size and the like)"
        ) from None
    run = run_shape(
        recipe, max(windows // ranks, 1), seqlen, batch_size, lazy and not whole, work.itemsize
    )
    out = {
        "model": model,
        "recipe": recipe.name or "custom",
        "scheme": recipe.label(),
        "calibration": f"{windows} x {seqlen}",
        "read": "block by block" if run.lazy else "whole",
        "dtype": dtype_name(work),
        "params": shape.outside_params() + shape.blocks_params(),
        **estimate(shape, run),
    }
    if ranks > 1:
        x = out["ranks"] = exchange(shape, run, ranks, recipe.scheme.weights.group_size)
        sec = out["seconds"]  # forward passes and statistics already see 1/ranks of the tokens
        sec["rounding"] /= x["rounding_speedup"]
        sec["total"] = sum(v for k, v in sec.items() if k != "total")
    return out


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x < 100e9 else f"{x / 1e9:.0f} GB"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def format_plan(p: dict[str, Any]) -> str:
    cpu, cuda, disk, sec = p["cpu"], p["cuda"], p["disk"], p["seconds"]
    biggest = sorted(cpu["parts"].items(), key=lambda kv: -kv[1])[:4]
    parts = ", ".join(f"{k} {_gb(v)}" for k, v in biggest)
    lines = [
        f"plan: {p['model']} ({p['params'] / 1e9:.2f}B params), {p['recipe']} {p['scheme']}, "
        f"calibration {p['calibration']}, weights read {p['read']}, in {p['dtype']}",
        f"  CPU work device   peak RSS {_gb(cpu['peak'])}  (largest: {parts})",
        f"  CUDA work device  peak GPU memory {_gb(cuda['peak'])} with streams on the GPU, "
        f"{_gb(cuda['peak_streams_on_cpu'])} with --streams cpu; host RSS {_gb(cuda['host'])}",
        f"  disk              {_gb(disk['peak'])} at the peak (checkpoint {_gb(disk['checkpoint'])}"
        f" + the finished blocks until it is assembled); --streams disk adds "
        f"{_gb(disk['streams_if_offloaded'])}",
        f"  time (2 CPU threads, rough)  {_duration(sec['total'])}: forward passes "
        f"{_duration(sec['forward'])}, statistics {_duration(sec['statistics'])}, rounding "
        f"{_duration(sec['rounding'])}"
        + (f", training {_duration(sec['training'])}" if sec["training"] else ""),
    ]
    if p.get("mlp_input_if_room"):
        lines.append(
            f"  where {_gb(p['mlp_input_if_room'])} more fits beside the streams, pass reuse "
            "keeps down_proj's input and the output pass skips gate/up"
        )
    if "ranks" in p:
        x = p["ranks"]
        lines += [
            f"  over {x['ranks']} ranks (memory above: per rank, its 1/{x['ranks']} of the "
            f"windows)  per block: all-reduce {_gb(x['all_reduce_bytes_per_block'])} of "
            f"statistics ({_gb(x['all_reduce_traffic_per_rank'])} sent per rank), broadcast "
            f"{_gb(x['broadcast_bytes_per_block'])} of rounded weights; rounding "
            f"{x['rounding_speedup']:.2f}x faster than on one rank",
        ]
    return "\n".join(lines)
