"""Dynamic activation quantization of Linear inputs (the ``A8`` in W4A8).

Two formats, both computed on the fly from each input, so nothing is calibrated or stored:

- ``token``: symmetric integers with one scale per token, max|x| / (2^(b-1) - 1).
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

    def label(self) -> str:
        return f"A{self.bits}" + ("" if self.granularity == "token" else f"-mx{self.block_size}")


def quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
    return ((xf / scale).round().clamp(-qmax - 1, qmax) * scale).to(x.dtype)


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
    return quantize_per_token(x, spec.bits)
