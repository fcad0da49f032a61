"""Straight-through estimators: the forward value of a non-differentiable op, identity grads."""

from __future__ import annotations

import torch

from compensator.quant.act import ActSpec, quantize_activations
from compensator.quant.grid import cast_ste, round_ste

__all__ = ["cast_ste", "quantize_activations_ste", "round_ste"]


def quantize_activations_ste(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    return x + (quantize_activations(x, spec) - x).detach()
