"""An online rotation of a Linear's input (QuaRot's Hadamard before down_proj).

The weight absorbs the rotation (W K) and the input is rotated at run time (x K), so the
product is unchanged while the rotated input has no outlier features left to quantize.
K = L (x) R is kept as its two small factors and applied without forming it.
"""

from __future__ import annotations

import torch
from torch import nn

from compensator.linalg import kron_apply
from compensator.types import Rotation


def input_rotation(module: nn.Module) -> Rotation | None:
    """(L, R) when ``module`` rotates its input online, else None."""
    left = getattr(module, "rot_left", None)
    return None if left is None else (left, module.rot_right)


def rotate_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``module`` multiplies its weight with: ``x`` after its online rotation, if any."""
    rot = input_rotation(module)
    return x if rot is None else kron_apply(x, *rot)


def rotation_record(module: nn.Module) -> list[int] | None:
    rot = input_rotation(module)
    return None if rot is None else [len(rot[0]), len(rot[1])]


class RotatedLinear(nn.Linear):
    """nn.Linear computing (x K) W^T: a model whose weight was folded as W K stays exact.

    Still an nn.Linear, so adapters and the pipeline treat it like any other; statistics
    hooks apply :func:`rotate_input` to what they capture.
    """

    def __init__(self, linear: nn.Linear, left: torch.Tensor, right: torch.Tensor) -> None:
        super().__init__(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("rot_left", left.float().contiguous())
        self.register_buffer("rot_right", right.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(rotate_input(self, x))
