"""Quantization primitives: spec, parameters, codes, packing."""

from compensator.quant.pack import pack_int32, unpack_int32
from compensator.quant.spec import (
    QuantizedWeight,
    QuantParams,
    QuantSpec,
    dequantize,
    fake_quantize,
    fit_params,
    quantize_with_params,
)

__all__ = [
    "QuantParams",
    "QuantSpec",
    "QuantizedWeight",
    "dequantize",
    "fake_quantize",
    "fit_params",
    "pack_int32",
    "quantize_with_params",
    "unpack_int32",
]
