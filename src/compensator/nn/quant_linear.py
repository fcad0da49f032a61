"""``QuantLinear``: packed integer weights + per-group scales/zeros, exact reference forward."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compensator.kernels import qgemv
from compensator.nn.registry import (
    LayerExtras,
    LowRankInput,
    act_from_record,
    act_record,
    register_layer,
    rotation_sizes,
)
from compensator.nn.rotated import rotate_input, rotation_record
from compensator.quant.act import ActSpec, quantize_activations
from compensator.quant.kquant import BITS_PER_WEIGHT
from compensator.quant.pack import pack_int32, packed_words, unpack_int32
from compensator.quant.spec import QuantizedWeight, QuantParams, QuantSpec
from compensator.types import LowRank


@register_layer
class QuantLinear(nn.Module):
    """A Linear layer whose weight is stored as b-bit codes packed into int32 words.

    Buffers (all saved): ``qweight`` [out, words(in)], ``scales`` [out, groups] in the spec's
    scale dtype, ``qzeros`` [out, words(groups)] (float32 ``zeros`` [out, groups] for the
    asymmetric K-quants, whose zero points are not integers), and an optional float ``bias``.
    The reference forward dequantizes with the same formula the rounders used, so its
    output equals the fake-quantized model's exactly.

    Optional low-rank correction of rank k (LQER): ``lr_a`` [in, k] and ``lr_b`` [k, out],
    fp16, or int8 codes with fp16 ``lr_a_scale``/``lr_b_scale`` [k] when ``factor_bits`` is 8;
    y = x Wq^T + (x A) B. Optional ``act_spec``: the input is quantized dynamically first;
    the low-rank term sees the quantized input too (LQER), or the unquantized one when
    ``lowrank_input`` is ``raw`` (LRC). With ``split`` (LRC's split input) A has orthonormal
    columns and the quantized path reads the input less A's subspace:
    y = Q(x - x A A^T) Wq^T + (x A) B. Optional online rotation ``rot_left``/``rot_right`` (float32,
    L (x) R orthogonal): the input is multiplied by it before anything else.
    """

    format: ClassVar[str] = "uniform"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        *,
        bias: bool = False,
        rank: int = 0,
        factor_bits: int = 16,
        act_spec: ActSpec | None = None,
        lowrank_input: LowRankInput = "quantized",
        rotation_sizes: tuple[int, int] | None = None,
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
        if spec.float_zero:  # asymmetric K-quants: dmin m / (d sc), not an integer
            self.register_buffer("zeros", torch.zeros(out_features, groups))
        else:
            self.register_buffer(
                "qzeros",
                torch.zeros(out_features, packed_words(groups, spec.bits), dtype=torch.int32),
            )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.rank, self.factor_bits, self.act_spec = rank, factor_bits, act_spec
        self.lowrank_input = lowrank_input
        self.lowrank_raw = lowrank_input in ("raw", "split")
        self.lowrank_split = lowrank_input == "split"
        if rotation_sizes is not None:
            a, b = rotation_sizes
            self.register_buffer("rot_left", torch.eye(a))
            self.register_buffer("rot_right", torch.eye(b))
        if rank:
            fdtype = torch.float16 if factor_bits == 16 else torch.int8
            self.register_buffer("lr_a", torch.zeros(in_features, rank, dtype=fdtype))
            self.register_buffer("lr_b", torch.zeros(rank, out_features, dtype=fdtype))
            if factor_bits != 16:
                self.register_buffer("lr_a_scale", torch.ones(rank, dtype=torch.float16))
                self.register_buffer("lr_b_scale", torch.ones(rank, dtype=torch.float16))
        self.register_buffer("a_cache", None, persistent=False)
        self.register_buffer("b_cache", None, persistent=False)
        # The weight stays packed: forward runs the int4 kernel on few tokens, and dequantizes
        # for each call on many (a matrix product). Only while ``keep_dense`` (calibration,
        # where the same layer sees many large batches) is the dense weight cached.
        self.keep_dense = False
        self.register_buffer("weight_cache", None, persistent=False)
        # While fine-tuned (``tuning``): the unpacked codes, and a forward that recomputes the
        # weight from its (trained) scales on every call so gradients reach them.
        self.register_buffer("codes_cache", None, persistent=False)
        self.register_buffer("shifted_cache", None, persistent=False)
        self.register_buffer("k_scale", None, persistent=False)  # the kernel's float32 grid
        self.register_buffer("k_zs", None, persistent=False)

    @classmethod
    def from_result(cls, qw: QuantizedWeight, extras: LayerExtras) -> QuantLinear:
        out_features, in_features = qw.codes.shape
        lowrank, rotation, bias = extras.lowrank, extras.rotation, extras.bias
        layer = cls(
            in_features,
            out_features,
            qw.spec,
            bias=bias is not None,
            rank=0 if lowrank is None else lowrank.rank,
            factor_bits=16 if lowrank is None or lowrank.bits is None else lowrank.bits,
            act_spec=extras.act_spec,
            lowrank_input=extras.lowrank_input,
            rotation_sizes=None if rotation is None else (len(rotation[0]), len(rotation[1])),
        )
        if rotation is not None:
            layer.rot_left.copy_(rotation[0])
            layer.rot_right.copy_(rotation[1])
        if lowrank is not None:
            layer.lr_a.copy_(lowrank.a)
            layer.lr_b.copy_(lowrank.b)
            if lowrank.bits is not None:
                layer.lr_a_scale.copy_(lowrank.a_scale)
                layer.lr_b_scale.copy_(lowrank.b_scale)
        layer.qweight.copy_(pack_int32(qw.codes, qw.spec.bits))
        layer.scales.copy_(qw.params.scale.to(qw.spec.torch_scale_dtype))
        if qw.spec.float_zero:
            layer.zeros.copy_(qw.params.zero)
        else:
            layer.qzeros.copy_(pack_int32(qw.params.zero.round().long(), qw.spec.bits))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer.to(qw.codes.device)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, **extras: Any
    ) -> QuantLinear:
        """``from_result`` with the extras as keywords (see ``LayerExtras``)."""
        return cls.from_result(qw, LayerExtras(bias=bias, **extras))

    def record(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "spec": self.spec.model_dump(),
            "rank": self.rank,
            "factor_bits": self.factor_bits,
            "lowrank_input": self.lowrank_input,
            "activations": act_record(self.act_spec),
            "rotation": rotation_record(self),
            "bias": self.bias is not None,
        }

    @classmethod
    def from_record(
        cls, record: dict[str, Any], in_features: int, out_features: int
    ) -> QuantLinear:
        return cls(
            in_features,
            out_features,
            QuantSpec(**record["spec"]),
            bias=bool(record.get("bias")),
            rank=int(record.get("rank", 0)),
            factor_bits=int(record.get("factor_bits", 16)),
            act_spec=act_from_record(record),
            lowrank_input=record.get("lowrank_input", "quantized"),
            rotation_sizes=rotation_sizes(record),
        )

    def trainable(self) -> dict[str, list[str]]:
        """The stored tensors fine-tuning may move, by part (``tune.parts``): scales and
        float mins, and float16 low-rank factors. K-quant scales are 6-bit sub-scales of a
        float16 per super-block and int8 factors are codes: neither trains exactly."""
        parts: dict[str, list[str]] = {}
        if self.spec.kquant is None:
            parts["scales"] = ["scales"]
            if self.spec.float_zero:
                parts["mins"] = ["zeros"]
        if self.rank and self.factor_bits == 16:
            parts["lowrank"] = ["lr_a", "lr_b"]
        return parts

    def tune(self, on: bool) -> None:
        """Enter (or leave) fine-tuning: codes are unpacked once and every forward is
        differentiable in the stored float tensors. With integer zero points (fixed, like the
        codes) the cache is codes - zero in bfloat16, exact for integers below 2^8 in
        magnitude: one conversion and one product per forward; float mins (trained) keep
        the codes apart."""
        self._clear()
        self.codes_cache = self.shifted_cache = None
        if not on:
            return
        qw = self.quantized_weight()
        if self.spec.float_zero:
            self.codes_cache = qw.codes.to(torch.uint8)
            return
        zero = qw.params.zero[:, self.spec.group_of_columns(self.in_features)]
        self.shifted_cache = (qw.codes.float() - zero).to(torch.bfloat16)

    def quantized_weight(self) -> QuantizedWeight:
        if self.codes_cache is not None:
            codes = self.codes_cache
        else:
            codes = unpack_int32(self.qweight, self.spec.bits, self.in_features)
        if self.spec.float_zero:
            zeros = self.zeros.float()
        else:
            zeros = unpack_int32(self.qzeros, self.spec.bits, self.scales.shape[1]).float()
        return QuantizedWeight(codes, QuantParams(self.scales.float(), zeros), self.spec)

    def dequantize_weight(self) -> torch.Tensor:
        return self.quantized_weight().dequantize()

    def lowrank(self) -> LowRank | None:
        if not self.rank:
            return None
        if self.factor_bits == 16:
            return LowRank(self.lr_a, self.lr_b)
        return LowRank(self.lr_a, self.lr_b, self.factor_bits, self.lr_a_scale, self.lr_b_scale)

    def storage_bits(self) -> int:
        """Bits this layer stores for its weight: codes, scales, zeros and low-rank factors.

        K-quants count as their GGUF blocks hold them (Q4_K: 4.5 bits per weight): their
        float32 scales and zeros here are 6-bit integers times a float16 per super-block."""
        groups = self.scales.shape[1]
        zero_bits = 0 if self.spec.symmetric else self.spec.bits
        if self.spec.float_min:  # a min in the scale dtype, over the scale (float32 here)
            zero_bits = self.scales.element_size() * 8
        bits = self.out_features * (
            self.in_features * self.spec.bits
            + groups * (self.scales.element_size() * 8 + zero_bits)
        )
        if self.spec.kquant is not None:
            bits = round(self.out_features * self.in_features * BITS_PER_WEIGHT[self.spec.kquant])
        lr = self.lowrank()
        return bits + (0 if lr is None else lr.storage_bits())

    @property
    def weight(self) -> torch.Tensor:
        # Code that inspects ``layer.weight`` (dtype/device probes, tied-weight checks) keeps
        # working; the dense weight it gets is not kept.
        return self.weight_cache if self.weight_cache is not None else self.dequantize_weight()

    def _clear(self) -> None:
        self.weight_cache = self.a_cache = self.b_cache = self.k_scale = self.k_zs = None

    @property
    def tuning(self) -> bool:
        return self.codes_cache is not None or self.shifted_cache is not None

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # model.half()/.to(bfloat16) must not change what is stored (scales in the spec's dtype,
        # fp16 factors): only the device follows.
        kept = {n: b for n, b in self._buffers.items() if n in _STORED_DTYPE and b is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            self._buffers[name] = old.to(device=self._buffers[name].device)
        self._clear()
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _kernel(self, x: torch.Tensor) -> Any:
        """The packed int4 kernels when they serve this input, else None."""
        if (
            self.spec.bits != 4
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or self.spec.group_width(self.in_features) % 8
            or self.in_features % 8
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return None
        return qgemv()

    def _tuned_weight(self) -> torch.Tensor:
        """The dequantized weight while fine-tuning: with whole groups, group parameters
        broadcast over [out, groups, width] (a gather's backward is a slow scatter-add)."""
        width = self.spec.group_width(self.in_features)
        scale = self.scales.float()
        if self.shifted_cache is None:  # float mins: (codes - zero) * scale
            if self.in_features % width:
                return self.dequantize_weight()
            codes = self.codes_cache.view(self.out_features, -1, width).float()
            w = (codes - self.zeros.float()[..., None]) * scale[..., None]
        elif self.in_features % width:
            cols = self.spec.group_of_columns(self.in_features, scale.device)
            return self.shifted_cache.float() * scale[:, cols]
        else:
            w = self.shifted_cache.view(self.out_features, -1, width).float() * scale[..., None]
        return w.view(self.out_features, self.in_features)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.tuning:
            return F.linear(x, self._tuned_weight().to(x.dtype), bias)
        if self.keep_dense or self.weight_cache is not None:  # calibration: the exact weight
            if self.weight_cache is None:
                self.weight_cache = self.dequantize_weight()
            return F.linear(x, self.weight_cache.to(x.dtype), bias)
        kernel = self._kernel(x)
        if kernel is None:
            return F.linear(x, self.dequantize_weight().to(x.dtype), bias)
        if self.k_scale is None:
            qw = self.quantized_weight()
            self.k_scale = qw.params.scale.contiguous()
            self.k_zs = (qw.params.zero * qw.params.scale).contiguous()
        group = self.spec.group_width(self.in_features)
        if x.numel() // self.in_features > KERNEL_MAX_ROWS:  # a matrix product: BLAS
            w = kernel.dequant_int4(self.qweight, self.k_scale, self.k_zs, group, self.in_features)
            return F.linear(x, w, bias)
        flat = x.reshape(-1, self.in_features).contiguous()
        y = kernel.qgemv_int4(flat, self.qweight, self.k_scale, self.k_zs, group)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rotate_input(self, x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.rank:
            return self._matmul(self._quantize_input(x), bias)
        if self.a_cache is None and not self.tuning:
            self.a_cache, self.b_cache = self.lowrank().factors()
        a_f, b_f = self.lowrank().factors() if self.tuning else (self.a_cache, self.b_cache)
        b = b_f.to(x.dtype)
        if self.lowrank_split:
            # In float32 as calibrated: the subtraction cancels most of x's energy, which
            # bfloat16 would not resolve.
            a32 = a_f.float()
            z = x.float() @ a32
            xq = self._quantize_input(x.float() - z @ a32.T).to(x.dtype)
            return self._matmul(xq, bias) + z.to(x.dtype) @ b
        a = a_f.to(x.dtype)
        xq = self._quantize_input(x)
        return self._matmul(xq, bias) + ((x if self.lowrank_raw else xq) @ a) @ b

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is None:
            return x
        q = quantize_activations(x, self.act_spec)
        # While tuning, gradients pass the rounding straight through to what feeds this layer
        # (norms, earlier layers); the value is q exactly (x - x is 0).
        return q.detach() + (x - x.detach()) if self.tuning else q

    def extra_repr(self) -> str:
        extra = f", rank={self.rank}" if self.rank else ""
        if self.rank and self.factor_bits != 16:
            extra += f" (int{self.factor_bits})"
        if self.rank and self.lowrank_split:
            extra += " on the unquantized input, its subspace split off the quantized one"
        elif self.rank and self.lowrank_raw:
            extra += " on the unquantized input"
        if self.act_spec is not None:
            extra += f", {self.act_spec.label()}"
        if hasattr(self, "rot_left"):
            extra += f", online rotation {len(self.rot_left)}x{len(self.rot_right)}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self.spec.label()}{extra}"
        )


# Inputs of at most this many rows (tokens) run the packed kernel; more rows are a matrix
# product, where dequantizing once and calling BLAS is faster.
KERNEL_MAX_ROWS = 16

_STORED_DTYPE = {
    "scales",
    "zeros",
    "lr_a",
    "lr_b",
    "lr_a_scale",
    "lr_b_scale",
    "rot_left",
    "rot_right",
}
