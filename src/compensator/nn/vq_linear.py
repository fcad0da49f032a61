"""``VQLinear``: a vector-quantized Linear (indices + fp16 codebook + row scales + optional
packed sign bits) with an exact reference forward (decode, then matmul)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compensator.nn.registry import (
    LayerExtras,
    act_from_record,
    act_record,
    register_layer,
    rotation_sizes,
)
from compensator.nn.rotated import rotate_input, rotation_record
from compensator.quant.act import ActSpec, quantize_activations
from compensator.quant.pack import pack_int32, packed_words, unpack_int32
from compensator.quant.vq import VQSpec, VQWeight, vq_decode, vq_storage_bits


@register_layer
class VQLinear(nn.Module):
    """Buffers (all saved): ``indices`` [out, in/dim] (int16, or int32 past 15 bits),
    ``codebook`` [n_cb, 2^bits, dim] fp16, ``row_scale`` [out] fp16, and with sign-split
    ``sign_bits`` [out, words(in)] int32 (1 = negative); optional float ``bias``, online
    rotation factors and activation quantizer as in ``QuantLinear``."""

    format: ClassVar[str] = "vq"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: VQSpec,
        *,
        bias: bool = False,
        act_spec: ActSpec | None = None,
        rotation_sizes: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        spec.check(in_features)
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.act_spec = act_spec
        n_cb = -(-out_features // (spec.rows_per_codebook or out_features))
        idx_dtype = torch.int16 if spec.bits <= 15 else torch.int32
        self.register_buffer(
            "indices", torch.zeros(out_features, in_features // spec.dim, dtype=idx_dtype)
        )
        self.register_buffer(
            "codebook", torch.zeros(n_cb, spec.codewords, spec.dim, dtype=torch.float16)
        )
        self.register_buffer("row_scale", torch.ones(out_features, dtype=torch.float16))
        if spec.signs:
            self.register_buffer(
                "sign_bits",
                torch.zeros(out_features, packed_words(in_features, 1), dtype=torch.int32),
            )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if rotation_sizes is not None:
            a, b = rotation_sizes
            self.register_buffer("rot_left", torch.eye(a))
            self.register_buffer("rot_right", torch.eye(b))
        self.keep_dense = False  # cache the decoded weight (calibration only)
        self.tuning = False  # fine-tuning: gradients pass the activation rounding
        self.register_buffer("weight_cache", None, persistent=False)

    @classmethod
    def from_result(cls, vw: VQWeight, extras: LayerExtras) -> VQLinear:
        if extras.lowrank is not None:
            raise ValueError("VQLinear holds no low-rank factors")
        out, n_sub = vw.indices.shape
        rotation, bias = extras.rotation, extras.bias
        layer = cls(
            n_sub * vw.spec.dim,
            out,
            vw.spec,
            bias=bias is not None,
            act_spec=extras.act_spec,
            rotation_sizes=None if rotation is None else (len(rotation[0]), len(rotation[1])),
        )
        layer.indices.copy_(vw.indices.to(layer.indices.dtype))
        layer.codebook.copy_(vw.codebook.half())
        layer.row_scale.copy_(vw.row_scale.half())
        if vw.signs is not None:
            layer.sign_bits.copy_(pack_int32(vw.signs.long(), 1))
        if rotation is not None:
            layer.rot_left.copy_(rotation[0])
            layer.rot_right.copy_(rotation[1])
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer.to(vw.indices.device)

    def record(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "spec": self.spec.model_dump(),
            "activations": act_record(self.act_spec),
            "rotation": rotation_record(self),
            "bias": self.bias is not None,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], in_features: int, out_features: int) -> VQLinear:
        return cls(
            in_features,
            out_features,
            VQSpec(**record["spec"]),
            bias=bool(record.get("bias")),
            act_spec=act_from_record(record),
            rotation_sizes=rotation_sizes(record),
        )

    def trainable(self) -> dict[str, list[str]]:
        """Fine-tuning moves the codebooks and the row scales; indices and signs stay."""
        return {"codebook": ["codebook"], "scales": ["row_scale"]}

    def tune(self, on: bool) -> None:
        """Every forward decodes the weight anew (differentiable in the codebooks) unless
        the dense weight is cached, which fine-tuning turns off."""
        self.keep_dense, self.weight_cache, self.tuning = False, None, on

    def vq_weight(self) -> VQWeight:
        signs = None
        if self.spec.signs:
            signs = unpack_int32(self.sign_bits, 1, self.in_features).bool()
        return VQWeight(
            self.indices.long(), self.codebook.float(), self.row_scale.float(), signs, self.spec
        )

    def dequantize_weight(self) -> torch.Tensor:
        vw = self.vq_weight()
        return vq_decode(vw.indices, vw.codebook, vw.row_scale, vw.signs, vw.codebook_of_rows())

    def storage_bits(self) -> int:
        return vq_storage_bits(self.out_features, self.in_features, self.spec)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_cache if self.weight_cache is not None else self.dequantize_weight()

    def _apply(self, fn: Any, recurse: bool = True) -> VQLinear:
        kept = {
            n: b
            for n, b in self._buffers.items()
            if n in ("codebook", "row_scale") and b is not None
        }
        super()._apply(fn, recurse)
        for name, old in kept.items():
            self._buffers[name] = old.to(device=self._buffers[name].device)
        self.weight_cache = None
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.weight_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rotate_input(self, x)
        if self.act_spec is not None:
            q = quantize_activations(x, self.act_spec)
            # While tuning (no dense cache), gradients pass the rounding straight through.
            x = q.detach() + (x - x.detach()) if self.tuning else q
        w = self.weight_cache
        if w is None:
            w = self.dequantize_weight()
            if self.keep_dense:
                self.weight_cache = w
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.label()}"
        )
