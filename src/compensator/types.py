"""Shared value types: what the layers of the package hand each other.

A leaf module (torch only), so the maths, the steps, the runtime modules and the engine can
all use these without importing one another.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compensator.parallel import SOLO, Ranks

# An online rotation of a Linear's input, K = L (x) R kept as its two factors.
Rotation = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LinearStats:
    """Statistics of one Linear's input over the calibration set, by statistic name."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0

    @property
    def hessian(self) -> torch.Tensor | None:
        return self.values.get("hessian")

    @property
    def fp_cross(self) -> torch.Tensor | None:
        return self.values.get("fp_cross", self.values.get("fp_cross_bf16"))

    @property
    def abs_mean(self) -> torch.Tensor | None:
        return self.values.get("abs_mean")

    @property
    def act_hessian(self) -> torch.Tensor | None:
        return self.values.get("act_hessian")

    @property
    def act_cross(self) -> torch.Tensor | None:
        return self.values.get("act_cross")

    @property
    def fp_act_cross(self) -> torch.Tensor | None:
        return self.values.get("fp_act_cross")

    @property
    def act_basis(self) -> torch.Tensor | None:
        """The split basis B the quantized-input statistics were taken with, if any."""
        return self.values.get("act_basis")


@dataclass
class LowRank:
    """Factors a [in, k], b [k, out] of a correction y += (x a) b. With ``bits`` set they hold
    int8 codes and ``a_scale`` [k] (per column of a) and ``b_scale`` [k] (per row of b)
    recover the values."""

    a: torch.Tensor
    b: torch.Tensor
    bits: int | None = None
    a_scale: torch.Tensor | None = None
    b_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float a, b (dequantized when stored as codes)."""
        if self.bits is None:
            return self.a.float(), self.b.float()
        assert self.a_scale is not None and self.b_scale is not None
        return self.a.float() * self.a_scale.float(), self.b.float() * self.b_scale.float()[:, None]

    def dense(self) -> torch.Tensor:
        """The correction as a weight-shaped matrix [out, in]: (A B)^T."""
        a, b = self.factors()
        return (a @ b).T

    def quantized(self, bits: int) -> LowRank:
        """Symmetric ``bits``-bit codes, one scale per rank component (column of a, row of b)."""
        a, b = self.factors()
        qmax = 2 ** (bits - 1) - 1
        a_scale = (a.abs().amax(dim=0) / qmax).clamp(min=1e-12).half().float()
        b_scale = (b.abs().amax(dim=1) / qmax).clamp(min=1e-12).half().float()
        a_codes = (a / a_scale).round().clamp(-qmax, qmax).to(torch.int8)
        b_codes = (b / b_scale[:, None]).round().clamp(-qmax, qmax).to(torch.int8)
        return LowRank(a_codes, b_codes, bits, a_scale.half(), b_scale.half())

    def storage_bits(self) -> int:
        if self.bits is None:
            return (self.a.numel() + self.b.numel()) * 16
        return (self.a.numel() + self.b.numel()) * self.bits + 2 * self.rank * 16


@dataclass(frozen=True)
class RotationLayout:
    """What a residual-stream rotation (or a channel-scale transform) must touch in one block
    (paths relative to it), and the final norm (relative to the model). RMSNorm only: its
    scale folds into the Linears that read it, and an RMSNorm with unit scale commutes with
    any orthogonal matrix."""

    attn_norm: str = "input_layernorm"
    attn_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_output: str = "self_attn.o_proj"
    value: str = "self_attn.v_proj"
    mlp_norm: str = "post_attention_layernorm"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_output: str = "mlp.down_proj"
    final_norm: str = "model.norm"


@dataclass
class NextBlock:
    """The block after the current one, on the work device for as long as it is held, with its
    keyword arguments per batch and its FP outputs on the FP stream (cross-layer losses)."""

    module: nn.Module
    kwargs: list[dict[str, Any]]
    targets: list[torch.Tensor]


Forward = Callable[..., torch.Tensor]


@dataclass
class BlockContext:
    """What a per-block step sees of the block being quantized, handed to it by the engine.

    ``forward(module, hidden, kwargs, params=None)`` runs ``module`` (a block) on one batch on
    the work device, with its parameters replaced by ``params`` when given (differentiable),
    and returns the block's hidden-state output. ``next_block()`` holds the following block
    on the device (None for the last block). Streams are per calibration batch.
    """

    index: int
    block: nn.Module
    linears: dict[str, nn.Linear]
    layout: RotationLayout | None
    hidden: list[torch.Tensor]  # the block's inputs on the quantized stream
    kwargs: list[dict[str, Any]]
    fp_hidden: list[torch.Tensor]  # its inputs on the FP stream
    fp_outputs: list[torch.Tensor]  # the FP block's outputs on the FP stream (targets)
    fp_linear_inputs: list[dict[str, torch.Tensor]]  # each Linear's FP input, per batch
    device: torch.device
    forward: Forward
    next_block: Callable[[], AbstractContextManager[NextBlock | None]]
    # Written by per-block steps: fixed parameters per Linear for the rounder, entries for
    # the run's report (one list per key), and what the progress bar shows.
    fixed: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, str] = field(default_factory=dict)
    # The ranks of a data-parallel run: the streams hold this rank's share of each batch.
    ranks: Ranks = SOLO
