"""The Python API: ``quantize``, ``save``, ``load``, ``evaluate``."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compensator import __version__
from compensator.data import load_calibration_windows, load_eval_windows
from compensator.errors import CompensatorError
from compensator.evaluate import EvalResult
from compensator.evaluate import evaluate as evaluate_windows
from compensator.io.formats import ExportSource, get_format
from compensator.io.formats import export as export_source
from compensator.io.native import (
    FORMAT_VERSION,
    is_checkpoint,
    load_checkpoint,
    read_quantization_config,
    save_checkpoint,
)
from compensator.models.adapter import get_adapter
from compensator.models.loading import LoadedModel, load_model
from compensator.nn.layers import bits_per_weight
from compensator.pipeline.runner import run_pipeline
from compensator.recipes.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)


@dataclass
class QuantizedModel:
    """A quantized transformers model (block Linears are ``QuantLinear``) and how it was made."""

    model: nn.Module
    tokenizer: Any
    quantization_config: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CompensatorError(
            f"unknown device {device!r}; use cpu, cuda, cuda:N or auto"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CompensatorError(
            f"device {device!r} asked for but CUDA is not available; use --device cpu"
        )
    return dev


def _as_loaded(model: str | nn.Module | LoadedModel, tokenizer: Any) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str | Path):
        return load_model(str(model))
    if tokenizer is None:
        raise CompensatorError(
            "quantize(model_object) needs tokenizer=...; or pass a model name/path"
        )
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or "<in-memory model>"
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def quantize(
    model: str | nn.Module | LoadedModel,
    recipe: str | Path | Recipe = "gptq",
    *,
    tokenizer: Any = None,
    calibration: str | torch.Tensor | None = None,
    calib_windows: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    rank: int | str | None = None,
    act_bits: int | None = None,
    epochs: int | None = None,
    device: str | torch.device | None = "auto",
    batch_size: int = 8,
    inplace: bool = False,
    progress: bool = True,
) -> QuantizedModel:
    """Quantize the Linear layers of the decoder blocks of ``model`` with ``recipe``.

    ``model`` is a built-in name, a path (HF directory or .gguf) or a loaded model (then
    ``tokenizer`` is required; it is copied first unless ``inplace``). ``calibration`` is a
    data source as in :func:`compensator.data.resolve_text` (default: WikiText-2 validation
    when COMPENSATOR_DATA is set, else the embedded corpus), or a LongTensor of token
    windows [n, seqlen] used as is. ``rank`` is a number of components or a share like "30%".
    Touches no process-wide state: every random draw has its own generator, seeded from
    ``seed`` (calibration windows) or from the recipe's steps.
    """
    rec = (
        load_recipe(recipe)
        .with_weights(bits=bits, group_size=group_size, symmetric=symmetric)
        .with_rank(rank)
        .with_act_bits(act_bits)
        .with_epochs(epochs)
    )
    needs_data = rec.needs_data()
    # Check the cheap arguments before loading the model, so bad input fails fast.
    if needs_data and not isinstance(calibration, torch.Tensor):
        if calib_windows < 1:
            raise CompensatorError(f"--calib-windows {calib_windows} is not valid: use >= 1")
        if seqlen < 2:
            raise CompensatorError(f"--seqlen {seqlen} is not valid: use >= 2")
    dev = resolve_device(device)
    loaded = _as_loaded(model, tokenizer)
    net = loaded.model if inplace or isinstance(model, str | Path) else copy.deepcopy(loaded.model)
    net.eval()
    adapter = get_adapter(net)
    input_ids, calib_info = None, None
    if needs_data:
        input_ids, calib_info = _calibration(loaded, calibration, calib_windows, seqlen, seed)
    log.info("recipe %s: %s on %s (%s)", rec.name, rec.label(), loaded.source, dev)
    report = run_pipeline(
        net, adapter, rec, input_ids, device=dev, batch_size=batch_size, progress=progress
    )
    qconfig = _quantization_config(net, rec, report.quantized_layers, loaded.source, calib_info)
    return QuantizedModel(net, loaded.tokenizer, qconfig, report.to_dict())


def _calibration(
    loaded: LoadedModel,
    calibration: str | torch.Tensor | None,
    windows: int,
    seqlen: int,
    seed: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The calibration token windows, and how they were made (for the checkpoint)."""
    if isinstance(calibration, torch.Tensor):
        ids = calibration.long()
        return ids, {"source": "token ids", "windows": ids.shape[0], "seqlen": ids.shape[1]}
    ids = load_calibration_windows(loaded.tokenizer, calibration, windows, seqlen, seed)
    info = {"source": calibration or "default", "windows": windows, "seqlen": seqlen, "seed": seed}
    return ids, info


def _quantization_config(
    net: nn.Module,
    rec: Recipe,
    modules: list[str],
    base_model: str,
    calibration: dict[str, Any] | None,
) -> dict[str, Any]:
    acts = rec.scheme.activations
    return {
        "quant_method": "compensator",
        "format_version": FORMAT_VERSION,
        "compensator_version": __version__,
        "scheme": rec.label(),
        "weights": rec.scheme.weights.model_dump() if rec.rounder.uses_weight_scheme else None,
        "activations": None if acts is None else acts.model_dump(),
        "bits_per_weight": bits_per_weight(net),
        "packing": "int32, little-endian bit stream along the input dimension",
        "modules": modules,
        "layers": {name: net.get_submodule(name).record() for name in modules},
        "base_model": base_model,
        "recipe": rec.to_yaml_dict(),
        "calibration": calibration,
    }


def save(
    qmodel: QuantizedModel,
    out: str | Path,
    *,
    format: str = "native",
    force: bool = False,
    **options: Any,
) -> Path:
    """Write ``qmodel`` to ``out`` as a native checkpoint, or in another registered format
    (``compressed-tensors``, ``gguf``; see compensator.io) with that format's ``options``."""
    if format == "native" and not options:
        return save_checkpoint(
            qmodel.model, qmodel.quantization_config, out, tokenizer=qmodel.tokenizer, force=force
        )
    source = ExportSource(qmodel.model, qmodel.quantization_config, qmodel.tokenizer)
    return export_source(source, out, get_format(format, **options), force=force)


def export(
    checkpoint: str | Path, out: str | Path, *, format: str, force: bool = False, **options: Any
) -> Path:
    """Convert a saved checkpoint to another format (see :func:`save`)."""
    fmt = get_format(format, **options)  # bad options fail before loading anything
    model, tokenizer, _ = load_target(checkpoint, require_checkpoint=True)
    config = read_quantization_config(checkpoint)["quantization_config"]
    return export_source(ExportSource(model, config, tokenizer), out, fmt, force=force)


def load(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    return load_checkpoint(path, device=device)


def load_target(
    target: str | Path, *, require_checkpoint: bool = False
) -> tuple[nn.Module, Any, str | None]:
    """A checkpoint or a plain model: (model, tokenizer, base model recorded by a checkpoint)."""
    if require_checkpoint or is_checkpoint(target):
        qc = read_quantization_config(target)["quantization_config"]
        model = load_checkpoint(target)
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(target))
        except (OSError, ValueError):
            tok = load_model(qc["base_model"]).tokenizer
        return model, tok, qc.get("base_model")
    loaded = load_model(str(target))
    return loaded.model, loaded.tokenizer, None


def evaluate(
    target: str | Path | nn.Module | QuantizedModel,
    *,
    fp: str | Path | nn.Module | None = None,
    tokenizer: Any = None,
    data: str | None = None,
    windows: int | None = None,
    seqlen: int = 512,
    batch_size: int = 1,
    progress: bool = True,
) -> EvalResult:
    """Perplexity (and KL against ``fp`` when given) with the DESIGN protocol.

    For a checkpoint path the FP reference defaults to the base model it records.
    """
    if windows is not None and windows < 1:
        raise CompensatorError(f"--windows {windows} is not valid: use a positive count")
    if seqlen < 2:
        raise CompensatorError(f"--seqlen {seqlen} is not valid: use >= 2")
    base = None
    if isinstance(target, QuantizedModel):
        model, tokenizer = target.model, tokenizer or target.tokenizer
        base = target.quantization_config.get("base_model")
    elif isinstance(target, str | Path):
        model, tok, base = load_target(target)
        tokenizer = tokenizer or tok
    else:
        model = target
    if tokenizer is None:
        raise CompensatorError("evaluate(model_object) needs tokenizer=...")
    fp_model = None
    if isinstance(fp, nn.Module):
        fp_model = fp
    elif fp is not None or base is not None:
        fp_model = load_model(str(fp or base)).model
    ids = load_eval_windows(tokenizer, data, seqlen, windows)
    result = evaluate_windows(
        model, ids, fp_model=fp_model, batch_size=batch_size, progress=progress
    )
    result.bits_per_weight = bits_per_weight(model)
    return result
