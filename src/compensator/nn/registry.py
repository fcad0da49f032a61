"""The registry of runtime layer formats: a rounder's result declares the ``format`` it
becomes, a checkpoint records each layer's format, and both map here to one class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from compensator.quant.act import ActSpec
from compensator.types import LowRank, Rotation

LowRankInput = Literal["quantized", "raw", "split"]


@dataclass
class LayerExtras:
    """What a quantized layer holds besides its weight."""

    bias: torch.Tensor | None = None
    lowrank: LowRank | None = None
    act_spec: ActSpec | None = None
    lowrank_input: LowRankInput = "quantized"
    rotation: Rotation | None = None


class QuantizedLayer(Protocol):
    format: ClassVar[str]
    in_features: int
    out_features: int

    @classmethod
    def from_result(cls, result: Any, extras: LayerExtras) -> nn.Module: ...

    @classmethod
    def from_record(cls, record: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
        """An empty layer (buffers to be loaded) from what :meth:`record` wrote."""
        ...

    def record(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this layer before loading its tensors."""
        ...

    def storage_bits(self) -> int: ...

    def trainable(self) -> dict[str, list[str]]:
        """The stored float tensors fine-tuning may move, by part ("scales", "mins",
        "lowrank", "codebook"; ``compensator.tune.parts``): integer codes never appear."""
        ...

    def tune(self, on: bool) -> None:
        """Enter or leave fine-tuning: the forward becomes differentiable in those tensors."""
        ...


LAYERS: dict[str, type[QuantizedLayer]] = {}


def register_layer(cls: type[Any]) -> type[Any]:
    if cls.format in LAYERS:
        raise ValueError(f"layer format {cls.format!r} registered twice")
    LAYERS[cls.format] = cls
    return cls


def act_record(spec: ActSpec | None) -> dict[str, Any] | None:
    return None if spec is None else spec.model_dump()


def act_from_record(record: dict[str, Any]) -> ActSpec | None:
    acts = record.get("activations")
    return None if acts is None else ActSpec(**acts)


def rotation_sizes(record: dict[str, Any]) -> tuple[int, int] | None:
    rot = record.get("rotation")
    return None if rot is None else (int(rot[0]), int(rot[1]))
