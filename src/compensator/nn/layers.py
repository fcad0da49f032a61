"""Quantized layers from rounder results or checkpoint records, whatever their format."""

from __future__ import annotations

from typing import Any

from torch import nn

from compensator.errors import CompensatorError
from compensator.nn import quant_linear, vq_linear  # noqa: F401  (registers the formats)
from compensator.nn.registry import LAYERS, LayerExtras


def build_layer(result: Any, extras: LayerExtras) -> nn.Module:
    """The runtime module for a rounder's ``result`` (its ``format`` picks the class)."""
    return LAYERS[result.format].from_result(result, extras)


def layer_from_record(record: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
    fmt = record.get("format")
    if fmt not in LAYERS:
        raise CompensatorError(
            f"unknown layer format {fmt!r} in the checkpoint (known: {', '.join(sorted(LAYERS))}); "
            "upgrade compensator"
        )
    return LAYERS[fmt].from_record(record, in_features, out_features)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    formats = tuple(LAYERS.values())
    return [(n, m) for n, m in model.named_modules() if isinstance(m, formats)]


def keep_dense(module: nn.Module, on: bool) -> None:
    """Cache (or drop) the dense weights of the quantized layers in ``module``: for
    calibration, where each layer runs on many large batches."""
    for _, layer in quantized_layers(module):
        layer.keep_dense = on
        if not on:
            layer.weight_cache = None


def bits_per_weight(model: nn.Module) -> float | None:
    """Stored bits per quantized weight over all quantized layers, counting codes, scales,
    zero points, codebooks and low-rank factors (None when there is none)."""
    layers = [m for _, m in quantized_layers(model)]
    if not layers:
        return None
    return sum(m.storage_bits() for m in layers) / sum(
        m.in_features * m.out_features for m in layers
    )


def replace_module(root: nn.Module, dotted_name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.<dotted_name>`` was."""
    parent_name, _, child = dotted_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
