"""``QuantLinear``: packed integer weights + per-group scales/zeros, exact reference forward."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compensator.quant.pack import pack_int32, packed_words, unpack_int32
from compensator.quant.spec import QuantizedWeight, QuantParams, QuantSpec, dequantize


class QuantLinear(nn.Module):
    """A Linear layer whose weight is stored as b-bit codes packed into int32 words.

    Buffers (all saved): ``qweight`` [out, words(in)], ``scales`` [out, groups] in the spec's
    scale dtype, ``qzeros`` [out, words(groups)], and an optional float ``bias``.
    The reference forward dequantizes with the same formula the rounders used, so its
    output equals the fake-quantized model's exactly.
    """

    def __init__(
        self, in_features: int, out_features: int, spec: QuantSpec, *, bias: bool = False
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        groups = spec.n_groups(in_features)
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, packed_words(in_features, spec.bits), dtype=torch.int32),
        )
        self.register_buffer(
            "scales", torch.ones(out_features, groups, dtype=spec.torch_scale_dtype)
        )
        self.register_buffer(
            "qzeros", torch.zeros(out_features, packed_words(groups, spec.bits), dtype=torch.int32)
        )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # Unpacking costs far more than the matmul at calibration batch sizes; the cache is not
        # saved and moves with the module.
        self.register_buffer("weight_cache", None, persistent=False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        out_features, in_features = qw.codes.shape
        layer = cls(in_features, out_features, qw.spec, bias=bias is not None)
        layer.qweight.copy_(pack_int32(qw.codes, qw.spec.bits))
        layer.scales.copy_(qw.params.scale.to(qw.spec.torch_scale_dtype))
        layer.qzeros.copy_(pack_int32(qw.params.zero.round().long(), qw.spec.bits))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer.to(qw.codes.device)

    def quantized_weight(self) -> QuantizedWeight:
        codes = unpack_int32(self.qweight, self.spec.bits, self.in_features)
        zeros = unpack_int32(self.qzeros, self.spec.bits, self.scales.shape[1]).float()
        return QuantizedWeight(codes, QuantParams(self.scales.float(), zeros), self.spec)

    def dequantize_weight(self) -> torch.Tensor:
        qw = self.quantized_weight()
        return dequantize(qw.codes, qw.params, qw.spec)

    @property
    def weight(self) -> torch.Tensor:
        # Code that inspects ``layer.weight`` (dtype/device probes, tied-weight checks) keeps working.
        return self.weight_cache if self.weight_cache is not None else self.dequantize_weight()

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # model.half()/.to(bfloat16) must not round the scales: they keep the spec's dtype.
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(device=self.scales.device)
        self.weight_cache = None
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.weight_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_cache is None:
            self.weight_cache = self.dequantize_weight()
        w = self.weight_cache.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.label()}"
        )


def replace_module(root: nn.Module, dotted_name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.<dotted_name>`` was."""
    parent_name, _, child = dotted_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
