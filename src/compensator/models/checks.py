"""Checks of a loaded model against what will be fed to it: one clear line, not an error
from deep inside a rounder ("codes out of range") or an embedding lookup (IndexError)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compensator.errors import CompensatorError
from compensator.models.adapter import ModelAdapter

log = logging.getLogger(__name__)


def all_finite(t: torch.Tensor) -> bool:
    """Whether no element is NaN or Inf. A sum is finite when its terms are, so one reduction
    answers (instead of an elementwise mask); only a non-finite sum, which finite terms can
    also give by summing past float32's 3e38, is checked element by element."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(t.sum(dtype=acc))) or bool(torch.isfinite(t).all())


def check_finite_weights(model: nn.Module, prefix: str = "") -> None:
    """Refuse a model with NaN or Inf in any parameter, naming the first such tensor (those
    not read yet, on the meta device, are checked when they are)."""
    for local, p in model.named_parameters():
        name = prefix + local
        if p.is_floating_point() and not p.is_meta and not all_finite(p):
            bad = int((~torch.isfinite(p)).sum())
            raise CompensatorError(
                f"{name} holds {bad} NaN/Inf values: the model is damaged (or was saved in a "
                "precision that overflowed); repair or re-export it before quantizing"
            )


def check_token_ids(ids: torch.Tensor, model: nn.Module, what: str) -> None:
    """Refuse token ids the model's embedding has no row for (a tokenizer of another model)."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    if rows is not None and ids.numel() and int(ids.max()) >= rows:
        raise CompensatorError(
            f"the tokenizer gives token id {int(ids.max())} in the {what}, but the model's "
            f"embedding has only {rows} rows: the tokenizer does not belong to this model"
        )


def check_finite_stream(hidden: list[torch.Tensor], where: str) -> None:
    """Refuse calibration activations with NaN/Inf (they would poison every statistic)."""
    for h in hidden:
        if not all_finite(h):
            raise CompensatorError(
                f"the calibration activations {where} hold NaN/Inf values (the model overflows "
                "on this data in this precision); check the model in float32 on the same text"
            )


def check_finite_stats(values: dict[str, dict[str, torch.Tensor]], prefix: str) -> None:
    """Refuse statistics with NaN/Inf (inputs that overflow), naming the Linear."""
    for name, stats in values.items():
        bad = [k for k, v in stats.items() if not all_finite(v)]
        if bad:
            raise CompensatorError(
                f"the inputs of {prefix}.{name} overflow on the calibration data ({bad[0]} "
                "holds NaN/Inf): the model's activations there exceed float32; check its "
                "weights (norm scales) and the data"
            )


def check_seqlen(seqlen: int, model: nn.Module) -> None:
    """Refuse windows longer than the model's context (learned positions would index past
    their table; rotary ones give numbers the model was never trained for)."""
    check_seqlen_within(
        seqlen, getattr(getattr(model, "config", None), "max_position_embeddings", None)
    )


def check_seqlen_within(seqlen: int, context: Any) -> None:
    """:func:`check_seqlen` for a context read off a config."""
    if isinstance(context, int) and seqlen > context:
        raise CompensatorError(
            f"--seqlen {seqlen} is beyond the model's context ({context} positions): use at "
            f"most {context}"
        )


def check_group_size(group_size: int | None) -> None:
    if group_size is not None and 1 <= group_size < 8:
        raise CompensatorError(
            f"--group-size {group_size} stores a scale (and a zero) for every {group_size} "
            "weights, more bits than the weights themselves: use 32-128, or -1 for one group "
            "per output channel"
        )


def check_scheme_fits(
    net: nn.Module, adapter: ModelAdapter, rank: int | str | None, group_size: int | None
) -> None:
    """Refuse an explicit ``rank`` no layer can hold; warn when groups are wider than every
    layer."""
    widths = [
        (n, m.out_features, m.in_features)
        for n, m in net.named_modules()
        if isinstance(m, nn.Linear) and n.startswith(f"{adapter.arch.blocks}.")
    ]
    if not widths:
        return
    if isinstance(rank, int):
        name, out_f, in_f = min(widths, key=lambda w: min(w[1], w[2]))
        if rank > min(out_f, in_f):
            raise CompensatorError(
                f"--rank {rank} is larger than {name} ({out_f} x {in_f}) can hold: use at "
                f"most {min(out_f, in_f)} components, or a share like 30%"
            )
    widest = max(w[2] for w in widths)
    if group_size is not None and group_size > widest:
        log.warning(
            "--group-size %d is wider than every layer (at most %d inputs): each row is one "
            "group (as -1, per channel)",
            group_size,
            widest,
        )


def fused_left(prefix: str, name: str, module: nn.Module, pname: str, p: nn.Parameter) -> str:
    shape = " x ".join(map(str, p.shape))
    where = ".".join(x for x in (prefix, name, pname) if x)
    return (
        f"{where} ({type(module).__name__}, {shape}) would be left in full precision: a "
        "fused experts layout compensator cannot split into Linears; report the model family"
    )


def left_fused(module: nn.Module) -> bool:
    """Whether ``module`` holds weights of 3+ dimensions that are not a convolution's: the
    fused experts of a layout that was not split into Linears."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    return any(p.ndim >= 3 for p in module.parameters(recurse=False))


def check_no_fused_weights(blocks: nn.Module, prefix: str) -> None:
    """Refuse, before any work, decoder blocks that hold fused expert weights left after
    :func:`compensator.nn.experts.unfuse_experts` (nothing could quantize them)."""
    for name, module in blocks.named_modules():
        if left_fused(module):
            pname, p = next(
                (n, p) for n, p in module.named_parameters(recurse=False) if p.ndim >= 3
            )
            raise CompensatorError(fused_left(prefix, name, module, pname, p))


def check_experts_recipe(recipe: Any, experts: list[str]) -> None:
    """Refuse recipes a mixture-of-experts model cannot run yet, before any work.

    Steps that compare the FP and the quantized input of a Linear token by token (GPTAQ's
    cross terms, learned block losses) have no such pairs for an expert: the two streams
    route different tokens to it."""
    fp = [s.name for s in recipe.steps if s.needs_fp_stream()]
    if fp:
        raise CompensatorError(
            f"recipe {recipe.name!r} ({', '.join(fp)}) compares FP and quantized inputs token "
            f"by token, which routed experts ({experts[0]} and {len(experts) - 1} more) do not "
            "have: the streams route different tokens; use gptq, gptq-l2qer, rtn or hqq"
        )


def check_calibration_size(windows: int, seqlen: int) -> None:
    if windows < 1:
        raise CompensatorError(f"--calib-windows {windows} is not valid: use >= 1")
    if seqlen < 2:
        raise CompensatorError(f"--seqlen {seqlen} is not valid: use >= 2")


# What a reference must share with the model it is compared to, token by token.
_SAME_AS_REFERENCE = (
    ("model_type", "model family"),
    ("vocab_size", "vocabulary size"),
    ("hidden_size", "hidden size"),
    ("num_hidden_layers", "number of layers"),
    ("intermediate_size", "MLP width"),
)


def check_reference(model: nn.Module, reference: nn.Module, name: object) -> None:
    """Refuse an FP reference that is not the same model as ``model`` (another family,
    vocabulary or shape): a KL between two different models' distributions means nothing,
    and another vocabulary would fail deep in the comparison."""
    ours, theirs = getattr(model, "config", None), getattr(reference, "config", None)
    if ours is None or theirs is None:
        return
    name = name if isinstance(name, str | Path) else "given as fp"
    for key, what in _SAME_AS_REFERENCE:
        a, b = getattr(ours, key, None), getattr(theirs, key, None)
        if a is not None and b is not None and a != b:
            raise CompensatorError(
                f"the FP reference {name} has {what} {b!r}, the model evaluated {a!r}: it is "
                "not this model's base; pass its own FP model with --fp"
            )


# GGUF tensor types that hold full-precision weights.
_FP_GGUF_TYPES = {"F32", "F16", "BF16", "F64"}


def check_not_quantized(model: str, builtin: bool) -> None:
    """Refuse a model directory that is already quantized (its config declares a
    quantization_config: a compressed-tensors, GPTQ or AWQ export); warn for a GGUF whose
    weights are quantized types, which load dequantized: the result carries both roundings.
    The built-in model is a Q4_1 GGUF on purpose (the smallest file to bundle)."""
    from compensator.models.loading import gguf_source

    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        try:
            method = (json.loads(config.read_text()).get("quantization_config") or {}).get(
                "quant_method"
            )
        except (OSError, ValueError, AttributeError):
            return  # the loader says what is wrong with it
        if method and method != "compensator":  # ours: the loader names compensator.load
            raise CompensatorError(
                f"'{model}' is already quantized ({method}); quantizing it again rounds rounded "
                "weights: pass the full-precision model it was made from"
            )
    gguf_file = None if builtin else gguf_source(model)
    if gguf_file is not None:
        types = _gguf_weight_types(gguf_file) - _FP_GGUF_TYPES
        if types:
            log.warning(
                "%s holds %s-quantized weights: they are dequantized and quantized again, and "
                "the result carries both roundings; quantize its F16/F32 GGUF or safetensors "
                "model if you have it",
                model,
                "/".join(sorted(types)),
            )


def _gguf_weight_types(path: Path) -> set[str]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception:  # a damaged file: the loader's error says so
        return set()
    return {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.")
            and len(t.shape) == 2}  # fmt: skip
