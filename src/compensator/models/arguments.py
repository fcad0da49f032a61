"""The public calls' arguments, checked for type and range before anything is loaded: the
Python API then says what the command line says (one line naming the argument), instead of
a TypeError or OverflowError from deep inside a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compensator.errors import CompensatorError
from compensator.models.checks import check_group_size

# Integer arguments, by the name the CLI gives them.
_INTEGERS = {
    "calib_windows": "--calib-windows",
    "seqlen": "--seqlen",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "bits": "--bits",
    "group_size": "--group-size",
    "act_bits": "--act-bits",
    "epochs": "--epochs",
    "windows": "--windows",
    "limit": "--limit",
}
# Beyond these a value cannot be held by the int64 tensors and generators it ends up in.
_RANGES = {"seed": (-(2**63), 2**63 - 1), "group_size": (-1, 2**31 - 1)}
_PATHS = {"out": "the output path", "path": "the checkpoint path", "checkpoint": "the checkpoint"}


def check_arguments(args: dict[str, Any]) -> None:
    """Check the arguments of a public call (its ``locals()`` on entry) that it has."""
    for name, flag in _INTEGERS.items():
        value = args.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise CompensatorError(f"{name}={value!r} is not a whole number ({flag}): pass an int")
        low, high = _RANGES.get(name, (None, None))
        if low is not None and not low <= value <= high:
            raise CompensatorError(f"{flag} {value} is out of range: use {low} to {high}")
    check_group_size(args.get("group_size"))
    for name, what in _PATHS.items():
        if name in args and not isinstance(args[name], str | Path):
            raise CompensatorError(f"{what} must be a str or Path, not {type(args[name]).__name__}")
    _check_objects(args)


def _check_objects(args: dict[str, Any]) -> None:
    model = args.get("model", "")
    if not isinstance(model, str | Path | nn.Module) and not hasattr(model, "tokenizer"):
        raise CompensatorError(
            f"model must be a model name, a path or a loaded model, not {type(model).__name__}"
        )
    target = args.get("target", "")
    if not isinstance(target, str | Path | nn.Module) and not hasattr(target, "model"):
        raise CompensatorError(
            f"evaluate() takes a checkpoint or model path, a model or a QuantizedModel, not "
            f"{type(target).__name__}"
        )
    recipe = args.get("recipe", "")
    if not isinstance(recipe, str | Path) and not hasattr(recipe, "steps"):
        raise CompensatorError(
            f"recipe must be a preset name, a YAML path or a Recipe, not {type(recipe).__name__}"
        )
    if "qmodel" in args and not hasattr(args["qmodel"], "quantization_config"):
        raise CompensatorError(
            f"save() takes the QuantizedModel that quantize() returns, not "
            f"{type(args['qmodel']).__name__}"
        )
    calibration = args.get("calibration")
    if isinstance(calibration, torch.Tensor):
        check_token_windows(calibration)
    elif calibration is not None and not isinstance(calibration, str):
        raise CompensatorError(
            f"calibration must be a data source name or a tensor of token ids, not "
            f"{type(calibration).__name__}"
        )


def check_token_windows(ids: torch.Tensor) -> None:
    """Calibration given as tokens: integer ids, [windows, seqlen] with 2+ tokens each."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise CompensatorError(
            f"calibration is a {str(ids.dtype).removeprefix('torch.')} tensor; pass token ids "
            "(an integer tensor, [windows, seqlen])"
        )
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise CompensatorError(
            f"calibration has shape {tuple(ids.shape)}; pass token ids shaped [windows, seqlen] "
            "with at least one window of 2 tokens (x.reshape(1, -1) for one window)"
        )
    if int(ids.min()) < 0:
        raise CompensatorError(f"calibration holds the negative token id {int(ids.min())}")
