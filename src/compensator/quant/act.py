"""Dynamic activation quantization of Linear inputs (the ``A8`` in W4A8).

Two formats, both computed on the fly from each input, so nothing is calibrated or stored:

- ``token``: integers with one scale per token: symmetric, max|x| / (2^(b-1) - 1), or
  asymmetric over [min, max] with a zero point; ``clip_ratio`` < 1 shrinks the range first
  (QuaRot's 0.9 at 4 bits: the few clipped outliers cost less than the coarser grid).
- ``mx``: MXINT-style blocks of ``block_size`` consecutive features sharing a power-of-two
  scale 2^(floor(log2 max|x|) - (b - 2)), so the block maximum lands in [2^(b-2), 2^(b-1)).
  A ragged last block (width not a multiple of the block size) simply has fewer members.

The functions return the dequantized ("fake-quantized") tensor in the input's dtype: the
integer values and scales are exactly those an integer kernel would use.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

ActGranularity = Literal["token", "mx"]


class ActSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(8, ge=2, le=8)
    granularity: ActGranularity = "token"
    block_size: int = Field(16, ge=2, description="features per shared exponent (mx only)")
    symmetric: bool = Field(True, description="token only: False adds a per-token zero point")
    clip_ratio: float = Field(1.0, gt=0, le=1, description="token only: range shrink factor")

    def label(self) -> str:
        if self.granularity == "mx":
            return f"A{self.bits}-mx{self.block_size}"
        asym = "" if self.symmetric else "-asym"
        clip = "" if self.clip_ratio == 1 else f"-clip{self.clip_ratio:g}"
        return f"A{self.bits}{asym}{clip}"


def quantize_per_token(
    x: torch.Tensor, bits: int, *, symmetric: bool = True, clip_ratio: float = 1.0
) -> torch.Tensor:
    xf = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) * clip_ratio / qmax
        return ((xf / scale).round().clamp(-qmax - 1, qmax) * scale).to(x.dtype)
    levels = 2**bits - 1
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0) * clip_ratio
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0) * clip_ratio
    scale = (hi - lo).clamp(min=1e-12) / levels
    zero = (-lo / scale).round()
    q = ((xf / scale).round() + zero).clamp(0, levels)
    return ((q - zero) * scale).to(x.dtype)


def quantize_mx(x: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    d = x.shape[-1]
    pad = -d % block_size
    xf = torch.nn.functional.pad(x.float(), (0, pad)) if pad else x.float()
    blocks = xf.reshape(*xf.shape[:-1], -1, block_size)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    # An all-zero block keeps exponent 0; its values quantize to 0 whatever the scale.
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=1e-30))), 0.0)
    scale = torch.exp2(exponent - (bits - 2))
    qmax = 2 ** (bits - 1) - 1
    q = (blocks / scale).round().clamp(-qmax - 1, qmax) * scale
    return q.reshape(xf.shape)[..., :d].to(x.dtype)


def quantize_activations(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    if spec.granularity == "mx":
        return quantize_mx(x, spec.bits, spec.block_size)
    return quantize_per_token(x, spec.bits, symmetric=spec.symmetric, clip_ratio=spec.clip_ratio)
