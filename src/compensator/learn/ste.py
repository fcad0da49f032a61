"""Straight-through estimators: the forward value of a non-differentiable op, identity grads."""

from __future__ import annotations

import torch

from compensator.quant.act import ActSpec, quantize_activations


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def cast_ste(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and back (what a stored scale becomes), identity gradient."""
    return x + (x.to(dtype).to(x.dtype) - x).detach()


def quantize_activations_ste(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    return x + (quantize_activations(x, spec) - x).detach()
